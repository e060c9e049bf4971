"""Memory mirroring (C19), the pure decisions: guest physical addresses to RAM file offsets, mirrored
ranges, what one sync copies, and whether a repaired page is exact.

Nothing here does I/O; :mod:`hvext.ha.mirror` (the actor) and :mod:`hvext.ha.ramsync` (the copier) use it.

Address layout (x86 ``pc``/``q35``): guest RAM is one RAM block (one file) whose first
``below_4g`` bytes appear at guest physical 0 and the rest at 4 GiB (the gap below 4 GiB is the PCI
hole). QEMU 7.2 splits at ``below_4g``: q35 puts all RAM below 4 GiB when it is under 2.75 GiB and
splits at 2 GiB otherwise; i440fx (``pc``) puts all of it below when under 3.5 GiB and splits at
3 GiB otherwise (``gigabyte_align``). The actor prefers QEMU's own numbers (``qom-get`` of the PCI
host's ``below-4g-mem-size``/``above-4g-mem-size``) and falls back to those rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hvext.errors import QMPError, UsageError
from hvext.units import GIB, parse_size

FOUR_GIB = 4 * GIB
PAGE_SIZE = 4096
#: At most this many --range options (each becomes page runs in the registry).
MAX_RANGES = 64

Runs = tuple[tuple[int, int], ...]  # sorted, disjoint (first page, count) runs


class MirrorUsageError(UsageError):
    """A mirror command was given an address, range or interval it cannot use."""


@dataclass(frozen=True)
class Layout:
    """Where a guest's RAM block appears in guest physical address space."""

    ram_bytes: int
    below_4g: int

    @property
    def above_4g(self) -> int:
        return self.ram_bytes - self.below_4g

    def offset(self, gpa: int) -> int:
        """The RAM file offset of guest physical address *gpa*; MirrorUsageError outside guest RAM."""
        if isinstance(gpa, bool) or not isinstance(gpa, int) or gpa < 0:
            raise MirrorUsageError(f"guest physical address {gpa!r} is not a non-negative integer")
        if gpa < self.below_4g:
            return gpa
        if FOUR_GIB <= gpa < FOUR_GIB + self.above_4g:
            return self.below_4g + gpa - FOUR_GIB
        raise MirrorUsageError(f"guest physical address {gpa:#x} is not in guest RAM ({self.describe()})")

    def gpa(self, offset: int) -> int:
        """The guest physical address of RAM file offset *offset* (the inverse of :meth:`offset`)."""
        if not 0 <= offset < self.ram_bytes:
            raise MirrorUsageError(f"offset {offset:#x} is outside the {self.ram_bytes} bytes of guest RAM")
        return offset if offset < self.below_4g else FOUR_GIB + offset - self.below_4g

    def describe(self) -> str:
        low = f"0x0-{self.below_4g - 1:#x}"
        return low if not self.above_4g else f"{low} and {FOUR_GIB:#x}-{FOUR_GIB + self.above_4g - 1:#x}"


def default_below_4g(machine: str, ram_bytes: int) -> int:
    """QEMU 7.2's split of *ram_bytes* for machine type *machine* (``pc-q35-7.2``, ``pc-i440fx-7.2``, ``q35``,
    ``pc``) with the default ``max-ram-below-4g``."""
    if "q35" in machine:
        lowmem = 2 * GIB if ram_bytes >= 0xB0000000 else 0xB0000000
    elif machine == "pc" or machine.startswith("pc-i440fx") or machine.startswith("pc-"):
        lowmem = 3 * GIB if ram_bytes >= 0xE0000000 else 0xE0000000
    else:
        raise MirrorUsageError(f"machine type {machine!r} is not an x86 pc or q35 machine: cannot map its addresses")
    return min(ram_bytes, lowmem)


def layout_from_qemu(below: object, above: object, ram_bytes: int) -> Layout:
    """A :class:`Layout` from QEMU's ``below-4g-mem-size``/``above-4g-mem-size`` (untrusted): QMPError when they
    are not integers that add up to the RAM block's size with the low part at most 4 GiB."""
    for value in (below, above):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise QMPError(f"QEMU's RAM split is not two non-negative integers: {below!r:.40}, {above!r:.40}")
    assert isinstance(below, int) and isinstance(above, int)
    if below > FOUR_GIB or below + above != ram_bytes or below % PAGE_SIZE:
        raise QMPError(f"QEMU's RAM split {below} + {above} does not match the {ram_bytes} bytes of guest RAM")
    return Layout(ram_bytes, below)


# -- ranges -------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*:\s*(\S+)\s*$")


def parse_range(text: str) -> tuple[int, int]:
    """``GPA:LEN`` (GPA decimal or 0x hex; LEN a size such as 4096, 64K, 16M) as (gpa, length)."""
    match = _RANGE.match(text) if isinstance(text, str) and len(text) <= 100 else None
    if not match:
        raise MirrorUsageError(f"invalid range {str(text)[:100]!r}: use GPA:LEN, e.g. 0x100000:64M")
    gpa = int(match.group(1), 0)
    try:
        length = parse_size(match.group(2))
    except UsageError as err:
        raise MirrorUsageError(f"invalid range {text!r}: {err}") from None
    if length <= 0:
        raise MirrorUsageError(f"invalid range {text!r}: the length must be positive")
    return gpa, length


