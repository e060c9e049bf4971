"""Page sharing estimate (pure): what KSM would reclaim, with and without breaking large pages (C4).

Input: per 2 MiB region of each VM's guest RAM, the hashes of its *resident*
4 KiB pages (pages the host has not populated, or has swapped out, cost no RAM
and KSM does not scan them) and whether the region is mapped by one large
(2 MiB) page. Output: counts per VM and the bytes KSM would free.

KSM's own rules, modelled here:

* identical pages are merged into one write-protected KSM page; a group of
  *n* identical pages frees ``n - ceil(n / max_page_sharing)`` pages, because a
  KSM page has at most ``max_page_sharing`` sharers (then a second copy, a
  "dup" of the chain, is made);
* zero-filled pages merge like any other, unless ``use_zero_pages`` is set:
  then each is replaced by the kernel's zero page and all *n* are freed;
* KSM merges a page inside a large page only by splitting that large page
  (``try_to_merge_one_page`` calls ``split_huge_page``), which costs TLB reach;
* since Linux 6.12 a split maps the zero-filled 4 KiB pages of an anonymous
  large page to the kernel's zero page and frees them (the same series added
  ``/sys/kernel/mm/transparent_hugepage/shrink_underused``), so breaking a
  large page frees all its zero pages, without KSM merging them. Measured on
  two guests: every zero page of the split large pages went this way.

A large page's sharing gain is the number of its pages that have a duplicate
anywhere in the set; it is worth breaking when that exceeds the TLB value
threshold (in pages). Nothing here performs I/O.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hvext.errors import UsageError

PAGE_SIZE = 4096
REGION_PAGES = 512  # 4 KiB pages per 2 MiB region
REGION_SIZE = PAGE_SIZE * REGION_PAGES
DEFAULT_TLB_VALUE_PAGES = 64  # a large page is kept unless breaking it frees more than this many pages


def page_hash(data: bytes | memoryview) -> int:
    """64-bit hash of one page's content (blake2b; the content itself is never interpreted)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


ZERO_HASH = page_hash(bytes(PAGE_SIZE))


@dataclass(frozen=True)
class Region:
    """One 2 MiB region of a VM's guest RAM."""

    vm: str
    index: int  # region number from the start of guest RAM
    hashes: tuple[int, ...]  # one per resident 4 KiB page (absent and swapped-out pages left out)
    large: bool  # mapped by one 2 MiB page on the host

    def __post_init__(self) -> None:
        if len(self.hashes) > REGION_PAGES:
            raise UsageError(f"region {self.index} of {self.vm!r} has {len(self.hashes)} pages, at most "
                             f"{REGION_PAGES}")


@dataclass(frozen=True)
class KSMSettings:
    """The KSM knobs that change what merging frees (/sys/kernel/mm/ksm)."""

    max_page_sharing: int = 256
    use_zero_pages: bool = False
    split_frees_zero_pages: bool = True  # the kernel maps zero subpages to the zero page when splitting

    def __post_init__(self) -> None:
        if self.max_page_sharing < 2:
            raise UsageError(f"max_page_sharing must be at least 2, not {self.max_page_sharing}")


@dataclass(frozen=True)
class VMSharing:
    """Counts (in 4 KiB pages) for one VM."""

    vm: str
    resident_pages: int
    zero_pages: int  # resident, zero-filled
    shareable_within: int  # non-zero pages that duplicate another page of the same VM (one copy per group kept)
    shareable_with_others: int  # the kept copies above whose content another VM of the set also holds
    regions: int
    large_regions: int


@dataclass(frozen=True)
class BreakChoice:
    vm: str
    index: int
    gain_pages: int


@dataclass(frozen=True)
class SharingEstimate:
    """The estimate for a set of VMs scanned together."""

    vms: tuple[VMSharing, ...]
    saved_pages_without_breaking: int  # only pages outside large pages merge
    saved_pages_with_breaking: int  # every resident page may merge (what KSM does on its own)
    saved_pages_policy: int  # pages outside large pages, plus the large pages chosen to break
    to_break: tuple[BreakChoice, ...]
    kept_large: int
    tlb_value_pages: int
    settings: KSMSettings = field(default_factory=KSMSettings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vms": [vars(v) for v in self.vms],
            "page_size": PAGE_SIZE,
            "estimated_savings_bytes": self.saved_pages_with_breaking * PAGE_SIZE,
            "estimated_savings_without_breaking_bytes": self.saved_pages_without_breaking * PAGE_SIZE,
            "estimated_savings_policy_bytes": self.saved_pages_policy * PAGE_SIZE,
            "large_pages_to_break": [vars(b) for b in self.to_break],
            "large_pages_kept": self.kept_large,
            "tlb_value_pages": self.tlb_value_pages,
            "ksm": vars(self.settings),
        }


