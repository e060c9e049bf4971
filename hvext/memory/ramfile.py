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
  creates or checks the file before a start, :func:`prepare_on` on another
  host (a migration's or failover's target: :func:`moved` names its file);
  :func:`release` empties the file of a stopped domain, :func:`remove`
  removes one;
* :func:`usage` -> :class:`Usage`, the VM's memory counted once;
* :func:`save_to_ram` / :func:`saved_to_ram` / :func:`start` -> C7
  (device state only into a private file, QEMU stopped, start on the kept file);
* :func:`save_device_state` and :func:`start_on_ram_file` -> the primitive
  "start this defined domain on an existing RAM file and a device-state
  stream": QEMU's migration stream with ``x-ignore-shared`` (everything but
  the shared RAM) through an ``fd:`` QEMU gets over hvext's QMP monitor
  (QEMU 7.2 has no ``file:`` URI); the destination QEMU waits with
  ``-incoming defer`` and gets the capability over QMP too (7.2 has no
  ``-global migration.x-ignore-shared``). Between the two the RAM file is
  root's (no QEMU but hvext's resume opens it); the start hands it back.

Why not libvirt's managed save: its restore sets only the migration
capabilities libvirt knows before ``migrate-incoming``, and QEMU must have
x-ignore-shared on the receiving side as well, or the stream is misread.
"""

from __future__ import annotations

import asyncio
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
from hvext.domxml import QEMU_NS, commandline_object, libvirt_size
from hvext.errors import DomainStateError, HostError, UsageError
from hvext.host import Domain, Host
from hvext.memory.swap import process_memory, qemu_pid
from hvext.pmem import devices
from hvext.units import KIB, MIB

#: The QEMU object id of the RAM backend, which is also its RAM block id (dirty page lists, migration).
BACKEND_ID = "hvext-ram"
FILE_PREFIX = "ram."

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
    return commandline_object(root, BACKEND_ID)


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


def prepare_on(host: Host, name: str, ram: RamFile) -> bool:
    """Create (or check) domain *name*'s RAM file *ram* for a QEMU on *host* (e.g. a migration's destination);
    whether it was created."""
    return _prepare_file(host, name, ram)


def moved(ram: RamFile, name: str, host_id: str) -> RamFile:
    """The same guest RAM on the host *host_id*: that host's file (a migration or failover target)."""
    return RamFile(ram_path(name, host_id), ram.size, ram.block_id)


def remove(ram: RamFile) -> None:
    """Remove a RAM file (never through a link); a missing one is fine."""
    try:
        fd = devices.open_backing(ram.path, os.O_RDONLY)
    except UsageError:
        return
    try:
        mine, now = os.fstat(fd), os.lstat(ram.path)
        if (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino):  # still the file checked, not a new link
            os.unlink(ram.path)
    except OSError:
        pass
    finally:
        os.close(fd)


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


# -- accounting: a VM's memory counted once -------------------------------------------------

@dataclass(frozen=True)
class Usage:
    """Host memory of a domain: QEMU's own (RSS without shared-memory pages) plus what its RAM file holds.

    QEMU's RSS includes the RAM file's pages it has touched (``RssShmem``), and
    the file holds them whether QEMU runs or not: adding RSS and the file
    would count a running guest twice, RSS alone would miss a suspended one
    (no QEMU) and a resuming one (QEMU has not touched its RAM yet).
    """

    state: str  # "running", "saved to RAM", or libvirt's state of an inactive domain
    private: int  # bytes
    file: int  # bytes

    @property
    def total(self) -> int:
        return self.private + self.file

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "private": self.private, "file": self.file, "total": self.total}


