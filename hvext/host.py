"""Host (a libvirt connection and its inventory) and Domain handles.

Every libvirt failure leaves here as an :class:`hvext.errors.HvextError`
subclass chosen from the libvirt error code (:func:`translate`), with the
libvirtError as its cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import re
import shutil
import subprocess
import time
import uuid as uuidlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu
from lxml import etree

from hvext import accel, aio, domxml, image, paths, statedir
from hvext.agent.client import AgentClient, AgentInfo
from hvext.errors import (AgentUnavailable, DomainNotFound, DomainStateError, HostError, HvextError,
                          LibvirtUnavailable, QMPError, UnsupportedError, UsageError)
from hvext.qmp import PassthroughQMP, QMPSession
from hvext.qmp import monitor as qmp_monitor
from hvext.qmp import shared as shared_qmp
from hvext.units import MIB, TIB

T = TypeVar("T")
log = logging.getLogger(__name__)
DEFAULT_URI = "qemu:///system"
#: Interval between attempts of :meth:`Domain.wait_agent` (each a cheap connect and handshake).
AGENT_POLL_S = 0.2


class RunState(enum.Enum):
    """A domain's run state as libvirt reports it; the value is the name hvext prints (as virsh does)."""

    NOSTATE = "no state"
    RUNNING = "running"
    BLOCKED = "blocked"
    PAUSED = "paused"
    SHUTDOWN = "in shutdown"
    SHUTOFF = "shut off"
    CRASHED = "crashed"
    PMSUSPENDED = "pmsuspended"
    UNKNOWN = "unknown"  # a state this hvext does not know (a newer libvirt)

    def __str__(self) -> str:
        return self.value


_RUN_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: RunState.NOSTATE, libvirt.VIR_DOMAIN_RUNNING: RunState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: RunState.BLOCKED, libvirt.VIR_DOMAIN_PAUSED: RunState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: RunState.SHUTDOWN, libvirt.VIR_DOMAIN_SHUTOFF: RunState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: RunState.CRASHED, libvirt.VIR_DOMAIN_PMSUSPENDED: RunState.PMSUSPENDED,
}
#: Why a paused domain is paused (libvirt's VIR_DOMAIN_PAUSED_* reasons that hvext tells apart).
PAUSE_REASONS = {libvirt.VIR_DOMAIN_PAUSED_USER: "user", libvirt.VIR_DOMAIN_PAUSED_MIGRATION: "migration",
                 libvirt.VIR_DOMAIN_PAUSED_POSTCOPY: "post-copy",
                 libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED: "post-copy failed",
                 libvirt.VIR_DOMAIN_PAUSED_IOERROR: "I/O error"}
#: libvirt's lifecycle events by the names hvextd logs.
LIFECYCLE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined", libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started", libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed", libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
#: Details of a "stopped" event where the guest itself ended (powered off, crashed), not hvext or libvirt.
GUEST_STOPS = frozenset({libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED})
#: (event name, detail) pairs of a lifecycle event that ends or begins a migration on this host.
MIGRATION_EVENTS: dict[tuple[str, int], str] = {
    ("stopped", libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED): "out",
    ("started", libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED): "in",
}
# The source definition is removed by hvext after reading the completed job's statistics
# (with VIR_MIGRATE_UNDEFINE_SOURCE they would vanish with it).
_MIGRATE_BASE_FLAGS = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST

_UNAVAILABLE_CODES = {libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_AUTH_FAILED}
_UNSUPPORTED_CODES = {libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
                      libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED}


def _quiet_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; hvext reports them itself."""


libvirt.registerErrorHandler(_quiet_libvirt, None)


def default_uri(explicit: str | None = None) -> str:
    """The URI as virsh picks it: ``-c``, then LIBVIRT_DEFAULT_URI, then qemu:///system."""
    return explicit or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def translate(err: libvirt.libvirtError, context: str) -> HvextError:
    """Map a libvirtError to the hvext error a user can act on."""
    code = err.get_error_code()
    message = err.get_error_message() or str(err)
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return DomainNotFound(f"{context}: no such domain; `hvext list --all` shows the defined ones")
    if code in _UNAVAILABLE_CODES or (code == libvirt.VIR_ERR_SYSTEM_ERROR and "connect" in message.lower()):
        return LibvirtUnavailable(f"{context}: cannot reach libvirtd ({message}); is it running? "
                                  "`make libvirtd` starts it, `hvext doctor` checks it")
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return DomainStateError(f"{context}: {message}")
    if code in _UNSUPPORTED_CODES:
        return UnsupportedError(f"{context}: {message}")
    if code in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL):
        return UsageError(f"{context}: {message}")
    return HostError(f"{context}: {message}")


@contextlib.contextmanager
def libvirt_errors(context: str) -> Iterator[None]:
    """Translate libvirtErrors raised inside the block (see :func:`translate`)."""
    try:
        yield
    except libvirt.libvirtError as err:
        raise translate(err, context) from err


