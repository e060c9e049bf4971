"""The pure large-page priority (C5): decaying scores, ranking, the choice within a budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvext.memory.hugepage_policy import REGION_PAGES, Params, Scores, choose


def test_decay_halves_score_every_half_life() -> None:
    scores = Scores(Params(half_life=2.0, floor=0.0))
    scores.update({3: 100})
    scores.update({})
    scores.update({})
    assert scores.values[3] == pytest.approx(50.0)
    assert scores.intervals == 3


def test_scores_accumulate_and_forget_below_floor() -> None:
    scores = Scores(Params(half_life=1.0, floor=1.0))
    scores.update({0: 4, 1: 1})
    scores.update({0: 4})
    assert scores.values[0] == pytest.approx(6.0)
    assert 1 not in scores.values  # 0.5 < floor
    for _ in range(10):
        scores.update({})
    assert scores.values == {}


def test_steady_hot_set_outranks_burst_that_stopped() -> None:
    scores = Scores(Params(half_life=2.0))
    scores.update({7: 512})  # one burst
    for _ in range(8):
        scores.update({1: 64, 2: 64})  # steady hot set
    assert [index for index, _ in scores.ranked()][:2] == [1, 2]
    assert scores.values[7] < scores.values[1]


def test_ranked_ties_by_lower_index() -> None:
    scores = Scores()
    scores.update({5: 10, 2: 10, 9: 20})
    assert [i for i, _ in scores.ranked()] == [9, 2, 5]


def test_choose_skips_large_and_respects_budget_and_min_score() -> None:
    scores = Scores(Params(min_score=5.0))
    scores.update({0: 100, 1: 90, 2: 80, 3: 70, 4: 1})
    plan = choose(scores, large={1}, budget=2)
    assert plan.collapse == (0, 2)
    assert plan.already_large == (1,)
    assert choose(scores, large=(), budget=10).collapse == (0, 1, 2, 3)  # 4 scores below min_score
    assert choose(scores, large=(), budget=0).collapse == ()
    assert plan.to_dict() == {"collapse": [0, 2], "already_large": [1], "budget": 2}


@pytest.mark.parametrize("counts", [{0: -1}, {0: REGION_PAGES + 1}, {0: math.nan}, {-1: 3}])
def test_update_rejects_impossible_counts(counts: dict[int, float]) -> None:
    scores = Scores()
    scores.update({0: 3})
    with pytest.raises(ValueError):
        scores.update(counts)
    assert scores.values == {0: 3}  # nothing half done


@pytest.mark.parametrize("kwargs", [{"half_life": 0}, {"half_life": math.inf}, {"floor": -1}, {"min_score": math.nan}])
def test_params_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Params(**kwargs)


def test_choose_rejects_negative_budget() -> None:
    with pytest.raises(ValueError):
        choose(Scores(), (), -1)


@given(st.lists(st.dictionaries(st.integers(0, 50), st.integers(0, REGION_PAGES), max_size=20), max_size=10),
       st.sets(st.integers(0, 50)), st.integers(0, 60))
def test_choice_is_the_hottest_eligible(history: list[dict[int, int]], large: set[int], budget: int) -> None:
    scores = Scores()
    for counts in history:
        scores.update(counts)
    plan = choose(scores, large, budget)
    assert len(plan.collapse) <= budget
    assert not set(plan.collapse) & large
    eligible = [(i, s) for i, s in scores.ranked() if i not in large and s >= scores.params.min_score]
    assert list(plan.collapse) == [i for i, _ in eligible[:budget]]
    assert all(s <= (REGION_PAGES / (1 - scores.params.decay)) + 1e-6 for s in scores.values.values())