def group_saving(count: int, max_page_sharing: int) -> int:
    """Pages freed when *count* identical pages are merged: one KSM page per ``max_page_sharing`` sharers."""
    if count < 2:
        return 0
    return count - -(-count // max_page_sharing)


def saved_pages(counts: Counter[int], settings: KSMSettings) -> int:
    """Pages KSM frees for pages of these contents (hash -> number of resident pages that may merge)."""
    total = 0
    for digest, count in counts.items():
        if digest == ZERO_HASH and settings.use_zero_pages:
            total += count
        else:
            total += group_saving(count, settings.max_page_sharing)
    return total


def _counts(regions: Iterable[Region]) -> Counter[int]:
    counts: Counter[int] = Counter()
    for region in regions:
        counts.update(region.hashes)
    return counts


def split_by_ksm(regions: list[Region]) -> set[tuple[str, int]]:
    """The large regions KSM will split: those holding a page with a duplicate anywhere in the set."""
    counts = _counts(regions)
    return {(r.vm, r.index) for r in regions if r.large and any(counts[h] > 1 for h in r.hashes)}


def merged_saving(mergeable: list[Region], settings: KSMSettings) -> int:
    """Pages freed when the pages of *mergeable* regions may merge; those regions that are large
    are split by KSM (when anything in them merges), which frees their zero pages on its own."""
    counts = _counts(mergeable)
    freed_by_split = 0
    if settings.split_frees_zero_pages:
        for region in mergeable:
            if region.large and any(counts[h] > 1 for h in region.hashes):
                zeros = region.hashes.count(ZERO_HASH)
                freed_by_split += zeros
                counts[ZERO_HASH] -= zeros
    return freed_by_split + saved_pages(counts, settings)


def analyse(regions: Iterable[Region], *, tlb_value_pages: int = DEFAULT_TLB_VALUE_PAGES,
            settings: KSMSettings | None = None) -> SharingEstimate:
    """Estimate sharing for the VMs the regions belong to (scanned together: cross-VM pages count)."""
    if tlb_value_pages < 0 or tlb_value_pages > REGION_PAGES:
        raise UsageError(f"the TLB value threshold must be 0 to {REGION_PAGES} pages, not {tlb_value_pages}")
    settings = settings or KSMSettings()
    regions = list(regions)
    everything = _counts(regions)
    per_vm: dict[str, Counter[int]] = defaultdict(Counter)
    for region in regions:
        per_vm[region.vm].update(region.hashes)
    vms = []
    for vm, counts in per_vm.items():
        within = sum(n - 1 for h, n in counts.items() if h != ZERO_HASH)
        others = sum(1 for h, n in counts.items() if h != ZERO_HASH and everything[h] > n)
        mine = [r for r in regions if r.vm == vm]
        vms.append(VMSharing(vm, resident_pages=sum(counts.values()), zero_pages=counts[ZERO_HASH],
                             shareable_within=within, shareable_with_others=others, regions=len(mine),
                             large_regions=sum(r.large for r in mine)))
    small = [r for r in regions if not r.large]
    choices = []
    for region in regions:
        if region.large:
            gain = sum(1 for h in region.hashes if everything[h] > 1 or (
                h == ZERO_HASH and (settings.use_zero_pages or settings.split_frees_zero_pages)))
            if gain > tlb_value_pages:
                choices.append(BreakChoice(region.vm, region.index, gain))
    broken = {(c.vm, c.index) for c in choices}
    chosen = small + [r for r in regions if (r.vm, r.index) in broken]
    return SharingEstimate(
        vms=tuple(sorted(vms, key=lambda v: v.vm)),
        saved_pages_without_breaking=merged_saving(small, settings),
        saved_pages_with_breaking=merged_saving(regions, settings),
        saved_pages_policy=merged_saving(chosen, settings),
        to_break=tuple(choices), kept_large=sum(r.large for r in regions) - len(choices),
        tlb_value_pages=tlb_value_pages, settings=settings)
