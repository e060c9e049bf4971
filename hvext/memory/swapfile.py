"""Per-VM swap files and the host's swap reservation (C6): the actor.

A domain defined with ``hvext define --swap-file`` has its guest RAM in a
file on disk that QEMU maps shared (:class:`hvext.domxml.FileMemoryBacking`):
what the host reclaims from that guest (a memtune hard limit, host memory
pressure) is written to that VM's file, not to host swap. The file is thin:
QEMU creates it sparse, and it holds blocks only where the guest's pages were
written back. The kernel also writes dirty shared pages back periodically
(``vm.dirty_expire_centisecs``), so the file grows towards the guest RAM the
guest has touched, whether or not the host is short of memory.

The host's one thick reservation file (``STATE_DIR/swap/reservation``, 0600,
allocated with ``fallocate``) gives back blocks (``FALLOC_FL_PUNCH_HOLE``) as
the VMs' files grow and takes them again when they shrink, so that the sum
stays the reservation's size (:mod:`hvext.memory.swapres_policy` decides).
Every move happens under one lock file (``reservation.lock``), so concurrent
rebalances (hvextd's loop, ``hvext swap-reservation rebalance``) never both
punch for the same growth.

Sizes come from ``FS_IOC_FIEMAP`` (the extents the file system reports, also
the preallocated "unwritten" ones that ``SEEK_DATA`` would call holes);
defragmentation is ext4's online ``EXT4_IOC_MOVE_EXT`` through ``e4defrag``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvext import durable, paths
from hvext.errors import DomainStateError, HostError, UnsupportedError, UsageError
from hvext.host import Domain, Host
from hvext.memory import balloon, swap, swapres_policy
from hvext.memory.swapres_policy import Balance, Move

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_UNWRITTEN = 0x800
FIEMAP_BATCH = 512  # extents per ioctl
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")  # logical, physical, length, 2 reserved, flags, 3 reserved
FIEMAP_MAX_LENGTH = (1 << 64) - 1

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

SWAP_DIR_NAME = "swap"
RESERVATION_NAME = "reservation"
LOCK_NAME = "reservation.lock"
MIN_RESERVATION = 1 << 20
E4DEFRAG = "e4defrag"
#: e4defrag passes at most per defragment (one more while the last still lowered the fragment count).
DEFRAG_PASSES = 3
EXT4 = "ext4"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


class FiemapError(HostError):
    """The file system's extent map could not be read, or made no sense."""


# -- extents --------------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    """One extent of a file (bytes): where it is in the file and on the device."""

    logical: int
    physical: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.logical + self.length

    @property
    def unwritten(self) -> bool:
        return bool(self.flags & FIEMAP_EXTENT_UNWRITTEN)


def fiemap_request(start: int, count: int) -> bytearray:
    """The ioctl buffer asking for *count* extents from byte *start* to the end of the file."""
    buf = bytearray(_FIEMAP_HEAD.size + count * _FIEMAP_EXTENT.size)
    _FIEMAP_HEAD.pack_into(buf, 0, start, FIEMAP_MAX_LENGTH - start, 0, 0, count, 0)
    return buf


def parse_fiemap(buf: bytes | bytearray, start: int) -> tuple[list[Extent], bool]:
    """The extents in a filled FIEMAP buffer and whether the last one is the file's last.

    Checks what the kernel returned: a count within the request, extents in
    order from *start*, not overlapping, of positive length; FiemapError otherwise.
    """
    if len(buf) < _FIEMAP_HEAD.size:
        raise FiemapError(f"FIEMAP buffer of {len(buf)} bytes is shorter than its header")
    _start, _length, _flags, mapped, requested, _reserved = _FIEMAP_HEAD.unpack_from(buf, 0)
    if mapped > requested or _FIEMAP_HEAD.size + mapped * _FIEMAP_EXTENT.size > len(buf):
        raise FiemapError(f"FIEMAP mapped {mapped} extents, {requested} asked")
    found: list[Extent] = []
    last = False
    previous_end = 0
    for index in range(mapped):
        logical, physical, length, _r1, _r2, flags, _r3, _r4, _r5 = _FIEMAP_EXTENT.unpack_from(
            buf, _FIEMAP_HEAD.size + index * _FIEMAP_EXTENT.size)
        if length == 0 or logical + length > FIEMAP_MAX_LENGTH or logical < previous_end:
            raise FiemapError(f"FIEMAP extent {index} at {logical} (+{length}) overlaps or is empty")
        if logical + length <= start:
            raise FiemapError(f"FIEMAP extent {index} at {logical} (+{length}) ends before {start}")
        found.append(Extent(logical, physical, length, flags))
        previous_end = logical + length
        if flags & FIEMAP_EXTENT_LAST:
            last = True
            if index != mapped - 1:
                raise FiemapError(f"FIEMAP extent {index} is marked last but {mapped - index - 1} follow")
    return found, last