@dataclass
class DomainSpec:
    """The small spec hvext defines domains from (CLI flags or a TOML spec file)."""

    name: str
    memory_mib: int = 512
    vcpus: int = 1
    current_memory_mib: int | None = None
    agent_testing: bool = False  # enables the agent's misbehaviour hooks (tests only)
    extra_cmdline: str = ""
    free_page_reporting: bool = False
    swap_file: bool = False  # guest RAM in a per-VM file on disk (C6, hvext.memory.swapfile)

    def validate(self) -> DomainSpec:
        domxml.validate_name(self.name)
        if not 64 <= self.memory_mib <= TIB // MIB:
            raise UsageError(f"memory {self.memory_mib} MiB out of range: use 64 MiB to 1 TiB")
        if self.current_memory_mib is not None and not 64 <= self.current_memory_mib <= self.memory_mib:
            raise UsageError(f"current memory {self.current_memory_mib} MiB must be between 64 MiB "
                             f"and the maximum {self.memory_mib} MiB")
        if not 1 <= self.vcpus <= 64:
            raise UsageError(f"vcpus {self.vcpus} out of range: use 1 to 64")
        return self


@dataclass(frozen=True)
class MigrationOptions:
    """What a live migration uses (peer to peer, the definition persisted on the destination)."""

    dest_xml: str  # the domain's XML for the destination (its per-host paths rewritten)
    bandwidth_mib: int | None = None  # cap in MiB/s, pre-copy and post-copy
    auto_converge: bool = False
    xbzrle_cache: int = 0  # bytes; 0 = no XBZRLE compression
    multifd_channels: int = 0
    postcopy: bool = False  # allow a switch to post-copy (:meth:`Domain.start_postcopy`)
    unsafe: bool = False  # storage libvirt cannot prove shared (the same file on both hosts: lab, NFS)

    def flags_and_params(self) -> tuple[int, dict[str, Any]]:
        """libvirt's flags and typed parameters for ``migrateToURI3``."""
        flags = _MIGRATE_BASE_FLAGS
        params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_DEST_XML: self.dest_xml,
                                  libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: self.dest_xml}
        if self.bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = self.bandwidth_mib
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY] = self.bandwidth_mib
        if self.auto_converge:
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
        if self.xbzrle_cache:
            flags |= libvirt.VIR_MIGRATE_COMPRESSED
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = "xbzrle"
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION_XBZRLE_CACHE] = self.xbzrle_cache
        if self.multifd_channels:
            flags |= libvirt.VIR_MIGRATE_PARALLEL
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = self.multifd_channels
        if self.postcopy:
            flags |= libvirt.VIR_MIGRATE_POSTCOPY
        if self.unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        return flags, params


@dataclass(frozen=True)
class JobStats:
    """The figures hvext reads from libvirt's statistics of a domain's job (a migration).

    A figure libvirt did not report is None.
    """

    active: bool  # a job is running (libvirt's job type is not VIR_DOMAIN_JOB_NONE)
    memory_total: int | None = None  # bytes of RAM to send
    memory_remaining: int | None = None  # bytes of RAM still to send
    memory_iteration: int | None = None  # QEMU's dirty-bitmap sync count
    memory_dirty_rate: int | None = None  # pages/s over the last finished pass
    memory_page_size: int | None = None
    memory_bps: int | None = None  # bytes/s sent
    downtime_ms: int | None = None  # expected while running, actual once completed
    data_processed: int | None = None  # bytes sent

    @classmethod
    def from_libvirt(cls, stats: dict[str, Any]) -> JobStats | None:
        """From ``virDomainGetJobStats``'s dict; None when it is empty (no job recorded)."""
        if not stats:
            return None

        def figure(key: str) -> int | None:
            value = stats.get(key)
            return None if value is None else int(value)

        return cls(
            active=stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_NONE,
            memory_total=figure(libvirt.VIR_DOMAIN_JOB_MEMORY_TOTAL),
            memory_remaining=figure(libvirt.VIR_DOMAIN_JOB_MEMORY_REMAINING),
            memory_iteration=figure(libvirt.VIR_DOMAIN_JOB_MEMORY_ITERATION),
            memory_dirty_rate=figure(libvirt.VIR_DOMAIN_JOB_MEMORY_DIRTY_RATE),
            memory_page_size=figure(libvirt.VIR_DOMAIN_JOB_MEMORY_PAGE_SIZE),
            memory_bps=figure(libvirt.VIR_DOMAIN_JOB_MEMORY_BPS),
            downtime_ms=figure(libvirt.VIR_DOMAIN_JOB_DOWNTIME),
            data_processed=figure(libvirt.VIR_DOMAIN_JOB_DATA_PROCESSED),
        )


def libvirt_message(err: BaseException) -> str:
    """libvirt's own message behind a translated error (without hvext's context), else ``str(err)``."""
    cause = err.__cause__
    if isinstance(cause, libvirt.libvirtError):
        return cause.get_error_message() or str(cause)
    return str(err)


def emulator_path() -> Path | None:
    """The patched QEMU when built (qemu-patches/build.sh), else None (libvirt's default)."""
    return paths.PATCHED_QEMU if os.access(paths.PATCHED_QEMU, os.X_OK) else None


