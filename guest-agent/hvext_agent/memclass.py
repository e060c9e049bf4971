"""Guest memory usage classes (C2): how many pages the guest has in each class.

The classes partition ``MemTotal`` (the RAM the guest kernel manages; pages
inflated into the balloon are already outside it). Each class comes from the
kernel's own counters in /proc/meminfo, never as "total minus the rest", so
``unaccounted = MemTotal - sum(classes)`` is a real check of the partition:

=================  ==========================================================
free               MemFree + free pages cached on per-CPU lists (their
                   ``count:`` in /proc/zoneinfo; MemFree leaves them out)
page_cache_clean   file LRU pages (Active(file) + Inactive(file)) that are
                   not dirty: dropped for free
page_cache_dirty   Dirty + Writeback + WritebackTmp (capped at the file LRU):
                   written back before they can go
anon_active        private anonymous pages on the active list
anon_inactive      private anonymous pages on the inactive list
shmem              Shmem: tmpfs, SysV/POSIX shared memory, shared anonymous
                   mappings (swap-backed like anon, but file-like)
swap_cached        SwapCached: anon pages that also have a copy in swap
unevictable        Unevictable: mlocked pages, ramfs, SHM_LOCKed segments
slab_reclaimable   KReclaimable: reclaimable slab (dentries, inodes) and other
                   kernel memory shrinkers can free
kernel             SUnreclaim + KernelStack + PageTables + SecPageTables +
                   Percpu + vmalloc pages other than kernel stacks (from
                   /proc/vmallocinfo, else VmallocUsed - KernelStack)
hugetlb            Hugetlb: preallocated huge pages
unaccounted        MemTotal - the sum of the above (direct page allocations of
                   drivers, per-CPU free lists, pages in flight; small)
=================  ==========================================================

The anonymous LRU (Active(anon) + Inactive(anon)) holds private anon, shmem
and swap cache; meminfo does not say how shmem and swap cache divide between
its active and inactive lists. /proc/kpageflags does: a scan of the page
flags (all pages up to ``KPAGEFLAGS_FULL_SCAN`` page frames, evenly spaced
blocks beyond) measures the share of private anonymous pages that are active,
and that share splits the private anon count. Without kpageflags (not root,
or the multi-generational LRU, whose pages carry no active flag) the split
assumes shmem and swap cache lie on both lists in proportion to their sizes.

PMEM/DAX memory lies outside MemTotal and is reported apart: pmem block
device capacity, space used on DAX-mounted file systems, and the extent of
file mappings of DAX files (deduplicated per file).

Periodic reporting: a request with ``interval`` starts a sampler thread that
keeps the last sample with its timestamp; ``cached`` requests return it
without sampling again. The sampler stops when nobody asked for a sample for
``IDLE_STOP_INTERVALS`` intervals.

Standard library only (runs in the guest).
"""

from __future__ import annotations

import array
import collections
import os
import re
import threading
import time
from typing import Any

SCHEMA_VERSION = 1
CLASSES = ("free", "page_cache_clean", "page_cache_dirty", "anon_active", "anon_inactive", "shmem",
           "swap_cached", "unevictable", "slab_reclaimable", "kernel", "hugetlb")
KERNEL_PARTS = ("SUnreclaim", "KernelStack", "PageTables", "SecPageTables", "Percpu")

#: Page frames read whole from /proc/kpageflags (4 GiB of 4 KiB pages: ~0.3 s per GiB under TCG).
KPAGEFLAGS_FULL_SCAN = 1 << 20
#: Beyond that: this many evenly spaced blocks of KPAGEFLAGS_BLOCK pages.
KPAGEFLAGS_SAMPLES = 2048
KPAGEFLAGS_BLOCK = 128