def extents(fd: int) -> list[Extent]:
    """All extents of the open file *fd* (``FS_IOC_FIEMAP``, in batches)."""
    found: list[Extent] = []
    start = 0
    while True:
        buf = fiemap_request(start, FIEMAP_BATCH)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as err:
            if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise UnsupportedError("this file system does not report extents (FIEMAP)") from err
            raise FiemapError(f"FIEMAP failed: {err.strerror}") from err
        batch, last = parse_fiemap(buf, start)
        if found and batch and batch[0].logical < found[-1].end:  # only the first may start before *start*
            batch[0] = Extent(found[-1].end, batch[0].physical + found[-1].end - batch[0].logical,
                              batch[0].end - found[-1].end, batch[0].flags)
        found.extend(batch)
        if last or not batch:
            return found
        start = batch[-1].end


def fragments(found: list[Extent]) -> int:
    """Physically contiguous runs, as ``filefrag`` counts them (file systems cap an extent's length,
    and a sparse file's extents may follow each other on disk)."""
    runs = 0
    previous: Extent | None = None
    for extent in found:
        if previous is None or extent.physical != previous.physical + previous.length:
            runs += 1
        previous = extent
    return runs


@dataclass(frozen=True)
class FileInfo:
    """Sizes and extents of one file: apparent size, blocks allocated, how scattered."""

    path: str
    apparent: int  # st_size
    allocated: int  # the extents' bytes (FIEMAP): what the balance counts
    unwritten: int  # of which preallocated, never written
    extents: int
    fragments: int
    device: int
    block: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "apparent_bytes": self.apparent, "allocated_bytes": self.allocated,
                "unwritten_bytes": self.unwritten, "extents": self.extents, "fragments": self.fragments}


def file_info(fd: int, path: str) -> FileInfo:
    """:class:`FileInfo` of the open regular file *fd*."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise HostError(f"{path} is not a regular file")
    found = extents(fd)
    return FileInfo(path, st.st_size, sum(e.length for e in found), sum(e.length for e in found if e.unwritten),
                    len(found), fragments(found), st.st_dev, st.st_blksize)


def open_file(path: Path, flags: int = os.O_RDONLY) -> int:
    """Open *path* without following a link in its last component."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise HostError(f"{path} does not exist") from None
    except OSError as err:
        raise HostError(f"cannot open {path}: {err.strerror}") from err


def info(path: Path) -> FileInfo:
    fd = open_file(path)
    try:
        return file_info(fd, str(path))
    finally:
        os.close(fd)


