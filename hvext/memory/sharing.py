"""Page sharing in guest RAM (C4): scan running guests, estimate what KSM frees, let KSM merge, measure.

Scan (root): the QEMU process's guest-RAM mapping (the anonymous mapping of
exactly the boot RAM's size, :func:`hvext.memory.swap.guest_ram_mappings`);
``/proc/PID/pagemap`` says which of its 4 KiB pages are resident and their
frame numbers, ``/proc/kpageflags`` whether a frame belongs to a transparent
huge page, a KSM page or is the kernel's zero page. Only resident pages are
read (``pread`` on ``/proc/PID/mem``, one 2 MiB region at a time), so the scan
neither faults pages in nor swaps them back. The bytes read are untrusted
guest content: they are hashed and dropped, never interpreted or stored.

Apply: hvext domains keep QEMU's default ``mem-merge=on``, so guest RAM is
``MADV_MERGEABLE`` (``mg`` in the mapping's VmFlags) and turning KSM on
(``/sys/kernel/mm/ksm/run`` = 1) is all it takes. A range that is not
mergeable cannot be made so from outside: ``process_madvise`` accepts only
COLD, PAGEOUT, WILLNEED and COLLAPSE. KSM splits a large page itself when it
merges a page inside it, so the large pages worth breaking need no separate
step; the ones worth keeping cannot be kept from outside QEMU either (that
would take ``MADV_UNMERGEABLE`` on their range, by QEMU) -- see docs/sharing.md.

Measure: KSM's own state of these processes' pages (kpageflags KSM bit on
the mapped frames): pages mapped to KSM pages minus the distinct KSM pages,
plus the pages KSM replaced by the zero page (``ksm_zero_pages`` in
``/proc/PID/ksm_stat``), which is what the set of VMs no longer occupies.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvext.errors import DomainStateError, HostError, UnsupportedError
from hvext.host import Domain
from hvext.memory import balloon, swap
from hvext.memory.sharing_policy import (DEFAULT_TLB_VALUE_PAGES, PAGE_SIZE, REGION_PAGES, REGION_SIZE,
                                         KSMSettings, Region, SharingEstimate, analyse, page_hash, split_by_ksm)

KSM_DIR = Path(os.environ.get("HVEXT_KSM_DIR", "/sys/kernel/mm/ksm"))
KPAGEFLAGS = Path("/proc/kpageflags")
#: Added with the 6.12 series that also maps the zero subpages of a split anonymous THP to the zero page.
THP_SHRINK_UNDERUSED = Path("/sys/kernel/mm/transparent_hugepage/shrink_underused")
PM_PRESENT = 1 << 63
PFN_MASK = (1 << 55) - 1
KPF_KSM = 1 << 21
KPF_THP = 1 << 22
KPF_ZERO_PAGE = 1 << 24


@dataclass(frozen=True)
class Page:
    """One resident page of guest RAM: its index in the mapping and its host frame."""

    index: int
    pfn: int
    flags: int


@dataclass
class VMScan:
    """What one scan of a VM's guest RAM found (hashes only in :attr:`regions`)."""

    vm: str
    pid: int
    mappings: list[tuple[int, int]]
    mergeable: bool
    regions: list[Region]
    seconds: float
    zero_mapped: int = 0  # pages mapping the kernel's zero page at scan time (they cost nothing)


@dataclass
class ScanReport:
    scans: list[VMScan]
    estimate: SharingEstimate
    notes: list[str] = field(default_factory=list)
    applied: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = self.estimate.to_dict()
        data["domains"] = [{"name": s.vm, "pid": s.pid, "mergeable": s.mergeable, "scan_seconds": round(s.seconds, 3)}
                           for s in self.scans]
        data["notes"] = self.notes
        if self.applied is not None:
            data.update(self.applied)
        return data


# -- reading the QEMU process -------------------------------------------------


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), offset + len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def smaps_field(pid: int, start: int, field: str) -> list[str] | None:
    """The values of *field* (``"VmFlags"``, ``"AnonHugePages"``...) of the mapping starting at *start* in
    process *pid*'s smaps; None when that mapping or field is absent."""
    inside = False
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    inside = int(head.split("-")[0], 16) == start
                elif inside and head == field + ":":
                    return line.split()[1:]
    except (OSError, ValueError, IndexError) as err:
        raise DomainStateError(f"cannot read the mappings of process {pid}: {err}") from err
    return None