KPF_DIRTY, KPF_LRU, KPF_ACTIVE, KPF_ANON, KPF_SWAPCACHE, KPF_SWAPBACKED = 4, 5, 6, 12, 13, 14
KPF_COMPOUND_TAIL, KPF_UNEVICTABLE, KPF_NOPAGE = 16, 18, 20
_KPF_MASK = sum(1 << b for b in (KPF_LRU, KPF_ACTIVE, KPF_ANON, KPF_SWAPCACHE, KPF_UNEVICTABLE,
                                 KPF_COMPOUND_TAIL, KPF_NOPAGE))
_PRIVATE_ANON = (1 << KPF_LRU) | (1 << KPF_ANON)

#: Kernel functions whose vmalloc areas are kernel stacks (already in KernelStack).
STACK_CALLERS = ("kernel_clone", "copy_process", "dup_task_struct", "alloc_thread_stack_node")

#: The counters are read again (up to CONSISTENT_READS times, REREAD_PAUSE_S apart) while the classes
#: miss more than CONSISTENT_SHARE of MemTotal: pages in flight (free page reporting takes up to 32
#: blocks of 512 or 1024 free pages off the free lists while the host discards them) are in no counter
#: and come back within moments. A guest that stays inconsistent is reported as read the last time.
CONSISTENT_SHARE = 0.03
CONSISTENT_READS = 5
REREAD_PAUSE_S = 0.1
MEMINFO = "/proc/meminfo"

MIN_INTERVAL_S = 0.5
MAX_INTERVAL_S = 3600.0
IDLE_STOP_INTERVALS = 30


def read_kv(path: str) -> dict[str, int]:
    """``Key: value [kB]`` or ``key value`` lines as ints (meminfo values stay in kB)."""
    values: dict[str, int] = {}
    with open(path) as handle:
        for line in handle:
            parts = line.replace(":", " ", 1).split()
            if len(parts) >= 2 and parts[1].isdigit():
                values[parts[0]] = int(parts[1])
    return values


def vmalloc_pages(path: str = "/proc/vmallocinfo") -> tuple[int, int] | None:
    """(pages backing vmalloc areas, of which kernel stacks), or None when unreadable.

    ioremap and vmap areas map pages counted elsewhere (or no RAM at all) and
    carry no ``pages=``; only ``vmalloc`` areas allocate their pages.
    """
    total = stacks = 0
    try:
        with open(path) as handle:
            for line in handle:
                match = re.search(r" pages=(\d+)", line)
                if not match or " vmalloc" not in line:
                    continue
                pages = int(match.group(1))
                total += pages
                fields = line.split()
                if len(fields) > 2 and fields[2].split("+", 1)[0] in STACK_CALLERS:
                    stacks += pages
    except OSError:
        return None
    return total, stacks


def mglru_enabled(path: str = "/sys/kernel/mm/lru_gen/enabled") -> bool:
    try:
        with open(path) as handle:
            return int(handle.read().strip(), 16) & 1 == 1
    except (OSError, ValueError):
        return False


