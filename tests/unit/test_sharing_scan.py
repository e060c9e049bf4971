"""The scanner on a real process (no VM): only resident pages are hashed, nothing is faulted in,
and the counts are those of the contents the process wrote."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from hvext.memory import sharing
from hvext.memory.sharing_policy import PAGE_SIZE, REGION_SIZE, ZERO_HASH, KSMSettings, analyse
from tests.support import require

CHILD = r"""
import mmap, sys
m = mmap.mmap(-1, 2 * 2 * 1024 * 1024, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
P = 4096
for i in range(10):
    m[i * P:(i + 1) * P] = b"A" * P            # 10 identical pages
for i in range(10, 20):
    m[i * P:(i + 1) * P] = bytes(P)            # 10 pages written with zeros: resident
m[20 * P:21 * P] = b"B" * P                     # one unique page
m[(512 + 3) * P:(512 + 4) * P] = b"A" * P       # one more A, in the second 2 MiB region
import ctypes
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
print(addr, flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def child() -> Iterator[tuple[int, int]]:
    require(os.geteuid() == 0, "reading another process's page map and kpageflags needs root")
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc.pid, int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def test_scan_hashes_resident_pages_only(child: tuple[int, int]) -> None:
    pid, start = child
    end = start + 2 * REGION_SIZE
    regions, zero_mapped = sharing.scan_mapping("p", pid, start, end)
    assert zero_mapped == 0
    assert [(r.index, len(r.hashes), r.large) for r in regions] == [(0, 21, False), (1, 1, False)]
    assert regions[0].hashes.count(ZERO_HASH) == 10
    assert len(set(regions[0].hashes)) == 3 and regions[1].hashes[0] == regions[0].hashes[0]
    # the scan read nothing that was not resident: still 22 pages
    assert len(sharing.resident_pages(pid, start, end)) == 22
    est = analyse(regions, settings=KSMSettings(max_page_sharing=256, split_frees_zero_pages=True))
    assert est.saved_pages_with_breaking == 10 + 9  # 11 As -> 10, 10 zeros -> 9 (small pages: KSM merges them)
    assert est.vms[0].resident_pages == 22 and est.to_dict()["estimated_savings_bytes"] == 19 * PAGE_SIZE


def test_ksm_stat_of_a_process_without_ksm(child: tuple[int, int]) -> None:
    pid, _ = child
    require(os.path.exists(f"/proc/{pid}/ksm_stat"), "this kernel has no /proc/PID/ksm_stat")
    stat = sharing.ksm_stat(pid)
    assert stat["ksm_merging_pages"] == 0 and "ksm_process_profit" in stat


@pytest.mark.parametrize("argv, message", [
    (["sharing", "a", "--wait", "10"], "--wait needs --apply"),
    (["sharing", "a", "a"], "named twice"),
    (["sharing", "a", "--tlb-value", "513"], "out of range"),
])
def test_cli_refuses_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from hvext.cli.main import main
    assert main(argv) == 1
    assert message in capsys.readouterr().err