def merge(runs: Iterable[tuple[int, int]]) -> Runs:
    """Sorted, disjoint runs covering the union of *runs* (adjacent ones joined); empty runs dropped."""
    out: list[list[int]] = []
    for first, count in sorted(r for r in runs if r[1] > 0):
        if out and first <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], first + count - out[-1][0])
        else:
            out.append([first, count])
    return tuple((a, b) for a, b in out)


def covered_pages(layout: Layout, ranges: Sequence[tuple[int, int]], page_size: int = PAGE_SIZE) -> Runs:
    """The RAM block's pages the mirror keeps: every page (no *ranges*), or the pages touching each
    (gpa, length) range. A range must lie in one part of guest RAM (not across the hole below 4 GiB)."""
    total = layout.ram_bytes // page_size
    if not ranges:
        return ((0, total),) if total else ()
    if len(ranges) > MAX_RANGES:
        raise MirrorUsageError(f"at most {MAX_RANGES} ranges, not {len(ranges)}")
    runs = []
    for gpa, length in ranges:
        start = layout.offset(gpa)
        try:
            end = layout.offset(gpa + length - 1) + 1
        except MirrorUsageError:
            raise MirrorUsageError(f"range {gpa:#x}:{length} ends outside guest RAM ({layout.describe()})") from None
        if end - start != length:
            raise MirrorUsageError(f"range {gpa:#x}:{length} crosses the hole below 4 GiB: give two ranges")
        first = start // page_size
        runs.append((first, -(-end // page_size) - first))
    return merge(runs)


def intersect(a: Runs, b: Runs) -> Runs:
    """The pages in both run lists (each sorted and disjoint)."""
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        lo = max(a[i][0], b[j][0])
        hi = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
        if lo < hi:
            out.append((lo, hi - lo))
        if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def subtract(a: Runs, b: Runs) -> Runs:
    """The pages of *a* not in *b*."""
    out: list[tuple[int, int]] = []
    j = 0
    for first, count in a:
        pos, end = first, first + count
        while j < len(b) and b[j][0] + b[j][1] <= pos:
            j += 1
        k = j
        while pos < end and k < len(b) and b[k][0] < end:
            if b[k][0] > pos:
                out.append((pos, b[k][0] - pos))
            pos = max(pos, b[k][0] + b[k][1])
            k += 1
        if pos < end:
            out.append((pos, end - pos))
    return tuple(out)


def pages(runs: Runs) -> int:
    return sum(count for _, count in runs)


# -- one sync -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogMark:
    """The dirty log a mirror consumed last: the QEMU run (libvirt domain id) and the query's generation."""

    domain_id: int
    generation: int


@dataclass(frozen=True)
class SyncPlan:
    """What one sync copies: *runs* of the RAM block; *full* when it is every covered page (first sync, or the
    dirty log is not the continuation of the one the mirror last consumed); *reason* says why."""

    runs: Runs
    full: bool
    reason: str

    @property
    def pages(self) -> int:
        return pages(self.runs)


def plan_sync(covered: Runs, last: LogMark | None, domain_id: int, generation: int, dirty: Runs) -> SyncPlan:
    """The pages to copy after a dirty-page query *generation* in QEMU run *domain_id* that listed *dirty*.

    Only a query that directly follows the one the mirror last consumed, in the same QEMU run, proves that
    every page written since then is on *dirty*; anything else (a first sync, a restarted QEMU, a query
    someone else took in between) copies every covered page.
    """
    if last is None:
        return SyncPlan(covered, True, "first sync")
    if last.domain_id != domain_id:
        return SyncPlan(covered, True, f"QEMU restarted (domain id {last.domain_id} -> {domain_id})")
    if generation != last.generation + 1:
        return SyncPlan(covered, True, f"dirty log generation {generation} does not follow {last.generation}")
    return SyncPlan(intersect(covered, dirty), False, "dirty pages")


# -- a memory error -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepairDecision:
    """How a page with an uncorrectable error is repaired. ``exact``: the mirror holds the page as the guest
    last wrote it; otherwise the guest's writes to it since the last sync are lost (``stale``)."""

    page: int
    covered: bool
    dirty_since_sync: bool
    readable: bool

    @property
    def exact(self) -> bool:
        return self.covered and (not self.dirty_since_sync or self.readable)

    @property
    def action(self) -> str:
        if not self.covered:
            return "unrepairable: the page is not mirrored"
        if not self.dirty_since_sync:
            return "restored from the mirror (not written since the last sync: exact)"
        if self.readable:
            return "final sync of the still-readable page first, then restored (exact)"
        return "restored from the mirror's older copy: the guest's writes since the last sync are lost"


def decide_repair(page: int, covered: Runs, dirty_since_sync: Runs, readable: bool) -> RepairDecision:
    """The :class:`RepairDecision` for *page*, given what the mirror covers and what the final query listed."""
    def contains(runs: Runs) -> bool:
        return any(first <= page < first + count for first, count in runs)
    return RepairDecision(page, contains(covered), contains(dirty_since_sync), readable)


def interval_ms(value: object) -> int:
    """A sync interval in milliseconds: an integer from 10 to 3600000."""
    if isinstance(value, bool) or not isinstance(value, int) or not 10 <= value <= 3_600_000:
        raise MirrorUsageError(f"the interval must be a whole number of milliseconds from 10 to 3600000, "
                               f"not {value!r:.40}")
    return value