def filesystem_type(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str:
    """The type of the file system holding *path* (its device's entry in mountinfo), or "unknown"."""
    dev = os.stat(path).st_dev
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[2] == wanted and " - " in line:
            return line.split(" - ", 1)[1].split()[0]
    return "unknown"


# -- a VM's file ----------------------------------------------------------

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
DEFAULT_BACKING_DIR = Path("/var/lib/libvirt/qemu/ram")
#: File systems whose files report extents (FIEMAP) and can punch holes (what the reservation needs).
PUNCHING_FILESYSTEMS = frozenset({"ext4", "xfs", "btrfs", "tmpfs", "f2fs"})


def memory_backing_dir(qemu_conf: Path = QEMU_CONF) -> Path:
    """Where libvirt puts file-backed guest RAM: qemu.conf's ``memory_backing_dir`` (or its default)."""
    try:
        lines = qemu_conf.read_text().splitlines()
    except OSError:
        return DEFAULT_BACKING_DIR
    found = DEFAULT_BACKING_DIR
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() == "memory_backing_dir":
            value = value.split("#", 1)[0].strip().strip('"')
            if value.startswith("/"):
                found = Path(value)
    return found


def existing_parent(path: Path) -> Path:
    """*path*, or its nearest ancestor that exists (to ask about the file system it will be on)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path



def guest_ram_file(pid: int, ram_bytes: int, maps: Path | None = None) -> Path:
    """The file backing guest RAM in QEMU process *pid*: its shared mapping of exactly *ram_bytes*.

    The path is checked against the mapping's device and inode (a path can
    be replaced; the mapping cannot): DomainStateError when the guest's RAM is
    not file-backed (a domain defined without ``--swap-file``).
    """
    source = maps or Path(f"/proc/{pid}/maps")
    try:
        lines = source.read_text().splitlines()
    except OSError as err:
        raise DomainStateError(f"cannot read the mappings of process {pid}: {err.strerror}") from err
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith("/") or fields[1][3:4] != "s":
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if end - start != ram_bytes or int(fields[2], 16) != 0:
            continue
        path = Path(fields[5])
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            continue  # " (deleted)" or gone
        if stat.S_ISREG(st.st_mode) and st.st_ino == int(fields[4]) and \
                (os.major(st.st_dev), os.minor(st.st_dev)) == (major, minor):
            return path
    raise DomainStateError(f"the guest RAM of process {pid} is not in a file (define the domain with --swap-file)")


def domain_file(domain: Domain) -> Path:
    """The swap file of a running domain (libvirt's memory_backing_dir/<id>-<name>/ram-node0)."""
    if not domain.is_active():
        raise DomainStateError(f"domain {domain.name!r} is not running: its swap file exists only while it runs")
    return guest_ram_file(swap.qemu_pid(domain.name), balloon.boot_memory(domain))


def mapping_residency(pid: int, path: Path) -> dict[str, int]:
    """Bytes of *path*'s mappings in process *pid* resident in host RAM (``Rss``), dirty, and in host
    swap (``Swap``: only private copies of the file's pages can be there; a shared mapping's pages go
    back to the file), from smaps. The process's other memory (QEMU's own heap, its TCG translation
    buffer) is not counted: under a cgroup limit that part can go to host swap."""
    found = {"rss": 0, "dirty": 0, "swap": 0}
    inside = False
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                fields = line.split()
                if fields and "-" in fields[0] and not fields[0].endswith(":"):
                    inside = len(fields) >= 6 and line.split(maxsplit=5)[5].rstrip("\n") == str(path)
                elif inside and len(fields) == 3 and fields[2] == "kB":
                    if fields[0] == "Rss:":
                        found["rss"] += int(fields[1]) << 10
                    elif fields[0] in ("Shared_Dirty:", "Private_Dirty:"):
                        found["dirty"] += int(fields[1]) << 10
                    elif fields[0] == "Swap:":
                        found["swap"] += int(fields[1]) << 10
    except OSError as err:
        raise DomainStateError(f"cannot read the mappings of process {pid}: {err.strerror}") from err
    return found


def domain_files(host: Host) -> dict[str, Path]:
    """The swap files of every running domain whose RAM is file-backed, by domain name."""
    found: dict[str, Path] = {}
    for domain in host.domains(include_inactive=False):
        try:
            found[domain.name] = domain_file(domain)
        except HostError:
            continue  # not file-backed, or stopped meanwhile
    return found


# -- the reservation ------------------------------------------------------


def swap_root() -> Path:
    """``STATE_DIR/swap``: the reservation file and its lock."""
    return paths.STATE_DIR / SWAP_DIR_NAME


def swap_dir() -> Path:
    """:func:`swap_root`, made (0700, root's, no link followed) if missing."""
    root = swap_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    return paths.private_dir(root)


def reservation_path() -> Path:
    return swap_root() / RESERVATION_NAME


def _fallocate(fd: int, mode: int, offset: int, length: int, what: str) -> None:
    if length <= 0:
        return
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        if code == errno.EOPNOTSUPP:
            raise UnsupportedError(f"{what}: this file system cannot {'punch holes' if mode else 'fallocate'}")
        raise HostError(f"{what}: fallocate failed: {os.strerror(code)}")


def _open_reservation(path: Path) -> int:
    """The reservation file, refused when it is not a private regular file of ours."""
    fd = open_file(path, os.O_RDWR)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        os.close(fd)
        raise HostError(f"{path} is not a private (0600) file of hvext's user; remove it and create it again")
    return fd


@contextmanager
def _locked() -> Iterator[None]:
    """The reservation's lock: every read-decide-move of the balance happens inside it."""
    with durable.locked(swap_dir() / LOCK_NAME):
        yield


def create_reservation(size: int) -> FileInfo:
    """Make the thick reservation file of *size* bytes (whole blocks; fully allocated, 0600, no link followed)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_RESERVATION:
        raise UsageError(f"a reservation needs at least {MIN_RESERVATION >> 20} MiB")
    path = reservation_path()
    with _locked():
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise UsageError(f"a reservation exists already ({path}); `hvext swap-reservation remove` first") from None
        try:
            block = os.fstat(fd).st_blksize
            size = swapres_policy.align_down(size, block)
            _fallocate(fd, 0, 0, size, str(path))
            made = file_info(fd, str(path))
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.fsync(fd)
        os.close(fd)
        durable.fsync_dir(path.parent)
    return made


def remove_reservation() -> None:
    """Delete the reservation file (its blocks go back to the file system)."""
    path = reservation_path()
    with _locked():
        fd = _open_reservation(path)  # checks it is ours before unlinking
        os.close(fd)
        path.unlink()


def _read(fd: int, files: Mapping[str, Path]) -> tuple[FileInfo, dict[str, FileInfo], list[str]]:
    """The reservation's and the VM files' figures; VM files elsewhere than the reservation are left out."""
    reservation = file_info(fd, str(reservation_path()))
    vms: dict[str, FileInfo] = {}
    notes: list[str] = []
    for name, path in sorted(files.items()):
        try:
            found = info(path)
        except HostError as err:
            notes.append(f"{name}: {err}")
            continue
        if found.device != reservation.device:
            notes.append(f"{name}: {path} is on another file system than the reservation: not balanced")
            continue
        vms[name] = found
    return reservation, vms, notes


def _balance(reservation: FileInfo, vms: Mapping[str, FileInfo]) -> Balance:
    return swapres_policy.balance(reservation.apparent, reservation.allocated,
                                  {name: f.allocated for name, f in vms.items()})


@dataclass(frozen=True)
class Report:
    """The reservation, the VM files, the balance and (after a rebalance) the move made."""

    reservation: FileInfo
    vms: dict[str, FileInfo]
    balance: Balance
    move: Move | None
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"reservation": self.reservation.to_dict(), "vms": {n: f.to_dict() for n, f in self.vms.items()},
                "balance": self.balance.to_dict(),
                "move": None if self.move is None else {"punched_bytes": self.move.punch,
                                                        "refilled_bytes": self.move.refill},
                "notes": self.notes}


def status(files: Mapping[str, Path]) -> Report:
    """The balance now (under the lock, so never half a move)."""
    with _locked():
        fd = _open_reservation(reservation_path())
        try:
            reservation, vms, notes = _read(fd, files)
        finally:
            os.close(fd)
    return Report(reservation, vms, _balance(reservation, vms), None, notes)


def _punch(fd: int, found: list[Extent], amount: int, what: str) -> None:
    """Release *amount* bytes of the reservation, from its last extents backwards."""
    for extent in reversed(found):
        if amount <= 0:
            return
        take = min(amount, extent.length)
        _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, extent.end - take, take, what)
        amount -= take


def holes(found: list[Extent], size: int) -> Iterator[tuple[int, int]]:
    """The unallocated ranges ``[start, end)`` of a file of *size* bytes with extents *found*."""
    position = 0
    for extent in found:
        if extent.logical > position:
            yield position, min(extent.logical, size)
        position = max(position, extent.end)
    if size > position:
        yield position, size


def _refill(fd: int, found: list[Extent], size: int, amount: int, what: str) -> None:
    """Allocate *amount* bytes of the reservation's holes again, from the start."""
    for start, end in holes(found, size):
        if amount <= 0:
            return
        take = min(amount, end - start)
        _fallocate(fd, 0, start, take, what)
        amount -= take


def rebalance(files: Mapping[str, Path]) -> Report:
    """Make ``reservation + sum(VM files) == total`` again by punching or refilling the reservation."""
    path = reservation_path()
    with _locked():
        fd = _open_reservation(path)
        try:
            reservation, vms, notes = _read(fd, files)
            move = swapres_policy.plan(_balance(reservation, vms), reservation.block)
            if move.punch:
                _punch(fd, extents(fd), move.punch, str(path))
            elif move.refill:
                _refill(fd, extents(fd), reservation.apparent, move.refill, str(path))
            if not move.idle:
                os.fsync(fd)
            after = file_info(fd, str(path))
        finally:
            os.close(fd)
    if move.shortfall:
        notes.append(f"the VM files hold {move.shortfall} bytes more than the reservation's total")
    return Report(after, vms, _balance(after, vms), move, notes)


# -- defragmentation ------------------------------------------------------


@dataclass(frozen=True)
class Defrag:
    before: FileInfo
    after: FileInfo
    output: str

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before.to_dict(), "after": self.after.to_dict(), "e4defrag": self.output}


