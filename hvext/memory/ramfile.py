"""Guest RAM in a file the host can read and keep (the volatile-state mechanism of C7, C17, C18, C19).

A *RAM-file domain* keeps its whole boot RAM in ``VOLATILE_DIR/<domain>/ram.<host id>``
(``/dev/shm/hvext/...``), mapped by QEMU with ``share=on``: every guest write
lands in that tmpfs file, which hvext can read while the guest runs (mirroring,
dirty-data recovery) and which outlives QEMU (suspend to RAM).

How the definition expresses it (libvirt 9.0 cannot: its ``<memoryBacking>
<source type='file'/>`` file lives in qemu.conf's global ``memory_backing_dir``,
named by libvirt and deleted when QEMU stops):

* ``<qemu:commandline>`` adds ``-object memory-backend-file`` (id
  :data:`BACKEND_ID`, the file, ``share``) and a second ``-machine
  memory-backend=hvext-ram``; QEMU merges repeated ``-machine`` options, the
  last value wins, so the guest's RAM is hvext's backend and libvirt's own
  ``pc.ram`` (anonymous, never touched) stays unused;
* libvirt only puts ``memory-backend=pc.ram`` on ``-machine`` when the domain
  has no NUMA cell (with one it passes ``-numa memdev=ram-node0``, which
  cannot be overridden), so the conversion drops the NUMA cell and with it
  ``<maxMemory>``: a RAM-file domain takes no memory devices (NVDIMM,
  virtio-mem), and a domain with a swap file (C6) cannot have one.

The file is made by hvext, never by QEMU: QEMU's user owns it (0600), the
directory is root's and only passable by QEMU's group (0750), so QEMU cannot
create a missing file and a start on a lost RAM file fails instead of
booting the saved device state on zeroed memory.

Stable API for the other capabilities (C17 failover, C18 recovery, C19 mirroring):

* :func:`ram_path` (domain name, host id) -> the file; :data:`BACKEND_ID` /
  :attr:`RamFile.block_id` -> the RAM block id in QEMU (and in
  :class:`hvext.dirty.pages.DirtyPages` ``.blocks``); offsets in the file
  are guest-physical offsets within that block;
* :func:`parse` (domain XML) / :func:`of` (Domain) -> :class:`RamFile` or None;
* :func:`convert` makes a defined domain a RAM-file domain; :func:`prepare`
  creates or checks the file before a start;
* :func:`usage` -> :class:`Usage`, the VM's memory counted once;
* :func:`save_to_ram` / :func:`saved_to_ram` / :func:`start` -> C7
  (managed save of the device state only, start on the kept file);
* :func:`save_device_state` and :func:`start_on_ram_file` -> the primitive
  "start this defined domain on an existing RAM file and a device-state
  stream" (libvirt's save-image format, written with ``x-ignore-shared``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from hvext import aio, paths
from hvext.domxml import QEMU_NS, libvirt_size
from hvext.errors import DomainStateError, HostError, QMPError, UsageError
from hvext.host import Domain, Host
from hvext.memory.swap import qemu_pid
from hvext.pmem import devices
from hvext.units import KIB, MIB, format_size

#: The QEMU object id of the RAM backend, which is also its RAM block id (dirty page lists, migration).
BACKEND_ID = "hvext-ram"
FILE_PREFIX = "ram."
#: The argument that makes a QEMU start with the x-ignore-shared migration capability on, so that an
#: incoming device-state stream leaves the shared RAM alone (QEMU needs it on both sides).
IGNORE_SHARED_GLOBAL = "migration.x-ignore-shared=on"
#: Where libvirt 9.0 keeps managed save images (bytes written by a save are read from there).
LIBVIRT_SAVE_DIR = Path("/var/lib/libvirt/qemu/save")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RamFile:
    """A RAM-file domain's backend as its definition names it."""

    path: Path
    size: int
    block_id: str = BACKEND_ID

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "size": self.size, "block_id": self.block_id}


