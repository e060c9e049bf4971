"""Hot PMEM in DRAM (C15, second half), the pure decision: which ranges of a VM's file-backed PMEM to keep
resident in host DRAM, how a per-host DRAM budget is split among VMs, and where a guest range lives in
QEMU's address space.

Input, once per round: per VM, per device (its backing file and size), the *hot* ranges the guest's hints
report, already validated by :func:`hvext.pmem.hints.validate` (offsets inside that device) -- still the
guest's word, so everything here clamps, rounds and bounds them again and never trusts their shape.

Decision per VM (:func:`plan_vm`):

* the wanted ranges are, in this order of priority, the hot ranges that were kept last round (sticky: a
  range does not lose its DRAM to a newcomer), the new hot ranges, then ranges that stopped being hot
  less than ``linger_rounds`` rounds ago (hysteresis: a range that blinks out of the hints for a round is
  not paged out and read back);
* they are kept in that order until the VM's share of the budget is used (the last one cut at a page);
* everything else of the device is *cold*: given back to its tier (``MADV_COLD``, or ``MADV_PAGEOUT``).

The budget is split max-min fairly (:func:`split_budget`): no VM gets more than it wants, and the rest
is shared evenly among those that want more -- one guest declaring its whole device hot cannot take the
others' DRAM. Nothing here performs I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PAGE = 4096
#: At most this many ranges per device are considered (hints.MAX_RANGES bounds the report already).
MAX_RANGES = 4096
DEFAULT_LINGER_ROUNDS = 2

Range = tuple[int, int]  # (offset, length) in a device, which is the offset in its backing file


def _aligned(offset: int, length: int, size: int) -> Range | None:
    """[offset, offset+length) clamped to [0, size) and widened to whole pages (never past *size*)."""
    if not isinstance(offset, int) or not isinstance(length, int) or isinstance(offset, bool) \
            or isinstance(length, bool) or length <= 0 or offset < 0 or offset >= size:
        return None
    start = offset - offset % PAGE
    end = min(size, -(-(offset + length) // PAGE) * PAGE)
    return (start, end - start) if end > start else None


def normalize(ranges: Iterable[Range], size: int) -> list[Range]:
    """Sorted, merged, page-aligned ranges inside [0, *size*); malformed ones and those past
    :data:`MAX_RANGES` are dropped."""
    cut: list[Range] = []
    for index, item in enumerate(ranges):
        if index >= MAX_RANGES:
            break
        if not isinstance(item, tuple) or len(item) != 2:
            continue
        aligned = _aligned(item[0], item[1], size)
        if aligned:
            cut.append(aligned)
    merged: list[Range] = []
    for start, length in sorted(cut):
        if merged and start <= merged[-1][0] + merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(last[0] + last[1], start + length) - last[0])
        else:
            merged.append((start, length))
    return merged


def subtract(ranges: Iterable[Range], cuts: Iterable[Range]) -> list[Range]:
    """The parts of *ranges* outside every range of *cuts* (both sorted or not; result sorted)."""
    cuts = sorted(cuts)
    result: list[Range] = []
    for start, length in sorted(ranges):
        position, end = start, start + length
        for cut_start, cut_length in cuts:
            cut_end = cut_start + cut_length
            if cut_end <= position or cut_start >= end:
                continue
            if cut_start > position:
                result.append((position, cut_start - position))
            position = max(position, cut_end)
            if position >= end:
                break
        if position < end:
            result.append((position, end - position))
    return result


def total(ranges: Iterable[Range]) -> int:
    return sum(length for _, length in ranges)


def split_budget(demands: Mapping[str, int], budget: int) -> dict[str, int]:
    """Max-min fair shares of *budget* bytes (whole pages) for VMs wanting *demands* bytes each."""
    shares = {name: 0 for name in demands}
    left = max(0, budget) // PAGE * PAGE
    names = sorted(demands, key=lambda n: (max(0, demands[n]), n))
    for index, name in enumerate(names):
        want = max(0, demands[name]) // PAGE * PAGE + (PAGE if max(0, demands[name]) % PAGE else 0)
        fair = left // (len(names) - index) // PAGE * PAGE
        shares[name] = min(want, fair)
        left -= shares[name]
    return shares


@dataclass(frozen=True)
class Params:
    """Hysteresis: a range that stops being hot stays kept for *linger_rounds* rounds (budget permitting)."""

    linger_rounds: int = DEFAULT_LINGER_ROUNDS

    def __post_init__(self) -> None:
        if not isinstance(self.linger_rounds, int) or isinstance(self.linger_rounds, bool) \
                or not 0 <= self.linger_rounds <= 1000:
            raise ValueError(f"linger_rounds must be an integer from 0 to 1000, not {self.linger_rounds!r}")


@dataclass(frozen=True)
class DevicePlan:
    """What one device's backing should look like after the round: *keep* resident, *cold* released."""

    backing: str
    size: int
    hot: tuple[Range, ...]      # what the guest reports hot now (normalized)
    keep: tuple[Range, ...]     # what stays in DRAM (hot within the share, plus lingering)
    cold: tuple[Range, ...]     # the rest of the device
    lingering: tuple[Range, ...]  # kept although no longer hot (hysteresis)
    unplaced: int               # hot bytes over the VM's share

    def to_dict(self) -> dict[str, Any]:
        return {"backing": self.backing, "size": self.size,
                "hot": [list(r) for r in self.hot], "keep": [list(r) for r in self.keep],
                "lingering": [list(r) for r in self.lingering], "cold_ranges": len(self.cold),
                "hot_bytes": total(self.hot), "keep_bytes": total(self.keep), "cold_bytes": total(self.cold),
                "unplaced_bytes": self.unplaced}


