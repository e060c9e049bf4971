"""Hot PMEM in DRAM (C15, second half), the actor: keep the hot ranges of a VM's file-backed PMEM resident
in host DRAM and give the cold ones back to their tier.

For each pmem device of a running domain whose backing is a file on a slower tier (a disk file system or
the NVM tier directory; a backing in tmpfs, e.g. ``--volatile-backing`` in /dev/shm, already is DRAM and
is left alone), the guest's validated hints (:func:`hvext.pmem.hints.fetch`: ranges inside this domain's
devices only, offsets from the device's base in ``query-memory-devices``) give the hot ranges;
:mod:`hvext.pmem.placement_policy` decides what to keep within the DRAM budget; here
``process_madvise(pidfd, ranges, MADV_WILLNEED)`` on QEMU's mapping of the backing reads the kept ranges
into the page cache, and ``MADV_COLD`` (or ``MADV_PAGEOUT``) on the rest lets them go back to the file.

QEMU's mapping is found in ``/proc/PID/maps`` by the backing's device and inode (not only its name), and
only addresses inside it are ever advised (:func:`placement_policy.translate`). A backing that another
running domain also maps is refused: its pages would be that VM's memory too.

Why this weakens no persistence promise: these advices never change a byte of the file. ``MADV_WILLNEED``
only reads ahead. ``MADV_COLD`` only moves pages to the inactive list. ``MADV_PAGEOUT`` on a shared
file mapping unmaps the pages and reclaims page-cache pages: a clean page is dropped (the file holds the
same bytes) and a dirty one is written back to the file first, or left for writeback (reclaim outside
kswapd does not write file pages); ``POSIX_FADV_DONTNEED``, which follows it, starts writeback and drops
only clean pages nothing maps. Page cache is never discarded unwritten, so what the guest wrote is in the
file either way. Pages that another process also maps are skipped by the kernel. Epochs and freezes are the guest's
and the power-loss save's business; placement neither waits for nor changes them, and a save reads the
file through the page cache, resident or not.

Residency is measured as page-cache residency of the backing file (``mincore`` on a read-only mapping of
our own, which faults nothing in) and as ``Rss`` of QEMU's mapping (``/proc/PID/smaps``).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvext.errors import DomainNotFound, DomainStateError, HostError, HvextError, UnsupportedError
from hvext.host import Host
from hvext.memory import swap
from hvext.pmem import devices, placement_policy, virtio
from hvext.pmem.hints import Hints
from hvext.pmem.placement_policy import PAGE, VMA, DeviceInput, DevicePlan, Range, total, translate
from hvext.units import KIB

MADV_WILLNEED = 3
MADV_COLD = 20
MADV_PAGEOUT = swap.MADV_PAGEOUT
COLD_ADVICE = {"cold": MADV_COLD, "pageout": MADV_PAGEOUT}
TMPFS_MAGIC = 0x01021994
IOV_MAX = 1024
MINCORE_WINDOW = 1 << 30  # bytes of a backing mapped at a time to read its residency
_LOW_BIT = bytes(b & 1 for b in range(256))
#: How long a report waits for MADV_WILLNEED's asynchronous read-ahead before measuring residency again.
READAHEAD_WAIT_S = 2.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
MAP_FAILED = ctypes.c_void_p(-1).value


# -- what the host kernel offers --------------------------------------------------------


def madvise_support() -> dict[str, str | None]:
    """For each advice placement uses: None when ``process_madvise`` accepts it here, else why not.

    Tried on a page of our own (an anonymous mapping of this process), so nothing else is touched."""
    names = {"MADV_WILLNEED": MADV_WILLNEED, "MADV_COLD": MADV_COLD, "MADV_PAGEOUT": MADV_PAGEOUT}
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError as err:
        return {name: f"pidfd_open: {err.strerror}" for name in names}
    page = mmap.mmap(-1, PAGE)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        result: dict[str, str | None] = {}
        for name, advice in names.items():
            done = swap.process_madvise(pidfd, [(address, PAGE)], advice)
            result[name] = None if done >= 0 else \
                f"process_madvise: {errno.errorcode.get(-done, str(-done))} ({os.strerror(-done)})"
        return result
    finally:
        page.close()
        os.close(pidfd)


def on_tmpfs(path: Path | str) -> bool:
    """Whether *path* lives in tmpfs (already host memory: nothing to place)."""
    buffer = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(str(path)), buffer) != 0:
        code = ctypes.get_errno()
        raise HostError(f"statfs {path}: {os.strerror(code)}")
    return ctypes.c_long.from_buffer(buffer).value == TMPFS_MAGIC


# -- QEMU's mappings of a backing ---------------------------------------------------------


def parse_maps(text: str, dev: tuple[int, int], inode: int) -> list[VMA]:
    """The shared mappings of file (*dev* major/minor, *inode*) in the text of a ``/proc/PID/maps``."""
    found = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or "-" not in fields[0] or len(fields[1]) != 4 or fields[1][3] != "s":
            continue
        try:
            start, end = (int(x, 16) for x in fields[0].split("-", 1))
            offset = int(fields[2], 16)
            major, minor = (int(x, 16) for x in fields[3].split(":", 1))
            node = int(fields[4])
        except ValueError:
            continue
        if (major, minor) == dev and node == inode and end > start:
            found.append(VMA(start, end, offset))
    return found


def backing_vmas(pid: int, backing: Path) -> list[VMA]:
    """QEMU's shared mappings of *backing* (matched by device and inode, as a link cannot fake)."""
    fd = devices.open_backing(backing, os.O_RDONLY)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError as err:
        raise DomainStateError(f"cannot read the mappings of process {pid}: {err}") from err
    return parse_maps(text, (os.major(st.st_dev), os.minor(st.st_dev)), st.st_ino)