class Host:
    """A libvirt connection; open with ``Host(uri)`` or ``with Host(uri) as host``."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = default_uri(uri)
        aio.loop()  # libvirt's event implementation must exist before the connection opens
        try:
            self.conn = libvirt.open(self.uri)
        except libvirt.libvirtError as err:
            raise LibvirtUnavailable(
                f"cannot connect to libvirt at {self.uri}: {err.get_error_message()}; is libvirtd "
                "running? `make libvirtd` starts it, `hvext doctor` checks it") from err

    def close(self) -> None:
        try:
            self.conn.close()
        except libvirt.libvirtError as err:  # closing a connection libvirtd already dropped
            log.debug("closing %s: %s", self.uri, err.get_error_message())

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inventory ------------------------------------------------------
    def domains(self, *, include_inactive: bool = True) -> list[Domain]:
        flags = 0 if include_inactive else libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
        with libvirt_errors("listing domains"):
            return sorted((Domain(self, d) for d in self.conn.listAllDomains(flags)), key=lambda d: d.name)

    def lookup(self, name: str) -> Domain:
        if not isinstance(name, str) or not name:
            raise UsageError("a domain name is required")
        with libvirt_errors(f"domain {name!r}"):
            try:
                return Domain(self, self.conn.lookupByName(name))
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
                try:
                    return Domain(self, self.conn.lookupByUUIDString(name))
                except libvirt.libvirtError:
                    raise err from None

    def define_xml(self, xml: str) -> Domain:
        """Define (persistently) the domain *xml* describes, as it is: for a definition hvext stored
        itself (an HA-protected domain restarted on another host, docs/ha.md)."""
        with libvirt_errors("defining a domain"):
            return Domain(self, self.conn.defineXML(xml))

    def restore(self, path: Path, xml: str | None = None, *, paused: bool = False) -> Domain:
        """Start a domain from libvirt's save image *path* (*xml*: the definition to run it with)."""
        with libvirt_errors(f"restoring {path}"):
            self.conn.restoreFlags(str(path), xml, libvirt.VIR_DOMAIN_SAVE_PAUSED if paused else 0)
        root = etree.fromstring((xml or self.save_image_xml(path)).encode())
        return self.lookup(root.findtext("name") or "")

    def save_image_xml(self, path: Path) -> str:
        """The definition inside libvirt's save image *path*."""
        with libvirt_errors(f"reading the save image {path}"):
            return str(self.conn.saveImageGetXMLDesc(str(path), 0))

    def define_here(self, xml: str, name: str) -> Domain:
        """Define *xml*, domain *name*'s definition as another host ran it (an HA restart), with its
        per-host paths (QMP and agent sockets, console log) made this host's and the runtime dir
        prepared: the new QEMU never binds the sockets or writes the log of the host that ran it
        (which lab hosts share, STATE_DIR being shared; a real host has no such directory)."""
        others = host_path_ids(xml, name) - {self.host_id}
        for other in sorted(others):
            xml = rewrite_host_paths(xml, name, other, self.host_id)
        if others or self.host_id in host_path_ids(xml, name):
            self.prepare_runtime_dir(name)
        return self.define_xml(xml)

    def versions(self) -> dict[str, str]:
        with libvirt_errors("querying versions"):
            return {"libvirt": _version(self.conn.getLibVersion()),
                    "hypervisor": _version(self.conn.getVersion()),
                    "uri": self.conn.getURI()}

    def memory_mib(self) -> int:
        """The host's memory in MiB, as libvirt reports it (the node of the connection, not this process's)."""
        with libvirt_errors("reading the host's information"):
            return int(self.conn.getInfo()[1])

    def qemu_user(self) -> tuple[int, int]:
        """uid and gid QEMU processes run as (libvirt's DAC base label)."""
        with libvirt_errors("reading capabilities"):
            caps = etree.fromstring(self.conn.getCapabilities().encode())
        for label in caps.iterfind("host/secmodel/baselabel"):
            if label.get("type") in ("kvm", "qemu") and label.text and ":" in label.text:
                uid, gid = label.text.split(":", 1)
                return int(uid.lstrip("+")), int(gid.lstrip("+"))
        return 0, 0

    # -- watching (hvextd) ---------------------------------------------------
    def keep_alive(self, interval_s: int = 5, count: int = 3) -> bool:
        """Have libvirt probe the connection (a dead libvirtd is noticed); False when the driver
        has no keepalive (a local one, which does not need it)."""
        with libvirt_errors(f"enabling keepalive on {self.uri}"):
            try:
                self.conn.setKeepAlive(interval_s, count)
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                    raise
                return False
        return True

    def watch(self, on_event: Callable[[str, str, int], None], on_close: Callable[[int], None]) -> int:
        """Call ``on_event(domain name, event name, detail)`` on every domain's lifecycle event (names
        from :data:`LIFECYCLE_EVENTS`) and ``on_close(reason)`` when the connection closes; returns the
        handle for :meth:`unwatch`. Both run on hvext's event loop; what they raise is logged."""

        def lifecycle(conn: Any, dom: libvirt.virDomain, event: int, detail: int, opaque: Any) -> None:
            try:
                on_event(dom.name(), LIFECYCLE_EVENTS.get(event, f"event {event}"), detail)
            except Exception:  # libvirt would print the traceback on stderr and drop it
                log.exception("handling lifecycle event %d (detail %d) failed", event, detail)

        def closed(conn: Any, reason: int, opaque: Any) -> None:
            try:
                on_close(reason)
            except Exception:
                log.exception("handling the close of %s failed", self.uri)

        with libvirt_errors(f"watching {self.uri}"):
            self.conn.registerCloseCallback(closed, None)
            return int(self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                        lifecycle, None))

    def unwatch(self, handle: int) -> None:
        """Undo :meth:`watch`."""
        with libvirt_errors(f"watching {self.uri}"):
            self.conn.domainEventDeregisterAny(handle)
            self.conn.unregisterCloseCallback()

    # -- defining -------------------------------------------------------
    @functools.cached_property
    def host_uuid(self) -> str:
        """This libvirt host's UUID (libvirtd.conf host_uuid, else the machine's)."""
        with libvirt_errors("reading capabilities"):
            caps = etree.fromstring(self.conn.getCapabilities().encode())
        return caps.findtext("host/uuid") or ""

    @functools.cached_property
    def host_id(self) -> str:
        """A short id of this libvirt host (from its host UUID), used in per-host paths."""
        return self.host_uuid.replace("-", "")[:8] or "local"

    def prepare_runtime_dir(self, name: str) -> Path:
        """Create the per-host socket dir of a domain, writable by this host's QEMU user."""
        runtime = paths.runtime_dir(name, self.host_id)
        uid, gid = self.qemu_user()
        paths.domain_dir(name).parent.mkdir(parents=True, exist_ok=True)
        # QEMU's group reads the domain's dir (disk overlay, PMEM backings) but cannot swap its entries
        # for links that root or libvirt would follow; it writes only its sockets in the runtime dir.
        paths.private_dir(paths.domain_dir(name), mode=0o750, gid=gid)
        paths.private_dir(runtime, mode=0o770, gid=gid)
        paths.console_log(name, self.host_id).parent.mkdir(parents=True, exist_ok=True)
        if len(str(runtime / "qmp-cli.sock")) >= 108:  # the longest socket name
            raise UsageError(f"domain name {name!r} is too long for unix socket paths under {paths.STATE_DIR}")
        return runtime

    def build_xml(self, spec: DomainSpec, guest: image.GuestImage, *, uuid: str | None = None) -> str:
        """The domain XML for *spec* (pure apart from reading the accelerator)."""
        acc = accel.current()
        cmdline = image.CMDLINE + (" hvext_agent.testing=1" if spec.agent_testing else "")
        if spec.extra_cmdline:
            cmdline += " " + spec.extra_cmdline
        return domxml.DomainXML(
            name=spec.name, memory_mib=spec.memory_mib, current_memory_mib=spec.current_memory_mib,
            vcpus=spec.vcpus, domain_type=acc.domain_type, uuid=uuid,
            os_boot=domxml.OSBoot(guest.kernel, guest.initrd, cmdline),
            cpu=domxml.CPU(kvm=acc.is_kvm, vcpus=spec.vcpus, memory_mib=spec.memory_mib),
            disk=domxml.Disk(paths.domain_dir(spec.name) / "disk.qcow2"),
            console=domxml.SerialConsole(paths.console_log(spec.name, self.host_id)),
            qmp=domxml.QMPMonitor(paths.runtime_dir(spec.name, self.host_id) / "qmp.sock",
                                  paths.runtime_dir(spec.name, self.host_id) / "qmp-cli.sock"),
            emulator=emulator_path(),
            memory_backing=domxml.FileMemoryBacking() if spec.swap_file else None,
            devices=[domxml.AgentChannel(paths.runtime_dir(spec.name, self.host_id) / "agent.sock"),
                     domxml.Balloon(free_page_reporting=spec.free_page_reporting),
                     domxml.RNG()],
        ).render()

    def define(self, spec: DomainSpec) -> Domain:
        """Define a persistent domain on a fresh qcow2 overlay of the guest image.

        Nothing is left behind when a step fails (overlay and state removed).
        """
        spec.validate()
        guest = image.require_image()
        with libvirt_errors(f"domain {spec.name!r}"):
            try:
                self.conn.lookupByName(spec.name)
                raise UsageError(f"domain {spec.name!r} already exists; pick another name or "
                                 f"`hvext undefine {spec.name}` first")
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        state = self._claim_state_dir(spec.name)
        domain_uuid = str(uuidlib.uuid4())
        try:
            statedir.write_owner(state, statedir.StateOwner(self.host_uuid, self.uri, domain_uuid, spec.name))
            self.prepare_runtime_dir(spec.name)
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(guest.rootfs),
                  str(state / "disk.qcow2")])
            xml = self.build_xml(spec, guest, uuid=domain_uuid)
            with libvirt_errors(f"defining {spec.name!r}"):
                return Domain(self, self.conn.defineXML(xml))
        except BaseException:
            shutil.rmtree(state, ignore_errors=True)
            raise


    # -- shared state directories ------------------------------------------
    def _claim_state_dir(self, name: str) -> Path:
        """Create the domain's state dir, hvext's alone; a leftover one is removed only when its
        owner record shows the domain it belonged to is gone (hosts of a lab share STATE_DIR)."""
        state = paths.domain_dir(name)
        state.parent.mkdir(parents=True, exist_ok=True)
        _, gid = self.qemu_user()
        for attempt in (1, 2):
            try:
                return paths.private_dir(state, mode=0o750, gid=gid, exclusive=True)
            except FileExistsError:
                if attempt == 2:
                    raise HostError(f"domain {name!r}: {state} reappeared while hvext removed a leftover one; "
                                    "is another hvext defining the same name?") from None
            self._check_leftover_state(name, state)
            shutil.rmtree(state)  # left by a domain undefined outside hvext
        raise AssertionError("unreachable")

    def _check_leftover_state(self, name: str, state: Path) -> None:
        """Raise unless *state*'s owner record shows its domain no longer exists on its host."""
        owner, why = statedir.read_owner(state)
        if owner is None:
            raise HostError(f"domain {name!r}: {state} already exists and hvext cannot tell which domain it "
                            f"belongs to: {why}. If no domain on any host uses it, remove it and retry")
        if self._owner_exists(owner, state):
            where = "this host" if owner.host_uuid == self.host_uuid else f"the host at {owner.uri}"
            raise HostError(f"domain {name!r}: {state} belongs to domain {owner.name!r} ({owner.domain_uuid}) "
                            f"defined on {where}; hvext will not remove it. Pick another name, or undefine "
                            "that domain first")

    def _owner_exists(self, owner: statedir.StateOwner, state: Path) -> bool:
        """Whether the recorded domain is still defined on its recorded host (HostError if unknowable)."""
        unverified = f"{state} belongs to domain {owner.name!r} on the host at {owner.uri}, and hvext cannot check"
        if owner.host_uuid == self.host_uuid:
            conn, opened = self.conn, False
        else:
            try:
                conn, opened = libvirt.open(owner.uri), True
            except libvirt.libvirtError as err:
                raise HostError(f"{unverified} that it is gone ({err.get_error_message()}); if it is, remove "
                                f"{state} and retry") from err
        try:
            if opened:
                caps = etree.fromstring(conn.getCapabilities().encode())
                if (caps.findtext("host/uuid") or "") != owner.host_uuid:
                    raise HostError(f"{unverified}: {owner.uri} is now another host; if the domain is gone, "
                                    f"remove {state} and retry")
            try:
                conn.lookupByUUIDString(owner.domain_uuid)
                return True
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise translate(err, unverified) from err
        except libvirt.libvirtError as err:
            raise translate(err, unverified) from err
        finally:
            if opened:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()

    def adopt_state(self, name: str, domain_uuid: str) -> None:
        """After a migration to this host: record it as the owner of the domain's shared state dir."""
        state = paths.domain_dir(name)
        if not state.is_dir():
            return
        try:
            statedir.write_owner(state, statedir.StateOwner(self.host_uuid, self.uri, domain_uuid, name))
        except OSError as err:  # the migration itself succeeded; a later define would refuse, not delete
            log.warning("%s: cannot record the new owner of %s: %s", name, state, err)

    def owns_state(self, name: str, domain_uuid: str) -> bool:
        """Whether the state dir of *name* is this domain's (or predates owner records)."""
        state = paths.domain_dir(name)
        if not os.path.lexists(state / statedir.OWNER_FILE):
            return True
        owner, _ = statedir.read_owner(state)
        return owner is not None and owner.domain_uuid == domain_uuid


