"""Large-page priority (C5), the actor: count accesses per 2 MiB of a running guest's RAM, see what is
mapped large, and map the hottest candidates large with ``MADV_COLLAPSE``.

Counting: the issue names two sources, DAMON on the QEMU process or dirty page
lists. DAMON's sysfs interface is global and allows no new kdamond while any
runs (writing ``nr_kdamonds`` fails with EBUSY); on this host a kdamond that
hvext did not create monitors physical memory from boot, so DAMON cannot be
used here without stopping someone else's -- :func:`damon_status` says so and
``hvext doctor`` shows it. The host kernel has neither page_idle nor soft-dirty
bits. What counts here is therefore the patched QEMU's dirty page list
(:class:`hvext.dirty.pages.DirtyLog`): the 4 KiB pages of the boot-RAM block
*written* per interval, summed per 2 MiB region (reads are not seen).

Large pages: a region is mapped large when all its 512 pages are resident,
consecutive frames, with the kpageflags THP bit (read as in
:mod:`hvext.memory.sharing`); ``AnonHugePages`` of the guest-RAM mapping in
``/proc/PID/smaps`` gives the total.

Apply: ``process_madvise(pidfd, [region], MADV_COLLAPSE)`` per chosen region
(one call each, so the result of each is known); the kernel collapses
synchronously, independently of the THP sysfs mode (not with ``never``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvext.dirty.pages import DirtyPages
from hvext.errors import DomainStateError, HostError, UnsupportedError
from hvext.memory import sharing, swap
from hvext.memory.hugepage_policy import REGION_PAGES, Plan, Scores
from hvext.memory.sharing_policy import PAGE_SIZE, REGION_SIZE

DAMON_ADMIN = Path(os.environ.get("HVEXT_DAMON_ADMIN", "/sys/kernel/mm/damon/admin"))
MADV_COLLAPSE = 25


# -- DAMON availability -------------------------------------------------------------


@dataclass(frozen=True)
class DamonStatus:
    state: str  # "absent", "busy" (kdamonds hvext did not create exist) or "free"
    detail: str


def damon_status(admin: Path | None = None) -> DamonStatus:
    """Whether DAMON's sysfs interface is there and free for a kdamond of ours (nothing is written)."""
    root = admin or DAMON_ADMIN
    try:
        count = int((root / "kdamonds" / "nr_kdamonds").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DamonStatus("absent", f"no {root}/kdamonds/nr_kdamonds (kernel without CONFIG_DAMON_SYSFS)")
    if count == 0:
        return DamonStatus("free", "no kdamond configured")
    running = []
    for number in range(count):
        base = root / "kdamonds" / str(number)
        try:
            state = (base / "state").read_text().strip()
            pid = (base / "pid").read_text().strip()
        except OSError:
            state, pid = "?", "?"
        running.append(f"kdamond {number} {state} (pid {pid})")
    return DamonStatus("busy", f"{count} kdamond(s) not created by hvext: {', '.join(running)}; DAMON's sysfs "
                               "allows no new one while one runs, and hvext does not touch others'")


# -- what is mapped large -----------------------------------------------------------


def large_regions(pid: int, start: int, end: int) -> set[int]:
    """Indexes of the 2 MiB regions of [start, end) mapped by one transparent huge page (root only)."""
    by_region: dict[int, list[sharing.Page]] = {}
    for page in sharing.resident_pages(pid, start, end):
        by_region.setdefault(page.index // REGION_PAGES, []).append(page)
    return {number for number, members in by_region.items()
            if len(members) == REGION_PAGES and all(p.flags & sharing.KPF_THP for p in members)
            and all(b.pfn == a.pfn + 1 for a, b in zip(members, members[1:]))}


def anon_huge_bytes(pid: int, start: int) -> int:
    """``AnonHugePages`` of the mapping starting at *start* in process *pid*, in bytes."""
    values = sharing.smaps_field(pid, start, "AnonHugePages")
    try:
        return int(values[0]) * 1024 if values else 0
    except ValueError as err:
        raise DomainStateError(f"cannot read the mappings of process {pid}: AnonHugePages {values}") from err


# -- counting -----------------------------------------------------------------------


def region_counts(pages: DirtyPages, ram_bytes: int) -> dict[int, int]:
    """Written 4 KiB pages per 2 MiB region of the boot-RAM block (the one block of *ram_bytes*)."""
    blocks = [b for b in pages.blocks.values() if b.length == ram_bytes]
    if len(blocks) != 1:
        raise DomainStateError(f"expected one RAM block of {ram_bytes} bytes in the dirty page list, "
                               f"found {len(blocks)}")
    if pages.page_size != PAGE_SIZE:
        raise UnsupportedError(f"dirty pages of {pages.page_size} bytes; large-page priority expects {PAGE_SIZE}")
    counts: dict[int, int] = {}
    for first, count in blocks[0].runs:
        page = first
        while page < first + count:
            index = page // REGION_PAGES
            upto = min(first + count, (index + 1) * REGION_PAGES)
            counts[index] = counts.get(index, 0) + upto - page
            page = upto
    return counts


# -- one guest ----------------------------------------------------------------------


@dataclass
class Snapshot:
    """The state after one interval: this interval's counts, the scores, what is large."""

    domain: str
    interval: int
    counts: dict[int, int]
    ranked: list[tuple[int, float]]
    large: set[int]
    regions: int
    anon_huge_bytes: int
    source: str
    applied: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        shown = self.ranked if top is None else self.ranked[:top]
        return {"domain": self.domain, "interval": self.interval, "source": self.source,
                "regions": self.regions, "large_regions": len(self.large),
                "anon_huge_bytes": self.anon_huge_bytes, "written_pages": sum(self.counts.values()),
                "candidates": [{"region": index, "offset": index * REGION_SIZE, "score": round(score, 3),
                                "written": self.counts.get(index, 0), "large": index in self.large}
                               for index, score in shown],
                "large": sorted(self.large), "applied": self.applied, "notes": self.notes}


class GuestRAM:
    """The guest-RAM mapping of one running domain's QEMU process (one mapping: one NUMA cell)."""

    def __init__(self, name: str, pid: int, ram_bytes: int) -> None:
        mappings = swap.guest_ram_mappings(pid, ram_bytes)
        if len(mappings) != 1:
            raise UnsupportedError(f"{len(mappings)} guest-RAM mappings of {ram_bytes} bytes in process {pid}; "
                                   "large-page priority handles one")
        self.name, self.pid, self.ram_bytes = name, pid, ram_bytes
        self.start, self.end = mappings[0].start, mappings[0].end

    @property
    def regions(self) -> int:
        return self.ram_bytes // REGION_SIZE

    def large(self) -> set[int]:
        return large_regions(self.pid, self.start, self.end)

    def snapshot(self, scores: Scores, counts: dict[int, int], source: str) -> Snapshot:
        return Snapshot(self.name, scores.intervals, counts, scores.ranked(), self.large(), self.regions,
                        anon_huge_bytes(self.pid, self.start), source)

    def collapse(self, plan: Plan) -> dict[str, Any]:
        """``MADV_COLLAPSE`` each chosen region; then which really are large now."""
        results = collapse(self.pid, [self.start + index * REGION_SIZE for index in plan.collapse])
        now = self.large()
        return plan.to_dict() | {
            "results": [{"region": index, "error": results[i], "large": index in now}
                        for i, index in enumerate(plan.collapse)],
            "collapsed": sorted(index for index in plan.collapse if index in now)}


# -- process_madvise(MADV_COLLAPSE) ---------------------------------------------------


def collapse(pid: int, addresses: Iterable[int]) -> list[str | None]:
    """``process_madvise(MADV_COLLAPSE)`` on each 2 MiB region at *addresses* in process *pid*: None
    where it succeeded, else the errno name (EAGAIN, ENOMEM, EINVAL...)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as err:
        raise DomainStateError(f"cannot open process {pid}: {err}") from err
    results: list[str | None] = []
    try:
        for address in addresses:
            if address % REGION_SIZE:
                raise ValueError(f"region address {address:#x} is not 2 MiB aligned")
            done = swap.process_madvise(pidfd, [(address, REGION_SIZE)], MADV_COLLAPSE)
            if done < 0:
                code = -done
                if code in (errno.ENOSYS, errno.EPERM):
                    raise HostError(f"process_madvise(MADV_COLLAPSE) on process {pid}: {os.strerror(code)}")
                results.append(errno.errorcode.get(code, str(code)))
            else:
                results.append(None)
    finally:
        os.close(pidfd)
    return results