def scan_kpageflags(path: str = "/proc/kpageflags", *, frames: int | None = None) -> dict[str, Any]:
    """Counts of private anonymous LRU pages (active / inactive) from the page flags.

    Reads every frame up to KPAGEFLAGS_FULL_SCAN, else KPAGEFLAGS_SAMPLES evenly
    spaced blocks (the counts are then scaled to all frames).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        if frames is None:
            frames = os.fstat(fd).st_size // 8 or _max_pfn()
        counts: collections.Counter[int] = collections.Counter()
        scanned = 0
        if frames <= KPAGEFLAGS_FULL_SCAN:
            mode = "full"
            offsets = [(0, frames)]
        else:
            mode = "sampled"
            step = frames // KPAGEFLAGS_SAMPLES
            offsets = [(i * step, KPAGEFLAGS_BLOCK) for i in range(KPAGEFLAGS_SAMPLES)]
        for first, count in offsets:
            done = 0
            while done < count:
                want = min(count - done, 1 << 17)
                data = os.pread(fd, want * 8, (first + done) * 8)
                if not data:
                    break
                flags = array.array("Q")
                flags.frombytes(data[: len(data) // 8 * 8])
                counts.update(map(_KPF_MASK.__and__, flags))
                done += len(flags)
                scanned += len(flags)
            if done < count and mode == "full":
                break
    finally:
        os.close(fd)
    active = inactive = 0
    for flags, n in counts.items():
        if flags & _PRIVATE_ANON == _PRIVATE_ANON and not flags & (
                (1 << KPF_SWAPCACHE) | (1 << KPF_UNEVICTABLE) | (1 << KPF_COMPOUND_TAIL) | (1 << KPF_NOPAGE)):
            if flags & (1 << KPF_ACTIVE):
                active += n
            else:
                inactive += n
    return {"mode": mode, "frames": frames, "scanned": scanned,
            "private_anon_active": active, "private_anon_inactive": inactive}


def _max_pfn(path: str = "/proc/zoneinfo") -> int:
    """One past the highest page frame of any zone (kpageflags reports size 0)."""
    end = 0
    start = spanned = 0
    with open(path) as handle:
        for line in handle:
            words = line.split()
            if len(words) == 2 and words[0] == "spanned":
                spanned = int(words[1])
            elif len(words) == 2 and words[0] == "start_pfn:":
                start = int(words[1])
                end = max(end, start + spanned)
    return end


def _pmem(page_size: int) -> dict[str, int]:
    """PMEM/DAX figures in pages (outside MemTotal)."""
    device_bytes = 0
    block = "/sys/block"
    for name in sorted(os.listdir(block)) if os.path.isdir(block) else []:
        if name.startswith("pmem"):
            try:
                with open(f"{block}/{name}/size") as handle:
                    device_bytes += int(handle.read()) * 512
            except (OSError, ValueError):
                continue
    dax_devices: set[int] = set()
    used_bytes = 0
    try:
        with open("/proc/mounts") as handle:
            mounts = [line.split()[:4] for line in handle]
    except OSError:
        mounts = []
    for source, target, _fstype, options in mounts:
        if not source.startswith("/dev/pmem") or not {"dax", "dax=always"} & set(options.split(",")):
            continue
        try:
            stat = os.statvfs(target)
            used_bytes += (stat.f_blocks - stat.f_bfree) * stat.f_frsize
            dax_devices.add(os.stat(target).st_dev)
        except OSError:
            continue
    mapped = _dax_mapped_bytes(dax_devices) if dax_devices else 0
    return {"devices": device_bytes // page_size, "dax_fs_used": used_bytes // page_size,
            "dax_mapped": mapped // page_size}


def _dax_mapped_bytes(devices: set[int]) -> int:
    """Extent of file mappings of files on DAX file systems, the union per file."""
    wanted = {(os.major(d), os.minor(d)) for d in devices}
    ranges: dict[tuple[str, int], list[tuple[int, int]]] = collections.defaultdict(list)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as handle:
                lines = handle.readlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 6:
                continue
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            if (major, minor) not in wanted:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            offset = int(fields[2], 16)
            ranges[(fields[3], int(fields[4]))].append((offset, offset + end - start))
    total = 0
    for spans in ranges.values():
        spans.sort()
        cur_start, cur_end = spans[0]
        for start, end in spans[1:]:
            if start > cur_end:
                total += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        total += cur_end - cur_start
    return total


def pcp_free_pages(path: str = "/proc/zoneinfo") -> int:
    """Free pages held on the per-CPU lists of every zone (the ``count:`` lines of the pagesets)."""
    total = 0
    try:
        with open(path) as handle:
            for line in handle:
                words = line.split()
                if len(words) == 2 and words[0] == "count:" and words[1].isdigit():
                    total += int(words[1])
    except OSError:
        return 0
    return total


def compute(meminfo_kb: dict[str, int], page_size: int, *, vmalloc: tuple[int, int] | None,
            anon_flags: dict[str, Any] | None, pcp_free: int = 0) -> dict[str, Any]:
    """The classes (pages) from meminfo (kB), vmalloc and per-CPU free pages, and a kpageflags scan."""
    kb_per_page = page_size // 1024

    def pages(key: str) -> int:
        return meminfo_kb.get(key, 0) // kb_per_page

    file_lru = pages("Active(file)") + pages("Inactive(file)")
    dirty = min(file_lru, pages("Dirty") + pages("Writeback") + pages("WritebackTmp"))
    anon_lru_active, anon_lru_inactive = pages("Active(anon)"), pages("Inactive(anon)")
    anon_lru = anon_lru_active + anon_lru_inactive
    shmem = min(pages("Shmem"), anon_lru)
    swap_cached = min(pages("SwapCached"), anon_lru - shmem)
    private = anon_lru - shmem - swap_cached
    split = "proportional"
    flagged = None
    if anon_flags is not None:
        flagged = anon_flags["private_anon_active"] + anon_flags["private_anon_inactive"]
    if flagged:
        assert anon_flags is not None
        active = round(private * anon_flags["private_anon_active"] / flagged)
        split = "kpageflags"
    elif anon_lru:
        active = round(private * anon_lru_active / anon_lru)
    else:
        active = 0
    if vmalloc is not None:
        vmalloc_other = max(0, vmalloc[0] - vmalloc[1])
        vmalloc_source = "vmallocinfo"
    else:  # x86-64 distribution kernels map kernel stacks with vmalloc (CONFIG_VMAP_STACK)
        vmalloc_other = max(0, pages("VmallocUsed") - pages("KernelStack"))
        vmalloc_source = "VmallocUsed-KernelStack"
    kernel_parts = {key: pages(key) for key in KERNEL_PARTS}
    kernel_parts["vmalloc"] = vmalloc_other
    hugetlb = pages("Hugetlb") if "Hugetlb" in meminfo_kb else \
        meminfo_kb.get("HugePages_Total", 0) * meminfo_kb.get("Hugepagesize", 0) // (page_size // 1024 or 1)
    classes = {
        "free": pages("MemFree") + pcp_free,
        "page_cache_clean": file_lru - dirty,
        "page_cache_dirty": dirty,
        "anon_active": active,
        "anon_inactive": private - active,
        "shmem": shmem,
        "swap_cached": swap_cached,
        "unevictable": pages("Unevictable"),
        "slab_reclaimable": pages("KReclaimable") or pages("SReclaimable"),
        "kernel": sum(kernel_parts.values()),
        "hugetlb": hugetlb,
    }
    total = pages("MemTotal")
    return {
        "total": total,
        "classes": classes,
        "unaccounted": total - sum(classes.values()),
        "details": {"kernel": kernel_parts, "anon_split": split, "vmalloc_source": vmalloc_source,
                    "file_lru": file_lru, "anon_lru": anon_lru, "pcp_free": pcp_free},
    }


def sample(*, kpageflags: bool = True) -> dict[str, Any]:
    """One sample of every class (pages), with how it was measured.

    The slow kpageflags scan (it gives only the active/inactive split of private anon) comes first;
    the counters that make the partition (meminfo, vmallocinfo, the per-CPU free lists) are then read
    back to back, again while they disagree by more than CONSISTENT_SHARE (``details.reads``).
    """
    started = time.monotonic()
    page_size = os.sysconf("SC_PAGE_SIZE")
    vmstat = read_kv("/proc/vmstat")
    anon_flags = None
    kpf: dict[str, Any] = {"mode": "off"}
    if kpageflags:
        if mglru_enabled():
            kpf = {"mode": "unused", "reason": "multi-generational LRU: pages carry no active flag"}
        else:
            try:
                anon_flags = scan_kpageflags()
                kpf = dict(anon_flags)
            except OSError as err:
                kpf = {"mode": "unavailable", "reason": f"{err.strerror or err}"}
    reads = 0
    while True:
        meminfo = read_kv(MEMINFO)
        result = compute(meminfo, page_size, vmalloc=vmalloc_pages(), anon_flags=anon_flags,
                         pcp_free=pcp_free_pages())
        reads += 1
        if reads >= CONSISTENT_READS or abs(result["unaccounted"]) <= CONSISTENT_SHARE * result["total"]:
            break
        time.sleep(REREAD_PAUSE_S)
    result["details"]["kpageflags"] = kpf
    result["details"]["reads"] = reads
    result.update({
        "version": SCHEMA_VERSION,
        "page_size": page_size,
        "pmem": _pmem(page_size),
        "ballooned": max(0, vmstat.get("balloon_inflate", 0) - vmstat.get("balloon_deflate", 0)),
        "sampled_at": time.time(),
        "sampled_monotonic": started,
        "sample_ms": round((time.monotonic() - started) * 1000, 1),
    })
    return result


class Sampler:
    """Samples in a background thread and keeps the last sample (periodic reporting)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last: dict[str, Any] | None = None
        self.interval: float | None = None
        self.last_request = time.monotonic()
        self.thread: threading.Thread | None = None
        self.wake = threading.Event()

    def configure(self, interval: float | None) -> None:
        """Note a request; start, retime (interval > 0) or stop (0) the periodic sampler."""
        with self.lock:
            self.last_request = time.monotonic()
            if interval is None or (interval or None) == self.interval:
                return
            self.interval = interval or None
            if self.interval and (self.thread is None or not self.thread.is_alive()):
                self.thread = threading.Thread(target=self._run, name="memclass-sampler", daemon=True)
                self.thread.start()
            self.wake.set()  # retime (or stop) now

    def _run(self) -> None:
        while True:
            with self.lock:
                interval = self.interval
                idle = time.monotonic() - self.last_request
                if interval is None or idle > IDLE_STOP_INTERVALS * interval:
                    self.interval = None
                    self.thread = None
                    return
            began = time.monotonic()
            fresh = sample()
            with self.lock:
                self.last = fresh
            self.wake.clear()
            self.wake.wait(max(0.0, interval - (time.monotonic() - began)))  # fixed rate

    def get(self, *, cached: bool, max_age: float | None) -> dict[str, Any]:
        """The cached sample when asked for and fresh enough, else a new one (which is cached)."""
        with self.lock:
            last = self.last
            interval = self.interval
        if cached and last is not None and (max_age is None
                                            or time.monotonic() - last["sampled_monotonic"] <= max_age):
            source = last
        else:
            source = sample()
            with self.lock:
                self.last = source
        result = dict(source)
        result["age_s"] = round(max(0.0, time.monotonic() - source["sampled_monotonic"]), 3)
        result["periodic_interval_s"] = interval
        return result


