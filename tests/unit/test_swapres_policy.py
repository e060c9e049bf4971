"""The swap reservation's accounting (hvext.memory.swapres_policy): the move that conserves the balance."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvext.memory import swapres_policy as policy

BLOCK = 4096
MIB = 1 << 20


def test_growth_is_punched_from_the_reservation() -> None:
    now = policy.balance(64 * MIB, 64 * MIB, {"a": 3 * MIB, "b": 1 * MIB})
    assert now.drift == 4 * MIB and not now.conserved
    move = policy.plan(now, BLOCK)
    assert (move.punch, move.refill, move.target, move.shortfall) == (4 * MIB, 0, 60 * MIB, 0)
    after = policy.balance(now.total, move.target, now.vms)
    assert after.conserved and after.held == 64 * MIB


def test_shrink_refills_and_a_conserved_balance_is_left_alone() -> None:
    move = policy.plan(policy.balance(64 * MIB, 50 * MIB, {"a": 2 * MIB}), BLOCK)
    assert (move.punch, move.refill, move.target) == (0, 12 * MIB, 62 * MIB)
    assert policy.plan(policy.balance(64 * MIB, 62 * MIB, {"a": 2 * MIB}), BLOCK).idle


def test_vms_beyond_the_total_empty_the_reservation_and_report_a_shortfall() -> None:
    now = policy.balance(8 * MIB, 8 * MIB, {"a": 6 * MIB, "b": 5 * MIB})
    move = policy.plan(now, BLOCK)
    assert (move.punch, move.target, move.shortfall) == (8 * MIB, 0, 3 * MIB)
    after = policy.balance(now.total, 0, now.vms)
    assert after.conserved and after.shortfall == 3 * MIB and after.drift == 3 * MIB
    assert after.to_dict()["shortfall_bytes"] == 3 * MIB


def test_a_total_off_the_block_size_is_rounded_down() -> None:
    move = policy.plan(policy.balance(10 * BLOCK + 5, 0, {}), BLOCK)
    assert move.target == 10 * BLOCK and move.refill == 10 * BLOCK


@pytest.mark.parametrize("args", [(-1, 0, {}), (0, -1, {}), (0, 0, {"a": -4096}), (0, 0, {"a": 1.5}),
                                  (True, 0, {}), (0, 0, {"a": "1"})])
def test_figures_are_validated(args) -> None:
    with pytest.raises(ValueError):
        policy.balance(*args)


@pytest.mark.parametrize("block", [0, -4096, True, 4096.0])
def test_block_is_validated(block) -> None:
    with pytest.raises(ValueError):
        policy.plan(policy.balance(0, 0, {}), block)


blocks = st.integers(0, 4096).map(lambda n: n * BLOCK)


@given(total=blocks, reservation=blocks, vms=st.dictionaries(st.text(min_size=1, max_size=3), blocks, max_size=5))
def test_after_the_move_the_balance_is_conserved(total: int, reservation: int, vms: dict[str, int]) -> None:
    now = policy.balance(total, min(reservation, total), vms)
    move = policy.plan(now, BLOCK)
    assert not (move.punch and move.refill)
    assert move.target == now.reservation - move.punch + move.refill
    assert 0 <= move.target <= total and move.target % BLOCK == 0
    after = policy.balance(total, move.target, vms)
    assert after.conserved
    assert after.held == total or (move.target == 0 and after.vm_sum > total)