def ram_path(name: str, host_id: str) -> Path:
    """The RAM file of domain *name* on the host *host_id* (hosts of a lab share /dev/shm: one file each)."""
    if not name or "/" in name or name in (".", ".."):
        raise UsageError(f"domain name {name!r} cannot name a file")
    if not host_id or not host_id.replace("-", "").isalnum():
        raise UsageError(f"host id {host_id!r} cannot name a file")
    return paths.VOLATILE_DIR / name / f"{FILE_PREFIX}{host_id}"


def block_id() -> str:
    """The RAM block id of every RAM-file domain's guest RAM (:data:`BACKEND_ID`)."""
    return BACKEND_ID


def backend_arg(path: Path, size: int) -> str:
    """The ``-object`` value (QEMU's JSON syntax, as libvirt writes its own)."""
    return json.dumps({"qom-type": "memory-backend-file", "id": BACKEND_ID, "mem-path": str(path), "size": size,
                       "share": True}, separators=(",", ":"))


MACHINE_ARG = f"memory-backend={BACKEND_ID}"


def add_to_definition(xml: str, path: Path) -> str:
    """The definition *xml* made a RAM-file domain with its RAM in *path* (pure).

    UsageError when it cannot be one: it has one already, a swap file
    (``<memoryBacking>``), or memory devices.
    """
    root = etree.fromstring(xml.encode())
    if _backend(root) is not None:
        raise UsageError("the domain keeps its RAM in a file already (`hvext dominfo` shows it)")
    if root.find("memoryBacking") is not None:
        raise UsageError("the domain has a <memoryBacking> (a swap file, hugepages): its RAM cannot also be "
                         "in a RAM file")
    if root.find("devices/memory") is not None:
        raise UsageError("the domain has memory devices (NVDIMM, virtio-mem): a RAM-file domain has no NUMA "
                         "cell and so takes none; detach them first")
    memory = root.find("memory")
    if memory is None:
        raise HostError("the domain definition has no <memory>")
    size = libvirt_size(memory.text, memory.get("unit"))
    if size <= 0 or size % MIB:
        raise UsageError(f"memory {size} bytes is not a whole number of MiB")
    for element in root.findall("maxMemory"):
        root.remove(element)
    for numa in root.findall("cpu/numa"):
        numa.getparent().remove(numa)
    commandline = root.find(f"{{{QEMU_NS}}}commandline")
    if commandline is None:
        commandline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for value in ("-object", backend_arg(path, size), "-machine", MACHINE_ARG):
        etree.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=value)
    return etree.tostring(root, encoding="unicode")


def _backend(root: etree._Element) -> dict[str, Any] | None:
    for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        value = arg.get("value", "")
        if not value.startswith("{") or BACKEND_ID not in value:
            continue
        try:
            parsed = json.loads(value)
        except ValueError:
            continue
        if isinstance(parsed, dict) and parsed.get("id") == BACKEND_ID:
            return parsed
    return None


def _args(root: etree._Element) -> list[str]:
    return [arg.get("value", "") for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]


def parse(xml: str) -> RamFile | None:
    """The RAM file a domain's XML (live, persistent or a save image's) names; None for other domains.

    HostError for a backend hvext did not write (no absolute path, no size,
    not shared, or not the machine's memory backend).
    """
    root = etree.fromstring(xml.encode())
    backend = _backend(root)
    if backend is None:
        return None
    path, size = backend.get("mem-path"), backend.get("size")
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise HostError(f"the RAM file backend {BACKEND_ID} has no absolute mem-path: {path!r:.80}")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise HostError(f"the RAM file backend {BACKEND_ID} has no size: {size!r:.40}")
    if backend.get("share") is not True or backend.get("qom-type") != "memory-backend-file":
        raise HostError(f"the RAM file backend {BACKEND_ID} is not a shared memory-backend-file")
    if MACHINE_ARG not in _args(root):
        raise HostError(f"the RAM file backend {BACKEND_ID} is not the machine's memory (no -machine {MACHINE_ARG})")
    return RamFile(Path(os.path.normpath(path)), size)


