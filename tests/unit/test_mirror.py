"""Memory mirroring (C19): the pure decisions (hvext.ha.mirror_policy) and the copier (hvext.ha.ramsync)
on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvext.cli.main import main
from hvext.errors import QMPError
from hvext.ha import mirror_policy as policy
from hvext.ha import ramsync
from hvext.ha.mirror_policy import Layout, LogMark, MirrorUsageError
from hvext.units import GIB, MIB

PAGE = 4096


# -- addresses --------------------------------------------------------------------------------------


def test_small_guest_gpa_is_the_file_offset() -> None:
    layout = Layout(512 * MIB, policy.default_below_4g("pc-q35-7.2", 512 * MIB))
    assert layout.below_4g == 512 * MIB and layout.above_4g == 0
    assert layout.offset(0) == 0 and layout.offset(0x1234567) == 0x1234567
    assert layout.offset(512 * MIB - 1) == 512 * MIB - 1
    for bad in (512 * MIB, 4 * GIB, -1):
        with pytest.raises(MirrorUsageError, match="not in guest RAM|non-negative"):
            layout.offset(bad)


@pytest.mark.parametrize("machine, ram, below", [
    ("pc-q35-7.2", 2 * GIB, 2 * GIB),                  # under 2.75 GiB: all below
    ("pc-q35-7.2", 0xB0000000, 2 * GIB),               # from 2.75 GiB: split at 2 GiB
    ("q35", 8 * GIB, 2 * GIB),
    ("pc-i440fx-7.2", 3 * GIB, 3 * GIB),               # under 3.5 GiB: all below
    ("pc-i440fx-7.2", 0xE0000000, 3 * GIB),            # from 3.5 GiB: split at 3 GiB (gigabyte_align)
    ("pc", 6 * GIB, 3 * GIB),
])
def test_qemu_72_ram_split(machine: str, ram: int, below: int) -> None:
    assert policy.default_below_4g(machine, ram) == below


def test_ram_above_4g_maps_after_the_low_part_and_the_hole_is_refused() -> None:
    layout = Layout(6 * GIB, 2 * GIB)  # q35 with 6 GiB
    assert layout.offset(2 * GIB - PAGE) == 2 * GIB - PAGE
    assert layout.offset(4 * GIB) == 2 * GIB
    assert layout.offset(8 * GIB - 1) == 6 * GIB - 1
    for hole in (2 * GIB, 3 * GIB, 4 * GIB - 1, 8 * GIB):
        with pytest.raises(MirrorUsageError, match="not in guest RAM"):
            layout.offset(hole)


def test_unknown_machine_is_refused() -> None:
    with pytest.raises(MirrorUsageError, match="not an x86"):
        policy.default_below_4g("virt", GIB)


@given(st.integers(1, 16).map(lambda g: g * 256 * MIB), st.data())
def test_offset_and_gpa_are_inverse(ram: int, data: st.DataObject) -> None:
    layout = Layout(ram, policy.default_below_4g("pc-q35-7.2", ram))
    offset = data.draw(st.integers(0, ram - 1))
    assert layout.offset(layout.gpa(offset)) == offset


def test_layout_from_qemu_is_checked() -> None:
    assert policy.layout_from_qemu(512 * MIB, 0, 512 * MIB) == Layout(512 * MIB, 512 * MIB)
    for below, above in ((512 * MIB, 1), (True, 0), (-1, 0), ("1", 0), (5 * GIB, 0), (100, 512 * MIB - 100)):
        with pytest.raises(QMPError):
            policy.layout_from_qemu(below, above, 512 * MIB)


# -- ranges -----------------------------------------------------------------------------------------


def test_parse_range() -> None:
    assert policy.parse_range("0x100000:64M") == (0x100000, 64 * MIB)
    assert policy.parse_range("4096:4096") == (4096, 4096)
    for bad in ("abc", "0x10", "0x10:0", "1:-1", "0xzz:4K", ":4K", "1:2:3", "9" * 200 + ":1"):
        with pytest.raises(MirrorUsageError):
            policy.parse_range(bad)


def test_covered_pages_whole_ram_and_ranges() -> None:
    layout = Layout(6 * GIB, 2 * GIB)
    assert policy.covered_pages(layout, []) == ((0, 6 * GIB // PAGE),)
    # unaligned ranges take every page they touch; overlapping and adjacent ones merge
    assert policy.covered_pages(layout, [(0x1001, 10), (0x2000, PAGE), (0x2800, 2 * PAGE)]) == ((1, 4),)
    assert policy.covered_pages(layout, [(4 * GIB, PAGE), (0, PAGE)]) == ((0, 1), (2 * GIB // PAGE, 1))
    with pytest.raises(MirrorUsageError, match="crosses the hole"):
        policy.covered_pages(layout, [(2 * GIB - PAGE, 4 * GIB)])
    with pytest.raises(MirrorUsageError, match="ends outside"):
        policy.covered_pages(layout, [(8 * GIB - PAGE, 2 * PAGE)])
    with pytest.raises(MirrorUsageError, match="not in guest RAM"):
        policy.covered_pages(layout, [(3 * GIB, PAGE)])
    with pytest.raises(MirrorUsageError, match="at most"):
        policy.covered_pages(layout, [(0, PAGE)] * (policy.MAX_RANGES + 1))


runs_strategy = st.lists(st.tuples(st.integers(0, 200), st.integers(1, 20)), max_size=8).map(policy.merge)


def as_set(runs: policy.Runs) -> set[int]:
    return {p for first, count in runs for p in range(first, first + count)}


@given(runs_strategy, runs_strategy)
def test_run_arithmetic_matches_sets(a: policy.Runs, b: policy.Runs) -> None:
    assert as_set(policy.intersect(a, b)) == as_set(a) & as_set(b)
    assert as_set(policy.subtract(a, b)) == as_set(a) - as_set(b)
    for runs in (policy.intersect(a, b), policy.subtract(a, b)):
        assert list(runs) == sorted(runs) and all(c > 0 for _, c in runs)
    assert policy.merge(a + b) == policy.merge(tuple(sorted(a + b)))
    assert as_set(policy.merge(a + b)) == as_set(a) | as_set(b)


# -- a sync's plan and a repair's decision -------------------------------------------------------------


def test_plan_sync_copies_only_dirty_covered_pages_when_the_log_continues() -> None:
    covered = ((0, 10), (100, 10))
    plan = policy.plan_sync(covered, LogMark(7, 4), 7, 5, ((5, 10), (200, 1)))
    assert not plan.full and plan.runs == ((5, 5),) and plan.pages == 5


@pytest.mark.parametrize("last, domain_id, generation, reason", [
    (None, 7, 1, "first sync"),
    (LogMark(6, 4), 7, 5, "QEMU restarted"),
    (LogMark(7, 4), 7, 6, "does not follow"),   # someone else took query 5: its pages are unknown
    (LogMark(7, 4), 7, 1, "does not follow"),   # the log was restarted in the same QEMU
])
def test_plan_sync_copies_everything_covered_after_a_break(last: LogMark | None, domain_id: int, generation: int,
                                                          reason: str) -> None:
    covered = ((0, 10),)
    plan = policy.plan_sync(covered, last, domain_id, generation, ())
    assert plan.full and plan.runs == covered and reason in plan.reason


def test_repair_decision() -> None:
    covered, dirty = ((0, 100),), ((10, 5),)
    clean = policy.decide_repair(3, covered, dirty, readable=False)
    assert clean.exact and "exact" in clean.action
    stale = policy.decide_repair(12, covered, dirty, readable=False)
    assert not stale.exact and stale.dirty_since_sync and "lost" in stale.action
    predicted = policy.decide_repair(12, covered, dirty, readable=True)
    assert predicted.exact and "final sync" in predicted.action
    outside = policy.decide_repair(200, covered, dirty, readable=True)
    assert not outside.exact and "not mirrored" in outside.action


def test_interval() -> None:
    assert policy.interval_ms(100) == 100
    for bad in (0, 9, 3_600_001, True, 1.5, "100"):
        with pytest.raises(MirrorUsageError):
            policy.interval_ms(bad)


# -- the copier on real files --------------------------------------------------------------------------


def ram_file(tmp_path: Path, pages: int) -> tuple[Path, bytes]:
    data = os.urandom(pages * PAGE)
    path = tmp_path / "ram"
    path.write_bytes(data)
    return path, data


def test_copy_runs_copies_exactly_the_listed_pages_except_skipped(tmp_path: Path) -> None:
    pages = 600  # more than one CHUNK in a run
    source, data = ram_file(tmp_path, pages)
    target, token = ramsync.LocalFileTarget.create(tmp_path / "copy", pages * PAGE)
    assert (os.stat(tmp_path / "copy").st_mode & 0o777) == 0o600
    fd = ramsync.open_source(source, pages * PAGE)
    try:
        result = ramsync.copy_runs(fd, ((1, 2), (10, 500)), PAGE, target, skip=frozenset({11, 400}))
    finally:
        os.close(fd)
        target.close()
    assert result.pages == 500 and result.bytes == 500 * PAGE
    copy = (tmp_path / "copy").read_bytes()
    for page in range(pages):
        got, want = copy[page * PAGE:(page + 1) * PAGE], data[page * PAGE:(page + 1) * PAGE]
        listed = page in (1, 2) or 10 <= page < 510
        assert got == (want if listed and page not in (11, 400) else bytes(PAGE)), page
    reopened = ramsync.LocalFileTarget.open(tmp_path / "copy", token, pages * PAGE)
    assert reopened.read(PAGE, PAGE) == data[PAGE:2 * PAGE]
    reopened.close()


def test_a_missing_or_replaced_copy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "copy"
    target, token = ramsync.LocalFileTarget.create(path, 4 * PAGE)
    target.close()
    with pytest.raises(ramsync.MirrorTargetError, match="exists|cannot create"):
        ramsync.LocalFileTarget.create(path, 4 * PAGE)
    path.unlink()
    with pytest.raises(ramsync.MirrorTargetError, match="is missing"):
        ramsync.LocalFileTarget.open(path, token, 4 * PAGE)
    replaced, replaced_token = ramsync.LocalFileTarget.create(path, 4 * PAGE)
    replaced.close()
    with pytest.raises(ramsync.MirrorTargetError, match="not the mirror copy"):
        ramsync.LocalFileTarget.open(path, token, 4 * PAGE)
    token2 = replaced_token
    os.truncate(path, 8 * PAGE)
    with pytest.raises(ramsync.MirrorTargetError, match="not the mirror copy"):
        ramsync.LocalFileTarget.open(path, token2, 4 * PAGE)
    os.chmod(path, 0o644)
    with pytest.raises(ramsync.MirrorTargetError, match="private"):
        ramsync.LocalFileTarget.open(path, token2, 4 * PAGE)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ramsync.MirrorTargetError, match="cannot open"):
        ramsync.LocalFileTarget.open(link, token2, 4 * PAGE)


def test_a_short_or_missing_source_is_refused(tmp_path: Path) -> None:
    source, _ = ram_file(tmp_path, 2)
    with pytest.raises(ramsync.RamSourceError, match="at least"):
        ramsync.open_source(source, 3 * PAGE)
    with pytest.raises(ramsync.RamSourceError, match="cannot open"):
        ramsync.open_source(tmp_path / "nothing", PAGE)


# -- the CLI's input checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["ha", "inject-memory-error", "d", "--gpa", "zz"], "not an address"),
    (["ha", "inject-memory-error", "d", "--gpa=-0x10"], "negative"),
    (["ha", "mirror", "d", "--range", "0x10"], "GPA:LEN"),
    (["ha", "mirror", "d", "--stop", "--sync"], "not allowed with"),
])
def test_cli_refuses_bad_input(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "error:" in err


def test_status_and_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    from rich.console import Console

    from hvext.cli.ha import mirror_table
    from hvext.ha.mirror import Record
    record = Record("web\x1b[31m", "u-1", "/ram", "ram-node0", 512 * MIB, 512 * MIB, [[0x100000, 4096]],
                    [[256, 1]], 1000, "/copy", "00", last_sync_at=100.0, syncs=3, full_syncs=1, pages_copied=9,
                    last_repair={"gpa": "0x100000", "exact": False, "resumed": False})
    row = record.status(now=101.5)
    assert row["lag_seconds"] == 1.5 and row["covered_pages"] == 1 and row["ranges"] == ["0x100000:4096"]
    console = Console(width=200, force_terminal=False)
    with console.capture() as captured:
        console.print(mirror_table([row]))
    text = captured.get()
    assert "STALE, paused" in text and "1.5 s" in text and "3 (1 full)" in text and "\x1b[31m" not in text
    assert mirror_table([]) == "no mirrored domain"