def process_private(pid: int) -> int:
    """Resident bytes of process *pid* that are not shared memory (``VmRSS - RssShmem`` of /proc/PID/status)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if key in ("VmRSS", "RssShmem") and len(fields) == 2 and fields[1] == "kB":
                    values[key] = int(fields[0]) * KIB
    except OSError as err:
        raise DomainStateError(f"process {pid} vanished: {err}") from err
    return max(0, values.get("VmRSS", 0) - values.get("RssShmem", 0))


def usage(domain: Domain) -> Usage:
    """*domain*'s host memory counted once, running, saved to RAM or off (see :class:`Usage`)."""
    if domain.is_active():
        ram = of(domain)
        pid = qemu_pid(domain.name)
        if ram is None:
            return Usage("running", _rss(pid), 0)
        return Usage("running", process_private(pid), devices.allocated(ram.path))
    ram = parse(domain.xml(inactive=True))
    if saved_to_ram(domain):
        return Usage(SAVED_STATE, 0, devices.allocated(ram.path) if ram else 0)
    return Usage(domain.state.value, 0, devices.allocated(ram.path) if ram else 0)


def _rss(pid: int) -> int:
    return process_memory(pid)["rss"]


# -- C7: suspend to RAM (device state only) and resume -------------------------------------

SAVED_STATE = "saved to RAM"
STATE_FD = "hvext-state"
MIGRATION_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SaveResult:
    seconds: float
    state_bytes: int  # bytes written: the device-state file
    ram_bytes: int  # guest RAM kept in the host's memory (the RAM file's pages)
    ram: RamFile
    state_file: Path

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "state_bytes": self.state_bytes, "ram_bytes": self.ram_bytes,
                "ram_file": self.ram.to_dict(), "state_file": str(self.state_file)}


def state_path(name: str, host_id: str) -> Path:
    """The private device-state file of a domain saved to RAM on host *host_id* (root's, 0600, in its state dir)."""
    ram_path(name, host_id)  # the same checks of the name and host id
    return paths.domain_dir(name) / f"ram-state.{host_id}"


def _with_args(xml: str, values: tuple[str, ...]) -> str:
    root = etree.fromstring(xml.encode())
    commandline = root.find(f"{{{QEMU_NS}}}commandline")
    if commandline is None:
        commandline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for value in values:
        etree.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=value)
    return etree.tostring(root, encoding="unicode")


INCOMING_ARGS = ("-incoming", "defer")


def with_incoming(xml: str) -> str:
    """*xml* with QEMU waiting for an incoming device-state stream (``-incoming defer``; pure).

    In that state QEMU does not copy ROM images into guest RAM at reset: the
    RAM file is left exactly as the saved guest left it.
    """
    return _with_args(xml, INCOMING_ARGS)


async def _migration_done(qmp: Any, what: str) -> None:
    deadline = time.monotonic() + MIGRATION_TIMEOUT_S
    while True:
        reply = await qmp.execute("query-migrate")
        status = reply.get("status") if isinstance(reply, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled") or not isinstance(status, str):
            error = reply.get("error-desc") if isinstance(reply, dict) else None
            raise HostError(f"{what} failed: QEMU reports {str(status)[:40]!r}"
                            + (f" ({str(error)[:200]})" if error else ""))
        if time.monotonic() > deadline:
            raise HostError(f"{what} did not finish within {MIGRATION_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.05)


async def _capability(qmp: Any, on: bool) -> None:
    await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "x-ignore-shared", "state": on}]})


async def _send_state(domain: Domain, fd: int) -> None:
    """Stream the device state (x-ignore-shared: no shared RAM) into *fd*; QEMU ends paused."""
    async with domain.qmp() as qmp:
        if not hasattr(qmp, "pass_fd"):
            raise UsageError(f"domain {domain.name!r} has no hvext QMP monitor: it cannot be saved to RAM")
        await _capability(qmp, True)
        try:
            await qmp.pass_fd(STATE_FD, fd)
            await qmp.execute("migrate", {"uri": f"fd:{STATE_FD}"})
            await _migration_done(qmp, "saving the device state")
        except BaseException:
            with contextlib.suppress(Exception):
                await qmp.execute("migrate_cancel")
            with contextlib.suppress(Exception):
                await _capability(qmp, False)
            raise