def of(domain: Domain) -> RamFile | None:
    """The RAM file of *domain* (live XML when it runs, else its definition); None: not a RAM-file domain."""
    return parse(domain.xml())


def require(domain: Domain) -> RamFile:
    ram = of(domain)
    if ram is None:
        raise UsageError(f"domain {domain.name!r} does not keep its RAM in a file (`hvext ram-file "
                         f"{domain.name} --enable`, or `hvext define --ram-file`)")
    return ram


def convert(domain: Domain) -> RamFile:
    """Make the defined, shut-off *domain* a RAM-file domain (its next start uses the file).

    The file is created (sparse, QEMU's, 0600) before the definition changes;
    a failure removes it again.
    """
    if not domain.is_persistent():
        raise UsageError(f"domain {domain.name!r} is transient: a RAM file goes into a persistent definition")
    if domain.is_active():
        raise DomainStateError(f"domain {domain.name!r} is running; shut it down first (its RAM moves to a file "
                               "at the next start)")
    if domain.has_managed_save():
        raise DomainStateError(f"domain {domain.name!r} has a managed save image; start it or remove the image "
                               "(`virsh managedsave-remove`) first")
    path = ram_path(domain.name, domain.host.host_id)
    new_xml = add_to_definition(domain.xml(inactive=True), path)
    ram = parse(new_xml)
    assert ram is not None
    created = _prepare_file(domain.host, domain.name, ram)
    try:
        domain.redefine(new_xml)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                ram.path.unlink()
        raise
    found = parse(domain.xml(inactive=True))
    if found is None:
        raise HostError(f"libvirt dropped the RAM file backend of {domain.name!r} from its definition")
    return found


def _prepare_file(host: Host, name: str, ram: RamFile) -> bool:
    """Create (or check) the file in its private directory; whether it was created."""
    uid, gid = host.qemu_user()
    directory = ram.path.parent
    if directory != paths.VOLATILE_DIR / name:
        raise HostError(f"RAM file {ram.path} is not in hvext's directory for {name!r} ({paths.VOLATILE_DIR / name})")
    paths.volatile_dir(name, gid)
    return devices.prepare_backing(ram.path, ram.size, owner=(uid, gid), allowed_uids=(uid,))


def prepare(domain: Domain, *, fresh: bool) -> RamFile:
    """Create or check the RAM file of the (off) *domain* before a start.

    With *fresh* (a cold boot: no device state to resume), the file's old
    contents are dropped first: they are the last run's guest memory, and
    they would hold host memory the new guest has not asked for.
    """
    ram = require(domain)
    _prepare_file(domain.host, domain.name, ram)
    if fresh:
        empty(ram)
    return ram


def empty(ram: RamFile) -> None:
    """Give the file's memory back to the host (truncate to 0 and back: tmpfs frees the pages)."""
    fd = devices.open_backing(ram.path, os.O_RDWR)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, ram.size)
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    """Bytes of host memory the file holds (tmpfs pages; 0 when missing)."""
    try:
        return os.stat(path, follow_symlinks=False).st_blocks * 512
    except OSError:
        return 0


def check_file(ram: RamFile) -> None:
    """UsageError unless the RAM file exists as hvext made it (a regular file of its size, one name)."""
    try:
        fd = devices.open_backing(ram.path, os.O_RDONLY)
    except UsageError as err:
        raise UsageError(f"the RAM file is missing or unusable ({err})") from err
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size != ram.size:
        raise UsageError(f"the RAM file {ram.path} has {size} bytes, the guest's RAM is {ram.size}")


__all__ = ["BACKEND_ID", "RamFile", "add_to_definition", "allocated", "backend_arg", "block_id", "check_file",
           "convert", "empty", "of", "parse", "prepare", "ram_path", "require"]
