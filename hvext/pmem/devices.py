"""NVDIMM devices for guests (C11): attach, detach and list through libvirt.

An NVDIMM is a ``<memory model='nvdimm' access='shared'>`` device backed by a
host file that QEMU maps into the guest's physical address space; the guest
sees ``/dev/pmem*`` and can use it with DAX (a load/store memory) or as a
block device (VPM's two forms).

virtio-pmem is not offered: Debian 12's libvirt 9.0 refuses to start a
domain that has one ("virtio-pmem memory device info is not handled yet").
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from hvext import paths
from hvext.errors import HostError, UsageError
from hvext.host import Domain
from hvext.domxml import libvirt_size
from hvext.units import GIB, KIB, MIB, format_size

#: libvirt rounds memory device sizes up to 2 MiB; the guest kernel wants
#: NVDIMM regions 16 MiB aligned for fsdax namespaces.
SIZE_ALIGN = 2 * MIB
FSDAX_ALIGN = 16 * MIB
MAX_SIZE = 64 * GIB


@dataclass(frozen=True)
class PmemDevice:
    """One persistent-memory device of a domain, as libvirt describes it."""

    model: str
    path: Path
    size: int  # bytes, including the label area
    label_size: int
    alias: str | None = None
    node: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def parse_devices(xml: str) -> list[PmemDevice]:
    """The NVDIMM devices in a domain's XML."""
    root = etree.fromstring(xml.encode())
    devices = []
    for memory in root.iterfind("devices/memory"):
        model = memory.get("model")
        if model not in ("nvdimm", "virtio-pmem"):
            continue
        size = memory.find("target/size")
        label = memory.find("target/label/size")
        node = memory.find("target/node")
        alias = memory.find("alias")
        devices.append(PmemDevice(
            model=model, path=Path(memory.findtext("source/path") or ""),
            size=libvirt_size(size.text, size.get("unit")) if size is not None else 0,
            label_size=libvirt_size(label.text, label.get("unit")) if label is not None else 0,
            alias=alias.get("name") if alias is not None else None,
            node=int(node.text) if node is not None and node.text else None,
        ))
    return devices