async def _receive_state(domain: Domain, fd: int) -> None:
    """Load the device state from *fd* into the QEMU waiting with ``-incoming defer``; x-ignore-shared off after."""
    async with domain.qmp() as qmp:
        if not hasattr(qmp, "pass_fd"):
            raise UsageError(f"domain {domain.name!r} has no hvext QMP monitor: it cannot resume from RAM")
        await _capability(qmp, True)
        await qmp.pass_fd(STATE_FD, fd)
        await qmp.execute("migrate-incoming", {"uri": f"fd:{STATE_FD}"})
        await _migration_done(qmp, "loading the device state")
        await _capability(qmp, False)  # a later save or live migration must send the RAM


def save_device_state(domain: Domain, target: Path, *, stop: bool = True) -> SaveResult:
    """Save only the device state of the running RAM-file *domain* into *target* and stop QEMU.

    The primitive under ``managedsave --to-ram`` (and C17/C18 later): QEMU's
    x-ignore-shared migration capability sends everything but the shared RAM
    into a file hvext opened (root's, 0600, written under a temporary name
    and renamed when complete); QEMU then stops and the RAM stays in its file,
    handed to root so that nothing but hvext's resume starts a QEMU on it (a
    plain ``virsh start`` would boot over the saved memory). A failure leaves
    the guest running and no file.

    With *stop* False QEMU stays, paused after the completed stream, and the RAM file keeps its owner:
    the caller stops it (C17 hands the state to a standby first, so libvirt's slow destroy is not in the
    guest's downtime).
    """
    domain.require_running()
    ram = require(domain)
    check_file(ram)
    was_paused = domain.state_and_reason()[0].value == "paused"
    target = Path(os.path.abspath(target))
    partial = target.with_name(f".{target.name}.part")
    started = time.monotonic()
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_uid != os.geteuid() or not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{partial} is not a file of hvext's")
        os.fchmod(fd, 0o600)
        aio.run(_send_state(domain, fd))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            partial.unlink()
        with contextlib.suppress(Exception):
            if domain.is_active() and not was_paused:
                domain.resume()
        raise
    os.close(fd)
    marker = paused_marker(target)
    try:
        if was_paused:  # virsh's managedsave restores a paused guest paused
            marker.touch(mode=0o600)
        else:
            marker.unlink(missing_ok=True)
        # in place before QEMU stops: whoever sees the domain stop (hvextd) sees it saved, and keeps the RAM file
        os.replace(partial, target)
        _fsync_dir(target.parent)
        if stop:
            _own_ram_file(ram, (0, 0))
            domain.destroy()
    except BaseException:
        with contextlib.suppress(Exception):
            if domain.is_active():
                target.unlink(missing_ok=True)
                marker.unlink(missing_ok=True)
                _own_ram_file(ram, domain.host.qemu_user())
                if not was_paused:
                    domain.resume()
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
    return SaveResult(time.monotonic() - started, os.stat(target).st_size, devices.allocated(ram.path), ram, target)


def paused_marker(state_file: Path) -> Path:
    """Beside a device-state file: present when the guest was paused at the save (it resumes paused)."""
    return state_file.with_name(state_file.name + ".paused")


def _own_ram_file(ram: RamFile, owner: tuple[int, int]) -> None:
    fd = devices.open_backing(ram.path, os.O_RDONLY)
    try:
        os.fchown(fd, *owner)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_to_ram(domain: Domain) -> SaveResult:
    """``hvext managedsave DOMAIN --to-ram``: device state to the domain's private state file, QEMU stopped,
    guest RAM kept in its file; ``hvext start`` resumes it."""
    if not domain.is_persistent():
        raise UsageError(f"domain {domain.name!r} is transient: it would be gone once saved")
    return save_device_state(domain, state_path(domain.name, domain.host.host_id))


def saved_to_ram(domain: Domain) -> bool:
    """Whether *domain* is off with its device state saved and its RAM kept (``hvext start`` resumes it)."""
    if domain.is_active():
        return False
    return os.path.lexists(state_path(domain.name, domain.host.host_id))


def state(domain: Domain) -> str:
    """The state ``list``/``dominfo`` show: libvirt's, or "saved to RAM"."""
    current = domain.state.value
    if current == "shut off" and saved_to_ram(domain):
        return SAVED_STATE
    return current