def mapped_rss(pid: int, vmas: list[VMA]) -> int:
    """``Rss`` of QEMU's mappings *vmas* in bytes (pages QEMU has mapped, from /proc/PID/smaps)."""
    starts = {v.start for v in vmas}
    rss, current = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                first = line.split(maxsplit=1)[0] if line.strip() else ""
                if "-" in first and not first.endswith(":"):
                    current = int(first.split("-")[0], 16) in starts
                elif current and first == "Rss:":
                    rss += int(line.split()[1]) * KIB
    except (OSError, ValueError) as err:
        raise DomainStateError(f"cannot read the mappings of process {pid}: {err}") from err
    return rss


def _resident_window(fd: int, backing: Path, start: int, span: int) -> int:
    address = _libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address in (None, MAP_FAILED):
        raise HostError(f"mmap of {backing}: {os.strerror(ctypes.get_errno())}")
    try:
        pages = -(-span // PAGE)
        vector = (ctypes.c_ubyte * pages)()
        if _libc.mincore(address, span, vector) != 0:
            raise HostError(f"mincore on {backing}: {os.strerror(ctypes.get_errno())}")
        return bytes(vector).translate(_LOW_BIT).count(1) * PAGE  # bit 0: resident; the others are undefined
    finally:
        _libc.munmap(address, span)


def resident(backing: Path, ranges: list[Range]) -> int:
    """Bytes of *ranges* of *backing* in the host page cache (``mincore`` on our own read-only mapping)."""
    ranges = [r for r in ranges if r[1] > 0]
    if not ranges:
        return 0
    fd = devices.open_backing(backing, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        count = 0
        for offset, length in ranges:
            position = offset - offset % PAGE
            end = min(offset + length, size)
            while position < end:  # a bounded window at a time: the vector is a byte per page
                span = min(end - position, MINCORE_WINDOW)
                count += _resident_window(fd, backing, position, span)
                position += span
        return count
    finally:
        os.close(fd)


# -- one domain ---------------------------------------------------------------------------


@dataclass
class Device:
    """One placeable device: its hints, QEMU's mappings of its backing, or why it is skipped."""

    backing: str
    size: int
    hot: tuple[Range, ...]
    vmas: list[VMA] = field(default_factory=list)
    skipped: str | None = None

    def input(self) -> DeviceInput:
        return DeviceInput(self.backing, self.size, self.hot)


def devices_of(pid: int, hints: Hints, shared_with_others: set[str]) -> list[Device]:
    """The domain's devices from its validated *hints*; those placement must not act on say why."""
    found = []
    for backing, device in sorted(hints.devices.items()):
        item = Device(backing, device.size, tuple(device.ranges["hot"]))
        try:
            if backing in shared_with_others:
                item.skipped = "another running domain maps this backing too: its pages are that VM's memory"
            elif on_tmpfs(backing):
                item.skipped = "backing in tmpfs: already in host memory"
            else:
                item.vmas = backing_vmas(pid, Path(backing))
                mapped = total((v.offset, v.end - v.start) for v in item.vmas)
                if not item.vmas:
                    item.skipped = f"QEMU (pid {pid}) has no shared mapping of the backing"
                elif mapped < device.size:
                    item.skipped = f"QEMU maps {mapped} bytes of the backing, the device has {device.size}"
        except (HvextError, OSError) as err:  # e.g. open_backing: the backing is not a plain file now
            item.skipped = f"{err}"[:200]
        found.append(item)
    return found


def advise(pid: int, ranges: list[Range], advice: int) -> tuple[int, str | None]:
    """``process_madvise`` *ranges* (host addresses in QEMU) with *advice*: (bytes advised, error or None)."""
    if not ranges:
        return 0, None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as err:
        raise DomainStateError(f"QEMU process {pid} is gone: {err}") from err
    done = 0
    try:
        for index in range(0, len(ranges), IOV_MAX):
            batch = ranges[index:index + IOV_MAX]
            result = swap.process_madvise(pidfd, batch, advice)
            if result < 0:
                code = -result
                if code in (errno.ENOSYS, errno.EPERM):
                    raise UnsupportedError(f"process_madvise({advice}) on process {pid}: {os.strerror(code)}")
                return done, errno.errorcode.get(code, str(code))
            done += result
    finally:
        os.close(pidfd)
    return done, None


def wait_readahead(backing: Path, keep: list[Range], settle_s: float) -> int:
    """Wait up to *settle_s* for ``MADV_WILLNEED``'s read-ahead (asynchronous) to bring *keep* in; resident bytes."""
    deadline = time.monotonic() + settle_s
    while True:
        now = resident(backing, keep)
        if now >= total(keep) or time.monotonic() >= deadline:
            return now
        time.sleep(0.05)


def measure(pid: int, device: Device, plan: DevicePlan) -> dict[str, int]:
    """Page-cache residency of the device's hot, kept and cold ranges, and QEMU's mapped Rss."""
    return {"hot_resident_bytes": resident(Path(device.backing), list(plan.hot)),
            "keep_resident_bytes": resident(Path(device.backing), list(plan.keep)),
            "cold_resident_bytes": resident(Path(device.backing), list(plan.cold)),
            "resident_bytes": resident(Path(device.backing), [(0, device.size)]),
            "mapped_rss_bytes": mapped_rss(pid, device.vmas)}


def apply(pid: int, device: Device, plan: DevicePlan, cold: str) -> dict[str, Any]:
    """WILLNEED the kept ranges and COLD/PAGEOUT the cold ones, inside QEMU's mappings of the backing."""
    keep, refused_keep = translate(plan.keep, device.vmas, device.size)
    release, refused_cold = translate(plan.cold, device.vmas, device.size)
    willneed, willneed_error = advise(pid, keep, MADV_WILLNEED)
    released, release_error = advise(pid, release, COLD_ADVICE[cold])
    if cold == "pageout" and not release_error:
        drop_cached(Path(device.backing), list(plan.cold))
    return {"willneed_bytes": willneed, "willneed_error": willneed_error, "cold_advice": cold,
            "released_bytes": released, "release_error": release_error,
            "refused_bytes": refused_keep + refused_cold}


def drop_cached(backing: Path, ranges: list[Range]) -> None:
    """``POSIX_FADV_DONTNEED`` on *ranges* of *backing*: drop their clean page-cache pages that nothing maps.

    ``MADV_PAGEOUT`` unmaps QEMU's pages, but the kernel does not always free a file page it unmapped
    (seen here with pages QEMU had mapped: unmapped, still cached). This finishes the job for those; it
    starts writeback of dirty pages and drops only clean, unmapped ones, so no data is lost either."""
    fd = devices.open_backing(backing, os.O_RDONLY)
    try:
        for offset, length in ranges:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def others_backings(host: Host, name: str) -> set[str]:
    """Backing paths of the pmem devices of the running domains other than *name* (blocking: libvirt).

    A domain that vanished meanwhile is skipped; any other failure to read one raises: placement
    cannot then know whether a backing is shared."""
    found: set[str] = set()
    for other in host.domains(include_inactive=False):
        if other.name == name:
            continue
        try:
            found.update(str(d.path) for d in devices.list_devices(other) + virtio.list_devices(other))
        except DomainNotFound:  # gone since the listing: its QEMU maps nothing any more
            continue
    return found


def domain_demand(found: list[Device], previous: placement_policy.VMState | None,
                  params: placement_policy.Params) -> int:
    """Bytes the domain's usable devices would keep without a budget."""
    return placement_policy.demand([d.input() for d in found if d.skipped is None], previous, params)


def place(name: str, pid: int, found: list[Device], share: int, previous: placement_policy.VMState | None,
          params: placement_policy.Params, *, cold: str = "cold",
          act: bool = False, settle_s: float = READAHEAD_WAIT_S,
          measured: bool = True) -> tuple[dict[str, Any], placement_policy.VMState]:
    """One round for one domain: its plan within *share*, residency before (and after, with *act*,
    having advised; the read-ahead is given up to *settle_s* to land). Without *measured*, no
    residency is read (``before``/``after`` absent): the cheapest round. Returns the report and the policy state for the next round."""
    if cold not in COLD_ADVICE:
        raise ValueError(f"cold must be one of {', '.join(COLD_ADVICE)}, not {cold!r}")
    usable = [d for d in found if d.skipped is None]
    plans, state = placement_policy.plan_vm([d.input() for d in usable], share, previous, params)
    by_backing = {d.backing: d for d in usable}
    report: dict[str, Any] = {"domain": name, "pid": pid, "share_bytes": share, "applied": act, "devices": []}
    for plan in plans:
        device = by_backing[plan.backing]
        entry = plan.to_dict() | ({"before": measure(pid, device, plan)} if measured else {})
        if act:
            entry["advice"] = apply(pid, device, plan, cold)
            if measured:
                wait_readahead(Path(device.backing), list(plan.keep), settle_s)
                entry["after"] = measure(pid, device, plan)
        report["devices"].append(entry)
    report["skipped"] = {d.backing: d.skipped for d in found if d.skipped is not None}
    return report, state
