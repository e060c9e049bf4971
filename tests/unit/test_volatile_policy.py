"""C17/C18's pure parts: which pages to pull, in what batches, what a peer may name, and the byte account."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvext.ha import volatile, volatile_policy as vp
from hvext.ha.mirror_policy import LogMark


def pageset(runs: vp.Runs) -> set[int]:
    return {p for first, count in runs for p in range(first, first + count)}


runs_strategy = st.lists(st.tuples(st.integers(0, 500), st.integers(1, 40)), max_size=20)


@given(runs_strategy, runs_strategy)
def test_union_holds_exactly_the_pages_of_either_set(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> None:
    merged = vp.union(a, b)
    assert pageset(merged) == pageset(tuple(a)) | pageset(tuple(b))
    assert list(merged) == sorted(merged) and all(x[0] + x[1] < y[0] for x, y in zip(merged, merged[1:]))


@given(runs_strategy, st.sampled_from([4096, 8192, 3 * 4096, 16 << 20]))
def test_batches_cover_every_listed_page_once_within_the_limit(raw: list[tuple[int, int]], limit: int) -> None:
    runs = vp.union(raw)
    batches = vp.batches(runs, 4096, limit)
    covered = []
    for batch in batches:
        assert 0 < sum(n for _, n in batch) <= limit
        for offset, length in batch:
            assert offset % 4096 == 0 and length % 4096 == 0
            covered.extend(range(offset // 4096, (offset + length) // 4096))
    assert covered == sorted(pageset(runs))


def test_a_peers_page_list_is_checked() -> None:
    assert vp.check_runs([[0, 2], [5, 1]], 8) == ((0, 2), (5, 1))
    assert vp.check_runs([], 8) == ()
    for bad in ([[0, 2], [1, 1]], [[7, 2]], [[0, 0]], [[-1, 1]], [[0]], "x", [[True, 1]], [[0, 1.5]]):
        with pytest.raises(vp.PageListError):
            vp.check_runs(bad, 8)


def test_a_requests_extents_are_checked_against_the_region_and_the_batch() -> None:
    assert vp.check_extents([[0, 4096], [8192, 10]], 16384) == ((0, 4096), (8192, 10))
    for bad in ([], [[0, 0]], [[16000, 4096]], [[-1, 1]], [["0", 1]], None):
        with pytest.raises(vp.PageListError):
            vp.check_extents(bad, 16384)
    with pytest.raises(vp.PageListError, match="batch"):
        vp.check_extents([[0, 8192]], 1 << 20, limit=4096)


def test_continuity_of_dirty_lists() -> None:
    assert vp.continues(LogMark(3, 10), 3, 11) is None
    assert "restarted" in (vp.continues(LogMark(3, 10), 4, 11) or "")
    assert "does not follow" in (vp.continues(LogMark(3, 10), 3, 12) or "")
    assert vp.continues(None, 3, 1) is not None


def test_the_pull_account_states_the_ratio_against_the_dirty_bytes() -> None:
    exact = vp.PullAccount(dirty_pages=100, page_size=4096, pulled_bytes=409600, wire_bytes=409600 + 900,
                           state_bytes=70000, requests=2)
    assert exact.dirty_bytes == 409600 and exact.within_goal and exact.ratio == pytest.approx(1.0022, abs=1e-4)
    wasteful = vp.PullAccount(100, 4096, 409600 * 2, 409600 * 2, 0, 1)
    assert not wasteful.within_goal and wasteful.to_dict()["ratio"] == 2.0
    assert vp.PullAccount(0, 4096, 0, 0, 0, 0).ratio == 1.0
    assert vp.PullAccount(0, 4096, 0, 10, 0, 1).ratio == float("inf")


def _state(**kw: object) -> volatile.SourceState:
    base = dict(domain="d", uuid="u", dir="/x", epoch=1, ram_path="/r", ram_bytes=1 << 20, page_size=4096,
                block="hvext-ram", mark={"domain_id": 1, "generation": 1})
    base.update(kw)
    return volatile.SourceState(**base)  # type: ignore[arg-type]


def test_hvextd_refreshes_on_schedule_and_rebaselines_when_asked() -> None:
    s = _state(refresh_s=1.0, taken_at=100.0, refreshed_at=100.0)
    assert volatile.due(s, 100.5) is None and volatile.due(s, 101.0) == "refresh"
    assert volatile.due(_state(baseline_s=60.0, taken_at=100.0, refreshed_at=159.0), 160.0) == "baseline"
    assert volatile.due(_state(valid=False, refreshed_at=0.0), 100.0) is None  # unknown set: only a new baseline
    assert volatile.due(_state(handed_over=True, baseline_s=1.0), 1e9) is None


def test_hvextd_refreshes_a_standby_copy_at_its_interval_while_active() -> None:
    from hvext.ha import standby
    record = standby.Record("d", "u", "host2", "h:1", ["a", "b", "c"], 1.0, "/r", 1 << 20, 4096, "hvext-ram",
                            {"domain_id": 1, "generation": 1}, last_sync_at=100.0)
    assert not standby.due(record, 100.5) and standby.due(record, 101.0)
    record.state = "stopped"
    assert not standby.due(record, 1e9)
    assert "creds" not in record.status() and record.status()["lag_seconds"] is not None
    assert standby.refresh_timeout(1.0) == 5.0 and standby.refresh_timeout(0.1) == 2.0
    assert standby.refresh_timeout(60) == 10.0  # a dead standby is noticed within seconds