def check_resumable(ram: RamFile, name: str) -> None:
    """UsageError unless the kept RAM file can be resumed (exists, its size, holds pages)."""
    try:
        check_file(ram)
        if devices.allocated(ram.path) == 0:
            raise UsageError(f"the RAM file {ram.path} is empty (its memory was given back)")
    except UsageError as err:
        raise UsageError(f"cannot resume {name!r} from RAM: {err}. The device state is kept; `hvext managedsave-"
                         f"remove {name}` discards it for a cold boot") from err


def start_on_ram_file(domain: Domain, state_file: Path, *, paused: bool = False) -> None:
    """Start the defined, shut-off RAM-file *domain* on its existing RAM file and the device state in
    *state_file* (written by :func:`save_device_state`, here or by a peer).

    The RAM file is checked first (missing, resized or emptied: UsageError,
    nothing started). QEMU starts paused waiting for the stream (``-incoming
    defer`` for this one start: the persistent definition is put back at
    once), loads it, and runs unless *paused*. Any failure destroys the
    half-started QEMU; *state_file* and the RAM file are kept either way.
    """
    if domain.is_active():
        raise DomainStateError(f"domain {domain.name!r} is already running")
    definition = domain.xml(inactive=True)
    ram = parse(definition)
    if ram is None:
        raise UsageError(f"domain {domain.name!r} does not keep its RAM in a file")
    check_resumable(ram, domain.name)
    fd = os.open(state_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or os.fstat(fd).st_uid != os.geteuid():
            raise UsageError(f"device state {state_file} is not a file of hvext's")
        _own_ram_file(ram, domain.host.qemu_user())
        domain.redefine(with_incoming(definition))
        try:
            domain.start(paused=True)
        finally:
            domain.redefine(definition)
        try:
            aio.run(_receive_state(domain, fd))
            if not paused:
                domain.resume()
        except BaseException:
            with contextlib.suppress(Exception):
                domain.destroy()
            raise
    except BaseException:
        with contextlib.suppress(Exception):
            if not domain.is_active():
                _own_ram_file(ram, (0, 0))
        raise
    finally:
        os.close(fd)


def start(domain: Domain, *, paused: bool = False) -> str:
    """Start *domain* as ``virsh start`` does, RAM-file aware; returns "resumed from RAM" or "booted".

    Saved to RAM: resumed from its RAM file and device state, which is then
    removed. A cold boot of a RAM-file domain starts on an emptied file.
    """
    if domain.is_active():
        raise DomainStateError(f"domain {domain.name!r} is already running")
    if saved_to_ram(domain):
        target = state_path(domain.name, domain.host.host_id)
        marker = paused_marker(target)
        start_on_ram_file(domain, target, paused=paused or marker.exists())
        target.unlink()
        marker.unlink(missing_ok=True)
        return "resumed from RAM"
    if parse(domain.xml(inactive=True)) is not None:
        prepare(domain, fresh=True)
    domain.start(paused=paused)
    return "booted"


def discard(domain: Domain) -> bool:
    """Drop a saved-to-RAM domain's device state and give its RAM back (``managedsave-remove``); whether it had one."""
    if not saved_to_ram(domain):
        return False
    target = state_path(domain.name, domain.host.host_id)
    target.unlink()
    paused_marker(target).unlink(missing_ok=True)
    release(domain)
    return True


def release(domain: Domain) -> bool:
    """Give a stopped RAM-file domain's memory back to the host (not when saved to RAM); whether it did."""
    if domain.is_active() or saved_to_ram(domain):
        return False
    ram = parse(domain.xml(inactive=True))
    if ram is None or devices.allocated(ram.path) == 0:
        return False
    empty(ram)
    return True


__all__ = ["BACKEND_ID", "SAVED_STATE", "RamFile", "SaveResult", "Usage", "add_to_definition",
           "backend_arg", "block_id", "check_file", "check_resumable", "convert", "discard", "moved", "prepare_on", "remove", "empty", "of", "parse", "prepare",
           "ram_path", "release", "require", "save_device_state", "save_to_ram", "saved_to_ram", "start",
           "start_on_ram_file", "state", "state_path", "usage", "with_incoming"]