def defrag_support(path: Path) -> str:
    """Why *path* cannot be defragmented online here, or "" when it can (ext4 and e4defrag)."""
    fstype = filesystem_type(path)
    if fstype != EXT4:
        return f"{path} is on {fstype}, not ext4 (online defragmentation is ext4's EXT4_IOC_MOVE_EXT)"
    if shutil.which(E4DEFRAG) is None:
        return "e4defrag is not installed (Debian package e2fsprogs)"
    return ""


#: What e4defrag prints when the kernel refuses EXT4_IOC_MOVE_EXT with EPERM.
_REFUSED = "EXT4_IOC_MOVE_EXT ioctl:Operation not permitted"


def defragment(path: Path, *, timeout: float = 600.0, passes: int = DEFRAG_PASSES) -> Defrag:
    """Run ``e4defrag`` on *path* (ext4's online ``EXT4_IOC_MOVE_EXT``) and measure its extents before and after.

    One pass moves the file into whatever free space the allocator finds at
    that moment, which can still be fragmented (blocks freed just before,
    e.g. the file's own old extents, become free only once the journal
    commits); so e4defrag runs again, up to *passes* times in all, while a
    pass still lowers the fragment count and more than one fragment is left.

    A running guest's file stays mapped by QEMU, which keeps using it while
    the extents move. The kernel here (Linux 6.18) refuses that move with
    EPERM for a file written through a shared mapping that is still mapped,
    even once every page is written back and dropped (measured on the guest's
    file, and on a plain file mapped the same way; unmapped, the same file
    defragments): that refusal is reported as UnsupportedError.
    """
    why = defrag_support(path)
    if why:
        raise UnsupportedError(why)
    before = now = info(path)
    outputs: list[str] = []
    for _ in range(max(1, passes)):
        outputs.append(_e4defrag(path, before, timeout))
        previous, now = now, info(path)
        if now.fragments <= 1 or now.fragments >= previous.fragments:
            break
        os.sync()  # the blocks this pass freed are free for the next once the journal commits
    return Defrag(before, now, "\n".join(outputs)[-2000:])


def _e4defrag(path: Path, before: FileInfo, timeout: float) -> str:
    """One e4defrag pass on *path*: its output; UnsupportedError/HostError when it fails."""
    try:
        done = subprocess.run([E4DEFRAG, "-v", "--", str(path)], capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as err:
        raise HostError(f"e4defrag {path} did not finish in {timeout:.0f} s") from err
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        if _REFUSED in output:
            raise UnsupportedError(f"the kernel refused to move the extents of {path} (EXT4_IOC_MOVE_EXT: Operation "
                                   f"not permitted; {before.fragments} fragments left as they were): this kernel "
                                   "does not defragment a file QEMU maps shared and writes")
        reason = next((line.strip() for line in output.splitlines() if "Failed" in line), output[-300:])
        raise HostError(f"e4defrag {path} failed (status {done.returncode}): {reason}")
    return output