@dataclass
class VMState:
    """What a VM kept last round, per backing: ranges with their age in rounds since they were last hot."""

    kept: dict[str, list[tuple[Range, int]]] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceInput:
    backing: str
    size: int
    hot: tuple[Range, ...]


def wanted(devices: Iterable[DeviceInput], previous: VMState | None, params: Params) -> list[tuple[str, Range, int]]:
    """(backing, range, age) a VM would keep with no budget limit, in priority order."""
    previous = previous or VMState()
    sticky: list[tuple[str, Range, int]] = []
    new: list[tuple[str, Range, int]] = []
    linger: list[tuple[str, Range, int]] = []
    for device in sorted(devices, key=lambda d: d.backing):
        hot = normalize(device.hot, device.size)
        before = [(r, age) for r, age in previous.kept.get(device.backing, []) if r[0] + r[1] <= device.size]
        was = normalize((r for r, _ in before), device.size)
        for piece in subtract(hot, subtract(hot, was)):  # hot and kept before
            sticky.append((device.backing, piece, 0))
        for piece in subtract(hot, was):
            new.append((device.backing, piece, 0))
        for r, age in before:
            for piece in subtract([r], hot):
                if age + 1 <= params.linger_rounds:
                    linger.append((device.backing, piece, age + 1))
    return sticky + new + linger


def demand(devices: Iterable[DeviceInput], previous: VMState | None, params: Params) -> int:
    """Bytes the VM would keep without a budget (what :func:`split_budget` is given)."""
    return sum(r[1] for _, r, _ in wanted(devices, previous, params))


def plan_vm(devices: Iterable[DeviceInput], share: int, previous: VMState | None,
            params: Params | None = None) -> tuple[list[DevicePlan], VMState]:
    """The VM's plan within *share* bytes, and the state the next round starts from."""
    params = params or Params()
    devices = list(devices)
    left = max(0, share) // PAGE * PAGE
    kept: dict[str, list[tuple[Range, int]]] = {d.backing: [] for d in devices}
    for backing, (start, length), age in wanted(devices, previous, params):
        take = min(length, left)
        if take <= 0:
            continue
        kept[backing].append(((start, take), age))
        left -= take
    plans = []
    for device in sorted(devices, key=lambda d: d.backing):
        hot = normalize(device.hot, device.size)
        keep = normalize((r for r, _ in kept[device.backing]), device.size)
        lingering = normalize((r for r, age in kept[device.backing] if age > 0), device.size)
        plans.append(DevicePlan(device.backing, device.size, tuple(hot), tuple(keep),
                                tuple(subtract([(0, device.size)], keep)), tuple(lingering),
                                total(subtract(hot, keep))))
    return plans, VMState(kept)


# -- where a device range lives in QEMU's address space -------------------------------


@dataclass(frozen=True)
class VMA:
    """One mapping of a backing file in QEMU: [start, end) maps the file from *offset*."""

    start: int
    end: int
    offset: int


def translate(ranges: Iterable[Range], vmas: Iterable[VMA], size: int) -> tuple[list[Range], int]:
    """Host virtual (address, length) of each part of *ranges* that QEMU maps, and the bytes refused.

    A part outside [0, *size*) (the device) or not covered by one of *vmas* (QEMU's mappings of
    this device's backing) is refused: nothing outside them is ever advised."""
    vmas = sorted((v for v in vmas if v.end > v.start and v.offset >= 0), key=lambda v: v.offset)
    out: list[Range] = []
    refused = 0
    for offset, length in ranges:
        if not isinstance(offset, int) or not isinstance(length, int) or length <= 0 or offset < 0:
            refused += max(0, length) if isinstance(length, int) else 0
            continue
        inside = subtract([(offset, length)], [(size, 1 << 64)])
        refused += length - total(inside)
        for start, piece in inside:
            covered: list[Range] = []
            for vma in vmas:
                lo, hi = max(start, vma.offset), min(start + piece, vma.offset + vma.end - vma.start)
                if lo < hi:
                    out.append((vma.start + lo - vma.offset, hi - lo))
                    covered.append((lo, hi - lo))
            refused += total(subtract([(start, piece)], covered))
    return sorted(out), refused
