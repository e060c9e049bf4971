"""The large-page actor's host side (C5): counts per 2 MiB from a dirty page list, DAMON's status,
and MADV_COLLAPSE through process_madvise on this very process, seen through kpageflags and smaps."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest

from hvext.dirty.pages import DirtyBlock, DirtyPages
from hvext.errors import DomainStateError
from hvext.memory import hugepages
from hvext.memory.sharing_policy import REGION_SIZE
from tests.support import require

MIB = 1 << 20


def _pages(*blocks: DirtyBlock, page_size: int = 4096) -> DirtyPages:
    return DirtyPages(page_size, 1, 1000, {b.id: b for b in blocks})


def test_region_counts_split_runs_at_region_boundaries() -> None:
    ram = DirtyBlock("pc.ram", 8 * MIB, True, 2048, ((0, 3), (510, 4), (1536, 512)))
    rom = DirtyBlock("pc.bios", 256 << 10, False, 64, ((0, 64),))
    assert hugepages.region_counts(_pages(ram, rom), 8 * MIB) == {0: 5, 1: 2, 3: 512}


def test_region_counts_needs_the_boot_ram_block() -> None:
    with pytest.raises(DomainStateError):
        hugepages.region_counts(_pages(DirtyBlock("pc.ram", 8 * MIB, True, 2048, ())), 16 * MIB)


def test_damon_status_reads_without_writing(tmp_path: Path) -> None:
    assert hugepages.damon_status(tmp_path / "none").state == "absent"
    (tmp_path / "kdamonds").mkdir()
    (tmp_path / "kdamonds" / "nr_kdamonds").write_text("0\n")
    assert hugepages.damon_status(tmp_path).state == "free"
    (tmp_path / "kdamonds" / "nr_kdamonds").write_text("1\n")
    (tmp_path / "kdamonds" / "0").mkdir()
    (tmp_path / "kdamonds" / "0" / "state").write_text("on\n")
    (tmp_path / "kdamonds" / "0" / "pid").write_text("81\n")
    status = hugepages.damon_status(tmp_path)
    assert status.state == "busy" and "kdamond 0 on (pid 81)" in status.detail


def _thp_mode() -> str:
    text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    return text[text.index("[") + 1:text.index("]")]


def test_collapse_maps_a_region_large() -> None:
    require(os.geteuid() == 0, "page frame numbers need root")
    require(_thp_mode() != "never", "transparent huge pages are off")
    area = mmap.mmap(-1, 3 * REGION_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(area))
        start = -(-base // REGION_SIZE) * REGION_SIZE  # the aligned region inside
        offset = start - base
        area.madvise(mmap.MADV_NOHUGEPAGE, 0, len(area))
        for page in range(offset, offset + REGION_SIZE, 4096):
            area[page] = 1  # 512 small pages
        area.madvise(mmap.MADV_HUGEPAGE, 0, len(area))  # MADV_NOHUGEPAGE would make COLLAPSE fail
        number = (start - base) // REGION_SIZE
        assert number not in hugepages.large_regions(os.getpid(), base, base + len(area))
        assert hugepages.collapse(os.getpid(), [start]) == [None]
        assert number in hugepages.large_regions(os.getpid(), base, base + len(area))
        assert area[offset] == 1  # content kept
        assert hugepages.anon_huge_bytes(os.getpid(), base) == REGION_SIZE
        with pytest.raises(ValueError):
            hugepages.collapse(os.getpid(), [start + 4096])
    finally:
        area.close()