def mergeable(pid: int, start: int) -> bool:
    """Whether the mapping at *start* in process *pid* is MADV_MERGEABLE (``mg`` in its smaps VmFlags)."""
    return "mg" in (smaps_field(pid, start, "VmFlags") or [])


def resident_pages(pid: int, start: int, end: int) -> list[Page]:
    """The resident pages of [start, end) in process *pid*, with their kpageflags (root only)."""
    count = (end - start) // PAGE_SIZE
    try:
        fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
        try:
            raw = _pread_all(fd, count * 8, start // PAGE_SIZE * 8)
        finally:
            os.close(fd)
    except OSError as err:
        raise DomainStateError(f"cannot read the page map of process {pid}: {err}") from err
    entries = struct.unpack(f"<{len(raw) // 8}Q", raw)
    present = [(i, e & PFN_MASK) for i, e in enumerate(entries) if e & PM_PRESENT]
    if present and all(pfn == 0 for _, pfn in present):
        raise UnsupportedError("page frame numbers are hidden (not root, or no CAP_SYS_ADMIN): cannot see large pages")
    return [Page(i, pfn, flags) for (i, pfn), flags in zip(present, _kpageflags([p for _, p in present]))]


def _kpageflags(pfns: list[int]) -> list[int]:
    """kpageflags of each frame, reading runs of consecutive frames at once (large pages are such runs)."""
    flags: list[int] = []
    try:
        fd = os.open(KPAGEFLAGS, os.O_RDONLY)
    except OSError as err:
        raise UnsupportedError(f"cannot read {KPAGEFLAGS}: {err}") from err
    try:
        i = 0
        while i < len(pfns):
            j = i + 1
            while j < len(pfns) and pfns[j] == pfns[j - 1] + 1:
                j += 1
            raw = _pread_all(fd, (j - i) * 8, pfns[i] * 8)
            got = struct.unpack(f"<{len(raw) // 8}Q", raw)
            flags.extend(got)
            flags.extend([0] * (j - i - len(got)))
            i = j
    finally:
        os.close(fd)
    return flags


def scan_mapping(vm: str, pid: int, start: int, end: int, first_region: int = 0) -> tuple[list[Region], int]:
    """Hash the resident pages of one guest-RAM mapping, per 2 MiB region; and count the pages that
    map the kernel's zero page."""
    pages = resident_pages(pid, start, end)
    zero_mapped = sum(1 for p in pages if p.flags & KPF_ZERO_PAGE)
    by_region: dict[int, list[Page]] = {}
    for page in pages:
        if not page.flags & KPF_ZERO_PAGE:  # the kernel's zero page: costs nothing, KSM skips it
            by_region.setdefault(page.index // REGION_PAGES, []).append(page)
    regions = []
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    except OSError as err:
        raise DomainStateError(f"cannot open the memory of process {pid}: {err}") from err
    try:
        for number, members in sorted(by_region.items()):
            base = start + number * REGION_SIZE
            lo = members[0].index % REGION_PAGES
            hi = members[-1].index % REGION_PAGES + 1
            try:  # one read per region: the resident span (guest content, only hashed)
                data = memoryview(_pread_all(fd, (hi - lo) * PAGE_SIZE, base + lo * PAGE_SIZE))
            except OSError as err:
                raise DomainStateError(f"cannot read guest RAM of process {pid}: {err}") from err
            hashes = []
            for page in members:
                offset = (page.index % REGION_PAGES - lo) * PAGE_SIZE
                if offset + PAGE_SIZE <= len(data):
                    hashes.append(page_hash(data[offset:offset + PAGE_SIZE]))
            large = len(members) == REGION_PAGES and all(p.flags & KPF_THP for p in members) \
                and all(b.pfn == a.pfn + 1 for a, b in zip(members, members[1:]))
            regions.append(Region(vm, first_region + number, tuple(hashes), large))
    finally:
        os.close(fd)
    return regions, zero_mapped


def scan_domain(domain: Domain) -> VMScan:
    """Scan the running *domain*'s guest RAM from its QEMU process."""
    domain.require_running()
    started = time.monotonic()
    pid = swap.qemu_pid(domain.name)
    ram = balloon.boot_memory(domain)
    mappings = swap.guest_ram_mappings(pid, ram)
    regions: list[Region] = []
    zero_mapped = 0
    offset = 0  # region numbers count from the start of guest RAM, across its mappings
    for m in mappings:
        found, zeros = scan_mapping(domain.name, pid, m.start, m.end, first_region=offset // REGION_SIZE)
        regions += found
        zero_mapped += zeros
        offset += m.size
    return VMScan(domain.name, pid, [(m.start, m.end) for m in mappings],
                  all(mergeable(pid, m.start) for m in mappings), regions, time.monotonic() - started, zero_mapped)


# -- KSM ----------------------------------------------------------------------------


def ksm_read(name: str, ksm_dir: Path | None = None) -> int:
    """An integer KSM setting or counter (``run``, ``pages_sharing``, ...)."""
    path = (ksm_dir or KSM_DIR) / name
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError) as err:
        raise UnsupportedError(f"KSM is not available here ({path}: {err})") from err


def ksm_write(name: str, value: int, ksm_dir: Path | None = None) -> None:
    path = (ksm_dir or KSM_DIR) / name
    try:
        path.write_text(f"{value}\n")
    except OSError as err:
        raise HostError(f"cannot set KSM's {name} to {value} ({path}): {err}") from err


def ksm_settings(ksm_dir: Path | None = None) -> KSMSettings:
    return KSMSettings(max_page_sharing=ksm_read("max_page_sharing", ksm_dir),
                       use_zero_pages=bool(ksm_read("use_zero_pages", ksm_dir)),
                       split_frees_zero_pages=THP_SHRINK_UNDERUSED.exists())


def ksm_stat(pid: int) -> dict[str, int]:
    """``/proc/PID/ksm_stat`` (ksm_rmap_items, ksm_zero_pages, ksm_merging_pages, ksm_process_profit, ...)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/ksm_stat") as handle:
            for line in handle:
                key, _, rest = line.partition(" ")
                try:
                    values[key] = int(rest.split()[0])
                except (ValueError, IndexError):
                    continue  # "ksm_merge_any yes" and the like
    except FileNotFoundError as err:
        raise UnsupportedError(f"this kernel has no /proc/PID/ksm_stat: {err}") from err
    except OSError as err:
        raise DomainStateError(f"process {pid} vanished: {err}") from err
    return values


def measure(scans: list[VMScan]) -> dict[str, Any]:
    """What KSM has freed for these VMs since the scan: pages mapped to KSM pages minus the distinct
    KSM pages, plus the pages it replaced by the zero page (``ksm_zero_pages``), plus the zero pages
    its splits of large pages mapped to the zero page (pages mapping it now that did not at the scan)."""
    mapped = 0
    distinct: set[int] = set()
    zero = 0
    zero_mapped = 0
    resident = 0
    large = 0
    stats = {}
    still_large: list[list[Any]] = []
    for scan in scans:
        zero_mapped -= scan.zero_mapped
        offset = 0
        for start, end in scan.mappings:
            thp_per_region: dict[int, int] = {}
            for page in resident_pages(scan.pid, start, end):
                if page.flags & KPF_THP:
                    region = (offset + page.index * PAGE_SIZE) // REGION_SIZE
                    thp_per_region[region] = thp_per_region.get(region, 0) + 1
                if page.flags & KPF_KSM:
                    mapped += 1
                    distinct.add(page.pfn)
                elif page.flags & KPF_ZERO_PAGE:
                    zero_mapped += 1
                else:
                    resident += 1
                    large += bool(page.flags & KPF_THP)
            still_large += [[scan.vm, r] for r, n in thp_per_region.items() if n == REGION_PAGES]
            offset += end - start
        stat = ksm_stat(scan.pid)
        zero += stat.get("ksm_zero_pages", 0)
        stats[scan.vm] = stat
    zero_mapped = max(0, zero_mapped)
    return {"ksm_saved_bytes": (mapped - len(distinct) + zero + zero_mapped) * PAGE_SIZE,
            "ksm_merged_bytes": (mapped - len(distinct) + zero) * PAGE_SIZE,
            "split_zero_freed_bytes": zero_mapped * PAGE_SIZE,
            "ksm_mapped_pages": mapped, "ksm_pages": len(distinct), "ksm_zero_pages": zero,
            "zero_page_mapped_since_scan": zero_mapped, "resident_unmerged_pages": resident,
            "resident_large_pages": large, "large_regions_now": still_large,
            "ksm_stat": stats, "pages_sharing": ksm_read("pages_sharing"), "full_scans": ksm_read("full_scans")}


def vmstat(key: str) -> int:
    """A /proc/vmstat counter (host-wide); 0 when this kernel lacks it."""
    with open("/proc/vmstat") as handle:
        for line in handle:
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    return 0


def scan(domains: list[Domain], *, tlb_value_pages: int = DEFAULT_TLB_VALUE_PAGES) -> ScanReport:
    """Scan the domains together and estimate what KSM would free."""
    scans = [scan_domain(d) for d in domains]
    estimate = analyse([r for s in scans for r in s.regions], tlb_value_pages=tlb_value_pages,
                       settings=ksm_settings())
    notes = []
    for s in scans:
        if not s.mergeable:
            notes.append(f"{s.vm}: guest RAM is not mergeable (<nosharepages/> or mem-merge=off): KSM cannot "
                         "merge it, and process_madvise cannot make it mergeable from outside QEMU")
    return ScanReport(scans, estimate, notes)


def apply(report: ScanReport, *, wait: float | None = None,
          sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Turn KSM on for the scanned VMs (their RAM must already be mergeable); with *wait*, wait (at most
    that many seconds) until KSM has settled and add what it freed. KSM is left on; the previous
    ``run`` value is returned so that a caller can restore it."""
    refused = [s.vm for s in report.scans if not s.mergeable]
    if refused:
        raise UnsupportedError(f"guest RAM of {', '.join(refused)} is not mergeable (the domain has "
                               "<nosharepages/> or QEMU runs with mem-merge=off); process_madvise cannot "
                               "mark it MADV_MERGEABLE, restart the domain without them")
    previous = ksm_read("run")
    if previous != 1:
        ksm_write("run", 1)
    result: dict[str, Any] = {"ksm_run_previous": previous, "ksm_run": 1}
    if wait is not None:
        result.update(wait_settled(report.scans, wait, sleep=sleep))
        # large pages the estimate counts as split by KSM but still whole: the kernel failed to split
        # them (see thp_split_failed_while_waiting), so KSM freed less than estimated
        expected = split_by_ksm([r for s in report.scans for r in s.regions])
        now = {(vm, index) for vm, index in result.pop("large_regions_now")}
        result["large_pages_left_unsplit"] = len(expected & now)
    return result


def wait_settled(scans: list[VMScan], timeout: float, *,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Wait until KSM has done three full scans since now and the VMs' savings stopped moving (0.5 %)
    between two looks at least one full scan apart."""
    deadline = time.monotonic() + timeout
    split_failed = vmstat("thp_split_page_failed")
    started_scans = ksm_read("full_scans")
    last = measure(scans)
    seen_scans = started_scans
    settled = False
    while time.monotonic() < deadline:
        sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        full = ksm_read("full_scans")
        if full == seen_scans:
            continue
        seen_scans = full
        now = measure(scans)
        stable = abs(now["ksm_saved_bytes"] - last["ksm_saved_bytes"]) <= 0.005 * max(now["ksm_saved_bytes"], 1)
        last = now
        if full - started_scans >= 3 and stable:
            settled = True
            break
    last["ksm_settled"] = settled
    # host-wide: large pages the kernel failed to split meanwhile (KSM then cannot merge in them)
    last["thp_split_failed_while_waiting"] = vmstat("thp_split_page_failed") - split_failed
    last["ksm_full_scans_waited"] = seen_scans - started_scans
    return last