SAMPLER = Sampler()


def _number(args: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value == 0 or low <= value <= high):
        raise ValueError(f"{key} must be 0 or a number from {low} to {high}")
    return float(value)


def cmd_memclass(args: dict[str, Any]) -> dict[str, Any]:
    """Agent command: page counts per class.

    args: ``interval`` (s; starts periodic sampling, 0 stops it), ``cached``
    (return the periodic sampler's last sample instead of sampling now),
    ``max_age`` (s; a cached sample older than this is replaced),
    ``kpageflags`` (false: skip the page-flag scan for a one-off sample).
    """
    interval = _number(args, "interval", MIN_INTERVAL_S, MAX_INTERVAL_S)
    max_age = _number(args, "max_age", 0.0, MAX_INTERVAL_S * 2)
    cached = args.get("cached", False)
    use_flags = args.get("kpageflags", True)
    if not isinstance(cached, bool) or not isinstance(use_flags, bool):
        raise TypeError("cached and kpageflags must be booleans")
    SAMPLER.configure(interval)
    if not use_flags and not cached:
        result = sample(kpageflags=False)
        result.update(age_s=0.0, periodic_interval_s=SAMPLER.interval)
    else:
        result = SAMPLER.get(cached=cached, max_age=max_age)
    result.pop("sampled_monotonic", None)
    return result