def device_xml(path: Path, size: int, label_size: int = 0, node: int = 0) -> str:
    """The ``<memory model='nvdimm'>`` element for a device of *size* bytes (label included)."""
    memory = etree.Element("memory", model="nvdimm", access="shared")
    etree.SubElement(etree.SubElement(memory, "source"), "path").text = str(path)
    target = etree.SubElement(memory, "target")
    etree.SubElement(target, "size", unit="KiB").text = str(size // KIB)
    etree.SubElement(target, "node").text = str(node)
    if label_size:
        label = etree.SubElement(target, "label")
        etree.SubElement(label, "size", unit="KiB").text = str(label_size // KIB)
    return etree.tostring(memory, encoding="unicode")


def validate_sizes(size: int, label_size: int) -> int:
    """Check user sizes; return the device size (usable size plus label, 2 MiB aligned)."""
    if size <= 0 or size % SIZE_ALIGN:
        raise UsageError(f"pmem size {format_size(size)} must be a positive multiple of 2 MiB "
                         f"(16 MiB multiples allow fsdax/DAX in the guest)")
    if size > MAX_SIZE:
        raise UsageError(f"pmem size {format_size(size)} is over the {format_size(MAX_SIZE)} hvext allows")
    if label_size < 0 or label_size % KIB or (label_size and label_size < 128 * KIB):
        raise UsageError("label size must be 0 (no labels) or at least 128 KiB, in whole KiB")
    total = size + label_size
    return -(-total // SIZE_ALIGN) * SIZE_ALIGN


def backing_path(path: Path | str) -> Path:
    """A user-given backing path as hvext records it: absolute (relative to the current directory,
    ``..`` folded) without following links, so the XML never holds a path that means another file
    for libvirt, QEMU or a later command."""
    text = os.fspath(path)
    if not text or "\0" in text:
        raise UsageError(f"backing path {text!r} is not a file name")
    return Path(os.path.abspath(text))


def _check_parent(path: Path) -> None:
    """Refuse a directory where another user could swap the backing for a link after hvext checked it
    (libvirt relabels the backing's target at every start)."""
    try:
        st = os.stat(path.parent)
    except FileNotFoundError:
        raise UsageError(f"directory {path.parent} for the backing file does not exist") from None
    except OSError as err:
        raise UsageError(f"directory {path.parent} for the backing file: {err.strerror}") from err
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{path.parent} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise UsageError(f"directory {path.parent} belongs to uid {st.st_uid}: that user could replace the "
                         "backing file by a link; use a directory of root's")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise UsageError(f"directory {path.parent} is writable by every user: anyone could replace the backing "
                         "file by a link; use a directory of root's")


def prepare_backing(path: Path, size: int, owner: tuple[int, int] | None = None,
                    allowed_uids: tuple[int, ...] = ()) -> bool:
    """Create a sparse backing file of *size* bytes, or check an existing one (its data is kept).

    Never through a link: a symlink, a hard-linked file, anything but a
    regular file, or a file owned by another user than root (or
    *allowed_uids*, e.g. QEMU's) is refused; the checks, the truncate and
    the chown to *owner* act on the descriptor opened with ``O_NOFOLLOW``.
    A new file is 0600 (it holds guest data). Returns whether it was
    created, so a failed attach can remove it again.
    """
    if not path.is_absolute():
        raise UsageError(f"backing {path} must be an absolute path")
    _check_parent(path)
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        created = True
    except FileExistsError:
        created = False
        fd = open_backing(path, flags)
    except OSError as err:
        raise UsageError(f"cannot create backing {path}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not created:
            if st.st_uid not in (0, os.geteuid(), *allowed_uids):
                raise UsageError(f"backing {path} belongs to uid {st.st_uid}: that user could replace it by a "
                                 "link later; copy it to a file of root's")
            if st.st_size != size:
                raise UsageError(f"backing {path} has {st.st_size} bytes; the device needs exactly {size} "
                                 "(the size plus any label area, 2 MiB aligned)")
        else:
            os.ftruncate(fd, size)
        if owner is not None:
            os.fchown(fd, *owner)  # on what was opened and checked, whatever the path names now
    except BaseException:
        if created:
            _unlink_if_same(path, fd)
        raise
    finally:
        os.close(fd)
    return created


def open_backing(path: Path, flags: int) -> int:
    """Open an existing backing file (*flags*: ``O_RDONLY`` or ``O_RDWR``) as root may: never through a
    link (``O_NOFOLLOW``), without blocking on a FIFO, and only a regular file with one name (checked on
    the descriptor). For every open of a backing by hvext: prepare, snapshot, restore."""
    try:
        st = os.lstat(path)
    except OSError as err:
        raise UsageError(f"backing {path}: {err.strerror}") from err
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(f"backing {path} is a symbolic link; give the file itself (hvext does not follow links "
                         "for files it hands to QEMU)")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"backing {path} is not a regular file")
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UsageError(f"backing {path} is a symbolic link; give the file itself") from err
        raise UsageError(f"cannot open backing {path}: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"backing {path} is not a regular file")
        if st.st_nlink != 1:
            raise UsageError(f"backing {path} has {st.st_nlink} hard links; give a file with one name")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def allocated(path: Path) -> int:
    """Bytes of storage a backing file really holds (sparse files: its blocks; tmpfs: its pages; 0 when missing)."""
    try:
        return os.stat(path, follow_symlinks=False).st_blocks * 512
    except OSError:
        return 0


def _unlink_if_same(path: Path, fd: int) -> None:
    """Remove the file hvext created at *path*, unless the name now means another file."""
    try:
        mine, now = os.fstat(fd), os.lstat(path)
        if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):
            os.unlink(path)
    except OSError:
        pass


def _default_backing(domain: Domain, existing: list[PmemDevice]) -> Path:
    used = {d.path for d in existing}
    for index in range(64):
        candidate = paths.domain_dir(domain.name) / f"pmem{index}.img"
        if candidate not in used and not candidate.exists():
            return candidate
    raise HostError(f"domain {domain.name!r} has too many pmem backing files")


def attach(domain: Domain, size: int, *, label_size: int = 0, backing: Path | None = None,
           live: bool = False) -> PmemDevice:
    """Add an NVDIMM of *size* usable bytes to the domain's definition (and, with *live*, to the running guest).

    A new backing file is created sparse; an existing one must already have the
    device's size (its contents are the guest's data and are kept).
    """
    device_size = validate_sizes(size, label_size)
    persistent = domain.is_persistent()
    active = domain.is_active()
    existing = parse_devices(domain.xml(inactive=persistent))
    if live and not active:
        raise UsageError(f"--live needs a running domain; {domain.name!r} is off (omit --live to add it "
                         "to the definition)")
    if not live and not persistent:
        raise UsageError(f"domain {domain.name!r} is transient: use --live")
    path = backing_path(backing) if backing else _default_backing(domain, existing)
    if any(d.path == path for d in existing):
        raise UsageError(f"{path} already backs a pmem device of {domain.name!r}")
    created = prepare_backing(path, device_size, allowed_uids=(domain.host.qemu_user()[0],))
    try:
        domain.attach_device(device_xml(path, device_size, label_size), config=persistent, live=live)
    except BaseException:
        if created:
            path.unlink(missing_ok=True)
        raise
    return PmemDevice("nvdimm", path, device_size, label_size, node=0)


def detach(domain: Domain, path: Path, *, live: bool = False, remove_backing: bool = False) -> PmemDevice:
    """Remove the device backed by *path* from the definition (and the running guest with *live*)."""
    persistent = domain.is_persistent()
    xml = domain.xml(inactive=persistent and not live)
    device = next((d for d in parse_devices(xml) if d.path == backing_path(path)), None)
    if device is None:
        raise UsageError(f"domain {domain.name!r} has no pmem device backed by {path}; `hvext pmem-list` shows them")
    if not live and domain.is_active():
        raise UsageError(f"domain {domain.name!r} is running: use --live (the guest must release the device), "
                         "or shut it down first")
    domain.detach_device(device_xml(device.path, device.size, device.label_size, device.node or 0),
                         config=persistent, live=live)
    if remove_backing and backing_path(device.path).is_relative_to(paths.domain_dir(domain.name)):
        os.unlink(device.path)
    return device


def list_devices(domain: Domain) -> list[PmemDevice]:
    """Devices of the running domain (live XML), or of its definition when it is off."""
    return parse_devices(domain.xml())