def _affect(*, config: bool, live: bool) -> int:
    """libvirt's VIR_DOMAIN_AFFECT_* flags: the persistent definition, the running domain, or both."""
    return (libvirt.VIR_DOMAIN_AFFECT_CONFIG if config else 0) | (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


def _run(args: list[str]) -> None:
    try:
        subprocess.run(args, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise HostError(f"{args[0]} is not installed (`make setup` installs it)") from err
    except subprocess.CalledProcessError as err:
        raise HostError(f"{args[0]} failed: {err.stderr.strip()}") from err


class Domain:
    """A handle on one libvirt domain."""

    def __init__(self, host: Host, dom: libvirt.virDomain) -> None:
        self.host = host
        self.dom = dom
        self.name: str = dom.name()

    def __repr__(self) -> str:
        return f"Domain({self.name!r})"

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return libvirt_errors(f"{action} {self.name!r}" if action else f"domain {self.name!r}")

    # -- state ----------------------------------------------------------
    @property
    def state(self) -> RunState:
        """The run state now (a libvirt call each time: read it once, then compare)."""
        return self.state_and_reason()[0]

    def state_and_reason(self) -> tuple[RunState, str]:
        """The run state and, when paused, why ("user", "migration", "post-copy", ...; "" otherwise)."""
        with self._errors(""):
            code, reason = self.dom.state()
        state = _RUN_STATES.get(code, RunState.UNKNOWN)
        if state is not RunState.PAUSED:
            return state, ""
        return state, PAUSE_REASONS.get(reason, f"reason {reason}")

    def is_active(self) -> bool:
        """Whether the domain has a QEMU process (running, paused, in shutdown, ...)."""
        with self._errors(""):
            return bool(self.dom.isActive())

    def uuid(self) -> str:
        with self._errors(""):
            return str(self.dom.UUIDString())

    def id(self) -> int | None:
        """The hypervisor's id of a running domain; None when it is not running."""
        with self._errors(""):
            return int(self.dom.ID()) if self.dom.isActive() else None

    def is_persistent(self) -> bool:
        """Whether the domain has a persistent definition (False: transient, gone when it stops)."""
        with self._errors(""):
            return bool(self.dom.isPersistent())

    def xml(self, *, inactive: bool = False, secure: bool = False, migratable: bool = False) -> str:
        """The domain's XML: live (inactive XML when it is off), or with *inactive* its persistent definition;
        *secure* includes secrets, *migratable* is the form a migration sends."""
        flags = (libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0) | \
            (libvirt.VIR_DOMAIN_XML_SECURE if secure else 0) | (libvirt.VIR_DOMAIN_XML_MIGRATABLE if migratable else 0)
        with self._errors("reading the definition of"):
            return str(self.dom.XMLDesc(flags))

    def redefine(self, xml: str) -> None:
        """Replace the domain's persistent definition with *xml* (same name and UUID)."""
        with self._errors("updating the definition of"):
            self.host.conn.defineXML(xml)

    def facts(self) -> domxml.DomainFacts:
        """Facts from the live XML (inactive XML when the domain is off)."""
        with self._errors(""):
            return domxml.read_facts(self.dom.XMLDesc(0))

    def memory_kib(self) -> tuple[int, int]:
        """(maximum, current) memory in KiB as libvirt reports it (current is the balloon's size)."""
        with self._errors(""):
            _state, max_kib, cur_kib, _vcpus, _cpu_ns = self.dom.info()
        return int(max_kib), int(cur_kib)

    def info(self) -> dict[str, Any]:
        with self._errors(""):
            state, max_kib, cur_kib, vcpus, cpu_ns = self.dom.info()
            facts = domxml.read_facts(self.dom.XMLDesc(0))
            return {
                "name": self.name, "uuid": self.dom.UUIDString(),
                "id": self.dom.ID() if self.dom.isActive() else None,
                "state": _RUN_STATES.get(state, RunState.UNKNOWN).value, "vcpus": vcpus,
                "max_memory_kib": max_kib, "used_memory_kib": cur_kib, "cpu_time_s": cpu_ns / 1e9,
                "persistent": bool(self.dom.isPersistent()), "autostart": bool(self.dom.autostart()),
                "hvext_managed": facts.hvext_managed, "agent_channel": facts.has_agent_channel,
                "console_log": str(facts.console_log) if facts.console_log else None,
            }

    def require_running(self) -> None:
        """Guard: DomainStateError unless the domain has a QEMU process (running or paused)."""
        if not self.is_active():
            raise DomainStateError(f"domain {self.name!r} is not running; `hvext start {self.name}` first")

    # -- lifecycle ------------------------------------------------------
    def start(self, *, paused: bool = False) -> None:
        """Start the domain; with *paused*, its vCPUs wait for :meth:`resume` (guard: it must be off)."""
        with self._errors("starting"):
            if self.dom.isActive():
                raise DomainStateError(f"domain {self.name!r} is already running")
            if paused:
                self.dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
            else:
                self.dom.create()

    def suspend(self) -> None:
        """Stop the vCPUs (guard: the domain must be running; a paused one stays paused)."""
        self.require_running()
        with self._errors("pausing"):
            self.dom.suspend()

    def resume(self) -> None:
        """Let the vCPUs run again (guard: the domain must be running; a running one goes on)."""
        self.require_running()
        with self._errors("resuming"):
            self.dom.resume()

    def destroy(self) -> None:
        with self._errors("destroying"):
            self.dom.destroy()

    # -- managed save (virsh managedsave / start) ------------------------
    def has_managed_save(self) -> bool:
        """Whether libvirt holds a managed save image of the domain (the next start restores it)."""
        with self._errors("reading the managed save state of"):
            return bool(self.dom.hasManagedSaveImage(0))

    def managed_save(self) -> None:
        """Save the running domain's state into libvirt's managed save image and stop it."""
        with self._errors("saving"):
            self.dom.managedSave(0)

    def remove_managed_save(self) -> None:
        with self._errors("removing the managed save image of"):
            self.dom.managedSaveRemove(0)

    def save(self, path: Path, xml: str | None = None) -> None:
        """Save the running domain to the file *path* (libvirt's save image; *xml*: its definition) and stop it."""
        with self._errors("saving"):
            self.dom.saveFlags(str(path), xml, 0)

    def shutdown(self, *, wait: float | None = None) -> None:
        """Ask the guest to power off (ACPI); with *wait*, until it is off or raise."""
        with self._errors("shutting down"):
            if not self.dom.isActive():
                raise DomainStateError(f"domain {self.name!r} is not running")
        if wait is None:
            with self._errors("shutting down"):
                self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            return
        aio.run(self._shutdown_and_wait(wait))

    async def _shutdown_and_wait(self, timeout: float) -> None:
        async with self.lifecycle_events() as events:
            await asyncio.to_thread(self._press_power_button)
            try:
                await asyncio.wait_for(_until_stopped(events, self), timeout)
            except asyncio.TimeoutError as err:
                raise DomainStateError(f"domain {self.name!r} did not power off within {timeout:.0f} s; "
                                       f"`hvext destroy {self.name}` forces it off") from err

    def _press_power_button(self) -> None:
        with self._errors("shutting down"):
            self.dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)

    @contextlib.asynccontextmanager
    async def lifecycle_events(self) -> AsyncIterator[asyncio.Queue[tuple[int, int]]]:
        """libvirt lifecycle events (event, detail) of this domain, delivered on hvext's loop."""
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

        def callback(conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
            queue.put_nowait((event, detail))

        def register() -> int:
            with self._errors("watching"):
                return int(self.host.conn.domainEventRegisterAny(
                    self.dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, callback, None))

        def deregister(handle: int) -> None:
            try:
                self.host.conn.domainEventDeregisterAny(handle)
            except libvirt.libvirtError as err:  # the connection is gone: so is the callback
                log.debug("deregistering lifecycle events of %s: %s", self.name, err.get_error_message())

        handle = await asyncio.to_thread(register)
        try:
            yield queue
        finally:
            await asyncio.to_thread(deregister, handle)

    def undefine(self, *, remove_state: bool = True) -> None:
        """Undefine (the domain must be off) and remove hvext's overlay disk and state."""
        with self._errors("undefining"):
            if self.dom.isActive():
                raise DomainStateError(f"domain {self.name!r} is running; shut it down or destroy it first")
            definition = self.dom.XMLDesc(0)
            facts = domxml.read_facts(definition)
            domain_uuid = self.dom.UUIDString()
            self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        if remove_state and facts.hvext_managed:
            if not self.host.owns_state(self.name, domain_uuid):  # another host's domain of the same name
                log.warning("%s: %s belongs to another domain; left in place", self.name, paths.domain_dir(self.name))
                return
            remove_domain_state(self.name)
            from hvext.memory import nvmram  # imports this module
            nvmram.remove_backing(self.name, definition)

    # -- devices --------------------------------------------------------
    def attach_device(self, xml: str, *, config: bool, live: bool) -> None:
        """Add the device *xml* to the persistent definition (*config*) and/or the running guest (*live*)."""
        with self._errors("attaching a device to"):
            self.dom.attachDeviceFlags(xml, _affect(config=config, live=live))

    def detach_device(self, xml: str, *, config: bool, live: bool) -> None:
        """Remove the device *xml* from the persistent definition (*config*) and/or the running guest (*live*)."""
        with self._errors("detaching a device from"):
            self.dom.detachDeviceFlags(xml, _affect(config=config, live=live))

    def update_device(self, xml: str, *, config: bool, live: bool) -> None:
        """Change the device *xml* names (e.g. a virtio-mem device's requested size) in the definition and/or the
        running guest."""
        with self._errors("updating a device of"):
            self.dom.updateDeviceFlags(xml, _affect(config=config, live=live))

    # -- memory ---------------------------------------------------------
    def set_memory(self, kib: int, *, live: bool) -> None:
        """Set the balloon target (*live*) or the next start's current memory, in KiB."""
        with self._errors("setting the memory of"):
            self.dom.setMemoryFlags(kib, _affect(config=not live, live=live))

    def metadata(self, namespace: str, *, live: bool = True) -> str | None:
        """hvext's metadata element in *namespace* (live or persistent); None when none is recorded."""
        with self._errors("reading the metadata of"):
            try:
                return str(self.dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace,
                                             _affect(config=not live, live=live)))
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    raise
                return None

    def set_metadata(self, key: str, namespace: str, xml: str, *, live: bool = True) -> None:
        """Record the element *xml* as metadata in *namespace* (prefix *key*), live or persistent."""
        with self._errors("recording the metadata of"):
            self.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, xml, key, namespace,
                                 _affect(config=not live, live=live))

    def memory_parameters(self, *, live: bool = True) -> dict[str, int]:
        """libvirt's memtune values in KiB (hard_limit, soft_limit, swap_hard_limit; 9007199254740991 = none)."""
        with self._errors("reading the memory tuning of"):
            params = self.dom.memoryParameters(_affect(config=not live, live=live))
        return {str(k): int(v) for k, v in params.items()}

    def set_memory_parameters(self, params: dict[str, int], *, live: bool, config: bool) -> None:
        """Set memtune values in KiB (``hard_limit``, ``soft_limit``) on the running domain and/or its definition.

        One call each: libvirt-python reads the parameters' types with the same
        flags first, and reading refuses live and config together.
        """
        with self._errors("setting the memory tuning of"):
            for flag in ([libvirt.VIR_DOMAIN_AFFECT_LIVE] if live else []) + \
                        ([libvirt.VIR_DOMAIN_AFFECT_CONFIG] if config else []):
                self.dom.setMemoryParameters(params, flag)

    def balloon_stats(self) -> dict[str, int]:
        """libvirt's memoryStats (KiB): actual, unused, available, usable, rss, ..."""
        self.require_running()
        with self._errors("reading memory statistics of"):
            return {str(k): int(v) for k, v in self.dom.memoryStats().items()}

    # -- migration ------------------------------------------------------
    def migrate(self, dest_uri: str, options: MigrationOptions) -> None:
        """Live-migrate to *dest_uri* (blocking until done; run it in a thread)."""
        flags, params = options.flags_and_params()
        with self._errors("migrating"):
            self.dom.migrateToURI3(dest_uri, params, flags)

    def set_max_downtime(self, ms: int) -> None:
        """The downtime the running migration may take when it switches over."""
        with self._errors("setting the migration downtime of"):
            self.dom.migrateSetMaxDowntime(ms, 0)

    def start_postcopy(self) -> None:
        """Switch the running migration (started with post-copy allowed) to post-copy."""
        with self._errors("starting post-copy in the migration of"):
            self.dom.migrateStartPostCopy(0)

    def abort_job(self) -> None:
        """Cancel the running job (a migration): the domain stays here."""
        with self._errors("aborting the migration of"):
            self.dom.abortJob()

    def job_stats(self, *, completed: bool = False) -> JobStats | None:
        """The running job's statistics, or with *completed* the last finished one's; None when libvirt has none."""
        with self._errors("reading the job statistics of"):
            return JobStats.from_libvirt(self.dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED if completed else 0))

    def monitor_command(self, command: str, request: str) -> str:
        """QEMU's raw reply to the QMP *request* through libvirt's passthrough (QMPError when it fails)."""
        try:
            return str(libvirt_qemu.qemuMonitorCommand(self.dom, request, 0))
        except libvirt.libvirtError as err:
            raise QMPError(f"QMP {command} through libvirt failed: {err.get_error_message()}") from err

    # -- channels -------------------------------------------------------
    def _running_facts(self) -> domxml.DomainFacts:
        """:meth:`facts` of a running domain (blocking: async callers run it in a thread)."""
        self.require_running()
        return self.facts()

    @contextlib.asynccontextmanager
    async def qmp(self) -> AsyncIterator[QMPSession]:
        """A QMP session: this process's hvext monitor when the domain has one, else libvirt passthrough.

        hvextd uses the domain's daemon monitor, every other process the CLI
        monitor (the daemon's on domains defined before there were two); the
        sessions of one process share one connection (:func:`hvext.qmp.shared`).
        """
        facts = await asyncio.to_thread(self._running_facts)
        socket = facts.monitor_socket(qmp_monitor())
        if socket is None:
            session = PassthroughQMP(self.monitor_command)
            try:
                yield session
            finally:
                await session.close()
            return
        async with shared_qmp(socket, name=self.name) as shared:
            yield shared

    @contextlib.asynccontextmanager
    async def agent(self, *, timeout: float = 10.0) -> AsyncIterator[AgentClient]:
        """A synchronised agent session (AgentUnavailable when the domain has no agent)."""
        facts = await asyncio.to_thread(self._running_facts)
        if not facts.has_agent_channel:
            raise AgentUnavailable(f"domain {self.name!r} has no hvext agent channel "
                                   f"({domxml.AGENT_PORT}); commands that need the agent do not work on it")
        if facts.agent_socket is None:
            raise AgentUnavailable(f"domain {self.name!r}: libvirt reports no socket for the agent channel")
        client = AgentClient(facts.agent_socket, name=self.name, timeout=timeout)
        await client.connect()
        try:
            await client.sync()
            yield client
        finally:
            await client.close()

    async def wait_agent(self, timeout: float = 60.0) -> AgentInfo:
        """Retry the agent handshake until it answers (boot) or *timeout* passes.

        Polls every :data:`AGENT_POLL_S`: an attempt is a connect to the channel's socket (refused
        until QEMU has it) and a handshake that the agent answers as soon as it opens its port, so
        a short fixed interval costs little, where a back-off delayed a 6 s boot by up to 2 s."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                async with self.agent(timeout=min(3.0, max(0.5, deadline - time.monotonic()))) as agent:
                    return await agent.info()
            except (AgentUnavailable, HvextError) as err:
                if isinstance(err, DomainStateError):
                    raise
                last = err
            await asyncio.sleep(AGENT_POLL_S)
        raise AgentUnavailable(f"agent of {self.name!r} not ready within {timeout:.0f} s "
                               f"(last error: {last}); see `hvext console-log {self.name}`") from last


def rewrite_host_paths(xml: str, name: str, src_id: str, dst_id: str) -> str:
    """The domain XML for the destination: per-host sockets, console log and RAM file of *dst_id*."""
    from hvext.memory import ramfile  # ramfile builds on this module

    replacements = {str(paths.runtime_dir(name, src_id)): str(paths.runtime_dir(name, dst_id)),
                    str(paths.console_log(name, src_id)): str(paths.console_log(name, dst_id)),
                    str(ramfile.ram_path(name, src_id)): str(ramfile.ram_path(name, dst_id))}
    root = etree.fromstring(xml.encode())
    for element in root.iter():
        for key, value in element.attrib.items():
            for old, new in replacements.items():
                if old in value:
                    element.set(key, value.replace(old, new))
    return etree.tostring(root, encoding="unicode")


def host_path_ids(xml: str, name: str) -> set[str]:
    """The host ids of domain *name*'s per-host paths (:func:`hvext.paths.runtime_dir`,
    :func:`hvext.paths.console_log`) that *xml*'s attributes name."""
    runtime = re.compile(re.escape(f"{paths.domain_dir(name)}/on-") + r"([A-Za-z0-9]+)(?:/|$)")
    console = re.compile(re.escape(f"{paths.LOG_DIR / 'console' / name}.") + r"([A-Za-z0-9]+)\.log$")
    found: set[str] = set()
    for element in etree.fromstring(xml.encode()).iter():
        for value in element.attrib.values():
            found.update(m.group(1) for pattern in (runtime, console) for m in pattern.finditer(value))
    return found


def remove_domain_state(name: str) -> list[str]:
    """Remove hvext's state and volatile directories of domain *name* (after its undefine).

    What cannot be removed (a symlink in place of a directory, an I/O error,
    a busy mount) is logged as a warning -- on stderr in the CLI -- and
    returned: the undefine itself stands, the leftovers need the admin.
    """
    failures: list[str] = []

    def failed(function: object, path: str, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
        failures.append(f"{path}: {exc_info[1]}")

    for directory in (paths.domain_dir(name), paths.VOLATILE_DIR / name):
        if os.path.lexists(directory):
            shutil.rmtree(directory, onerror=failed)
    for failure in failures:
        log.warning("%s: undefined, but its state was not fully removed: %s", name, failure)
    return failures


async def _until_stopped(events: asyncio.Queue[tuple[int, int]], domain: Domain) -> None:
    if not await asyncio.to_thread(domain.is_active):
        return
    while True:
        event, _ = await events.get()
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            return
