"""Failover of volatile state to a standby host that holds a copy of the guest's RAM (C17).

**Primary** (the host a RAM-file domain runs on):

* :func:`protect` (``hvext ha protect DOMAIN --standby HOST [--sync-interval S]``): starts the patched
  QEMU's dirty log, tells the standby's hvextd the definition (``ram-standby``), opens the standby's copy
  (its own RAM file of the domain, :func:`hvext.ha.pagexfer.ram_file_copy`) and sends every non-zero
  page through a :class:`hvext.ha.pagexfer.PeerTarget`. The record is this host's, private
  (``STATE_DIR/ha/standby/<host id>/<domain>.json``).
* :func:`sync` (hvextd, every ``interval_s``): the next dirty list's pages to the copy (all pages when the
  list does not follow the last one). A standby that fails during a refresh stops the protection: the
  record says ``stopped`` and why (``ha standby-status``), the dirty log is stopped, and ``ha protect``
  starts it again.
* :func:`failover` (``hvext ha failover DOMAIN``; on the battery path, SIGPWR to hvextd, every protected
  domain): the guest is paused, the pages dirtied since the last refresh go to the copy, the device
  state is saved without the shared RAM (:func:`hvext.memory.ramfile.save_device_state`, QEMU stops) and
  sent with ``ram-takeover``: the standby defines the domain and starts QEMU on its copy and that state,
  running. If the hand-over fails after QEMU stopped here, the guest is resumed here from its own RAM
  file and the same device state.

**Standby** (:class:`StandbyService`, hvextd's ``ram-standby`` / ``ram-takeover`` / ``ram-standby-drop``):
keeps the definition (``STATE_DIR/ha/standby-copies/<host id>/<domain>.json``) and starts the domain
on takeover.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hvext import aio, durable, paths
from hvext.errors import DomainNotFound, DomainStateError, HAError, HvextError, UsageError
from hvext.ha import pagexfer, peer, ramsync
from hvext.ha import volatile_policy as vpolicy
from hvext.ha.client import check_key_name
from hvext.ha.etcd import Credentials
from hvext.ha.mirror_policy import LogMark
from hvext.ha.volatile import query_dirty, stop_log
from hvext.host import Domain, Host, RunState
from hvext.memory import ramfile

log = logging.getLogger("hvextd.standby")

DEFAULT_INTERVAL_S = 1.0
#: Seconds a failover waits for the standby (connect, each request): within a battery window.
FAILOVER_TIMEOUT_S = 8.0
LOCK_WAIT_S = 60.0
CHUNK = 1 << 20


class StandbyError(HAError):
    """Standby protection failed, stopped, or is refused."""


@dataclass
class Record:
    domain: str
    uuid: str
    standby: str
    peer: str
    creds: list[str]  # CA, certificate, key of this host's member
    interval_s: float
    ram_path: str
    ram_bytes: int
    page_size: int
    block: str
    mark: dict[str, int]
    state: str = "active"  # "active", "stopped", "failed over"
    error: str | None = None
    started_at: float = 0.0
    last_sync_at: float = 0.0
    syncs: int = 0
    full_syncs: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    last_pages: int = 0
    last_seconds: float = 0.0
    failover: dict[str, Any] | None = None

    def credentials(self) -> Credentials:
        return Credentials(Path(self.creds[0]), Path(self.creds[1]), Path(self.creds[2]))

    def status(self) -> dict[str, Any]:
        out = asdict(self)
        del out["creds"]
        out["lag_seconds"] = round(max(0.0, time.time() - self.last_sync_at), 3) if self.last_sync_at else None
        return out


def _root(host_id: str, kind: str = "standby") -> Path:
    ramfile.ram_path("x", host_id)  # the host id's checks
    return paths.STATE_DIR / "ha" / kind / host_id


def _dir(host_id: str, kind: str = "standby") -> Path:
    root = _root(host_id, kind)
    root.parent.parent.mkdir(parents=True, exist_ok=True)
    paths.private_dir(root.parent)
    return paths.private_dir(root)


def _path(host_id: str, name: str, kind: str = "standby") -> Path:
    check_key_name("domain", name)
    return _root(host_id, kind) / f"{name}.json"


def load(host_id: str, name: str) -> Record | None:
    try:
        return Record(**json.loads(_path(host_id, name).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        raise StandbyError(f"cannot read the standby record of {name!r}: {err}") from err


def _save(host_id: str, record: Record) -> None:
    _dir(host_id)
    durable.atomic_write(_path(host_id, record.domain), json.dumps(asdict(record)).encode())


def records(host_id: str) -> list[Record]:
    root = _root(host_id)
    out = []
    for path in sorted(root.glob("*.json")) if root.is_dir() else []:
        try:
            found = load(host_id, path.stem)
        except (StandbyError, UsageError) as err:
            log.warning("%s", err)
            continue
        if found is not None:
            out.append(found)
    return out


@contextlib.contextmanager
def _locked(host_id: str, name: str, wait: float | None = LOCK_WAIT_S) -> Any:
    try:
        with durable.locked(_dir(host_id) / f"{name}.lock", wait=wait):
            yield
    except BlockingIOError:
        raise vpolicy.Busy(f"another refresh or failover of {name!r} is in progress") from None


def _send_all(fd: int, size: int, target: pagexfer.PeerTarget) -> int:
    """Every non-zero MiB of the RAM file to a fresh (zeroed) copy; pages sent."""
    sent = 0
    for offset in range(0, size, CHUNK):
        data = os.pread(fd, min(CHUNK, size - offset), offset)
        if data.count(0) != len(data):
            target.write(offset, data)
            sent += len(data)
    target.flush()
    return sent


def protect(host: Host, name: str, standby: str, peer_address: str, creds: Credentials,
            interval_s: float = DEFAULT_INTERVAL_S) -> dict[str, Any]:
    """``hvext ha protect DOMAIN --standby HOST``: see the module docstring. All or nothing: the dirty log is
    stopped and the standby told to drop the definition when a step fails."""
    if not 0.05 <= interval_s <= 3600:
        raise UsageError("--sync-interval is seconds from 0.05 to 3600")
    check_key_name("host", standby)
    domain = host.lookup(name)
    domain.require_running()
    ram = ramfile.require(domain)
    host_id = host.host_id
    with _locked(host_id, domain.name):
        old = load(host_id, domain.name)
        if old is not None and old.state == "active":
            raise UsageError(f"domain {domain.name!r} is protected by standby {old.standby} already "
                             f"(`hvext ha standby-status {domain.name}`)")
        domain_id = domain.id()
        conn = pagexfer.connect(creds, peer_address)  # unreachable or refused: nothing started
        with conn:
            dirty = aio.run(query_dirty(domain, ram.block_id, ram.size, start=True))
            started = time.perf_counter()
            try:
                conn.request({"op": "ram-standby", "domain": domain.name, "definition": domain.xml(inactive=True),
                              "primary_host_id": host_id})
                target = _open_target_raw(conn, domain.name, ram.size)
                fd = ramsync.open_source(ram.path, ram.size)
                try:
                    sent = _send_all(fd, ram.size, target)
                finally:
                    os.close(fd)
                target.close()
            except BaseException:
                aio.run(stop_log(domain))
                with contextlib.suppress(HvextError):
                    conn.request({"op": "ram-standby-drop", "domain": domain.name})
                raise
        record = Record(domain.name, domain.uuid(), standby, peer_address, [str(creds.ca), str(creds.cert),
                        str(creds.key)], interval_s, str(ram.path), ram.size, dirty.page_size, ram.block_id,
                        {"domain_id": domain_id or 0, "generation": dirty.generation}, started_at=time.time(),
                        last_sync_at=time.time(), syncs=1, full_syncs=1, pages_sent=sent // dirty.page_size,
                        bytes_sent=target.written, last_pages=sent // dirty.page_size,
                        last_seconds=round(time.perf_counter() - started, 4))
        _save(host_id, record)
    return record.status()


def _open_target_raw(conn: peer.Connection, name: str, size: int) -> pagexfer.PeerTarget:
    return pagexfer.PeerTarget(pagexfer.open_copy(conn, name, size, fresh=True))


def _stop(host_id: str, record: Record, domain: Domain | None, reason: str) -> StandbyError:
    record.state, record.error = "stopped", reason
    _save(host_id, record)
    if domain is not None:
        with contextlib.suppress(HvextError):
            aio.run(stop_log(domain))
    log.error("standby protection of %s stopped: %s", record.domain, reason)
    return StandbyError(f"standby protection of {record.domain!r} stopped: {reason}")


def _send_dirty(record: Record, domain: Domain, domain_id: int, conn: peer.Connection) -> tuple[int, bool]:
    """The next dirty list's pages to the copy (all pages when it does not follow the mark); (pages, full)."""
    dirty = aio.run(query_dirty(domain, record.block, record.ram_bytes, start=False))
    reason = vpolicy.continues(LogMark(record.mark["domain_id"], record.mark["generation"]), domain_id, dirty.generation)
    target = pagexfer.PeerTarget(pagexfer.open_copy(conn, record.domain, record.ram_bytes))
    fd = ramsync.open_source(Path(record.ram_path), record.ram_bytes)
    try:
        if reason is None:
            result = ramsync.copy_runs(fd, dirty.blocks[record.block].runs, record.page_size, target)
            pages = result.pages
        else:
            log.warning("standby copy of %s: full copy (%s)", record.domain, reason)
            pages = ramsync.copy_runs(fd, ((0, record.ram_bytes // record.page_size),), record.page_size,
                                      target).pages
    finally:
        os.close(fd)
        target.close()
    record.mark = {"domain_id": domain_id, "generation": dirty.generation}
    record.bytes_sent += target.written
    record.pages_sent += pages
    record.syncs += 1
    record.full_syncs += int(reason is not None)
    record.last_pages = pages
    return pages, reason is not None


def sync(host: Host, name: str, *, wait: float | None = 0) -> dict[str, Any]:
    """One refresh of *name*'s standby copy (hvextd's schedule)."""
    host_id = host.host_id
    with _locked(host_id, name, wait):
        record = load(host_id, name)
        if record is None or record.state != "active":
            raise StandbyError(f"domain {name!r} has no active standby protection here")
        try:
            domain = host.lookup(record.uuid)
        except DomainNotFound:
            raise _stop(host_id, record, None, "the domain is gone") from None
        domain_id = domain.id()
        if domain_id is None:
            raise _stop(host_id, record, None, "the domain stopped on this host")
        started = time.perf_counter()
        try:
            with pagexfer.connect(record.credentials(), record.peer, refresh_timeout(record.interval_s)) as conn:
                _send_dirty(record, domain, domain_id, conn)
        except (peer.PeerError, ramsync.MirrorTargetError) as err:
            raise _stop(host_id, record, domain, f"standby {record.standby} failed during a refresh: {err}") from err
        record.last_sync_at = time.time()
        record.last_seconds = round(time.perf_counter() - started, 4)
        _save(host_id, record)
        return record.status()


def refresh_timeout(interval_s: float) -> float:
    """Seconds a refresh waits for the standby (connect, each read or write) before it counts as failed:
    a few intervals, at least 2 s, at most 10 s (pure)."""
    return min(10.0, max(2.0, 5 * interval_s))


def due(record: Record, now: float) -> bool:
    """Whether hvextd owes *record* a refresh at *now* (pure)."""
    return record.state == "active" and now - record.last_sync_at >= record.interval_s


def failover(host: Host, name: str, *, reason: str = "planned") -> dict[str, Any]:
    """Hand *name* over to its standby: pause, last dirty pages, device state, the standby resumes it."""
    host_id = host.host_id
    with _locked(host_id, name):
        record = load(host_id, name)
        if record is None or record.state != "active":
            why = f" ({record.state}: {record.error})" if record is not None else ""
            raise StandbyError(f"domain {name!r} has no active standby protection here{why}")
        domain = host.lookup(record.uuid)
        domain_id = domain.id()
        if domain_id is None:
            raise DomainStateError(f"domain {name!r} does not run here")
        started = time.perf_counter()
        was_running = domain.state is RunState.RUNNING
        if was_running:
            domain.suspend()
        conn = pagexfer.connect(record.credentials(), record.peer, FAILOVER_TIMEOUT_S)
        with conn, tempfile.TemporaryDirectory(dir=_dir(host_id)) as tmp:
            before = record.bytes_sent
            try:
                pages, full = _send_dirty(record, domain, domain_id, conn)
                final_bytes = record.bytes_sent - before
                state_file = Path(tmp) / "device-state"
                saved = ramfile.save_device_state(domain, state_file, stop=False)  # QEMU paused, stopped below
            except BaseException as err:
                with contextlib.suppress(HvextError):
                    if was_running and domain.is_active():
                        domain.resume()
                raise StandbyError(f"failover of {name!r} failed before the hand-over; it runs here again: "
                                   f"{err}") from err
            paused_s = time.perf_counter() - started
            data = state_file.read_bytes()
            try:
                reply = _takeover(conn, name, data)
            except StandbyError as err:
                raise _stop(host_id, record, None, str(err)) from err
            if "error" in reply:  # the standby says it did not start the guest: it goes on here
                with contextlib.suppress(HvextError):
                    domain.destroy()
                    ramfile.start_on_ram_file(domain, state_file, paused=not was_running)
                raise _stop(host_id, record, None, f"the standby could not take over ({str(reply['error'])[:300]}); "
                                                   "the guest was resumed here")
            downtime = time.perf_counter() - started
            domain.destroy()  # paused since the stream completed; the standby runs the guest now
            try:  # this host's RAM file is a stale copy now: its memory goes back to the host
                ramfile.release(domain)
            except HvextError as err:
                log.warning("%s failed over, but its RAM file here was not emptied: %s", name, err)
        record.state = "failed over"
        report = {"domain": name, "standby": record.standby, "reason": reason, "downtime_s": round(downtime, 4),
                  "paused_before_handover_s": round(paused_s, 4), "final_pages": pages, "final_full": full,
                  "final_bytes": final_bytes, "state_bytes": saved.state_bytes, "ram_bytes": record.ram_bytes,
                  "bytes_at_failover": final_bytes + len(data),
                  "standby_start_s": reply.get("start_s"), "at": time.time()}
        record.failover = report
        _save(host_id, record)
    log.warning("%s failed over to %s (%s) in %.3f s", name, record.standby, reason, downtime)
    return report


def _takeover(conn: peer.Connection, name: str, state: bytes) -> dict[str, Any]:
    """Send ``ram-takeover``; the standby's reply (``{"error": ...}`` when it did not start the guest).

    A connection that fails after the request went out leaves it unknown whether the standby runs the
    guest: StandbyError, and the guest stays paused here (never running on two hosts)."""
    try:
        peer.send_frame(conn.sock, {"op": "ram-takeover", "domain": name}, state)
        reply, _ = peer.recv_frame(conn.sock)
    except (OSError, peer.PeerError) as err:
        raise StandbyError(f"the connection to the standby failed during the takeover of {name!r} ({err}): it may "
                           "or may not run the guest now; the guest stays paused here -- check the standby "
                           "(`hvext list` there), then `hvext destroy` one of them and resume the other") from err
    return reply


def battery(uri: str | None) -> list[dict[str, Any]]:
    """SIGPWR: every domain with active standby protection here fails over (one after the other)."""
    reports = []
    try:
        with Host(uri) as host:
            for record in records(host.host_id):
                if record.state != "active":
                    continue
                try:
                    reports.append(failover(host, record.domain, reason="power loss"))
                except HvextError as err:
                    log.error("power loss: failover of %s: %s", record.domain, err)
                    reports.append({"domain": record.domain, "error": str(err)})
    except HvextError as err:
        log.error("power loss: standby failovers: %s", err)
    return reports


def unprotect(host: Host, name: str) -> dict[str, Any]:
    """Stop standby protection of *name* (the dirty log stops, the standby drops the definition)."""
    host_id = host.host_id
    with _locked(host_id, name):
        record = load(host_id, name)
        if record is None:
            raise UsageError(f"domain {name!r} has no standby protection here")
        if record.state == "active":
            with contextlib.suppress(DomainNotFound, HvextError):
                aio.run(stop_log(host.lookup(record.uuid)))
        with contextlib.suppress(HvextError):
            with pagexfer.connect(record.credentials(), record.peer, 5.0) as conn:
                conn.request({"op": "ram-standby-drop", "domain": name})
        _path(host_id, name).unlink(missing_ok=True)
    return {"domain": name, "standby": record.standby, "stopped": True}


# ------------------------------------------------------------------------------------------ standby side


class StandbyService:
    """hvextd's standby side: the definitions it would run, and the takeover."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri

    def _name(self, header: dict[str, Any]) -> str:
        name = header.get("domain")
        if not isinstance(name, str):
            raise StandbyError("the request names no domain")
        return check_key_name("domain", name)

    def standby(self, header: dict[str, Any], payload: bytes, who: str) -> tuple[dict[str, Any], bytes]:
        name = self._name(header)
        definition, primary = header.get("definition"), header.get("primary_host_id")
        if not isinstance(definition, str) or not isinstance(primary, str) or len(definition) > 1 << 20:
            raise StandbyError("ram-standby needs the definition and the primary's host id")
        with Host(self.uri) as host:
            if ramfile.parse(definition) is None:
                raise StandbyError(f"the definition of {name!r} keeps no RAM in a file")
            ramfile.ram_path(name, primary)
            _dir(host.host_id, "standby-copies")
            durable.atomic_write(_path(host.host_id, name, "standby-copies"),
                                 json.dumps({"definition": definition, "primary_host_id": primary,
                                             "from": who, "at": time.time()}).encode())
        return {"ok": True}, b""

    def drop(self, header: dict[str, Any], payload: bytes, who: str) -> tuple[dict[str, Any], bytes]:
        name = self._name(header)
        with Host(self.uri) as host:
            _path(host.host_id, name, "standby-copies").unlink(missing_ok=True)
            try:
                running = host.lookup(name).is_active()
            except DomainNotFound:
                running = False
            if not running:
                with contextlib.suppress(HvextError, OSError):
                    ramfile.remove(ramfile.RamFile(ramfile.ram_path(name, host.host_id), 1))
        return {"ok": True}, b""

    def takeover(self, header: dict[str, Any], payload: bytes, who: str) -> tuple[dict[str, Any], bytes]:
        from hvext.migrate.orchestrate import rewrite_host_paths
        name = self._name(header)
        started = time.perf_counter()
        with Host(self.uri) as host:
            try:
                saved = json.loads(_path(host.host_id, name, "standby-copies").read_text())
            except (OSError, ValueError) as err:
                raise StandbyError(f"this host is no standby of {name!r}: {err}") from err
            xml = rewrite_host_paths(saved["definition"], name, saved["primary_host_id"], host.host_id)
            try:
                domain = host.lookup(name)
                if domain.is_active():
                    raise StandbyError(f"{name!r} runs on this host already")
                domain.redefine(xml)
                domain = host.lookup(name)
            except DomainNotFound:
                domain = host.define_xml(xml)
            host.prepare_runtime_dir(name)
            with tempfile.TemporaryDirectory(dir=_dir(host.host_id, "standby-copies")) as tmp:
                state_file = Path(tmp) / "device-state"
                durable.atomic_write(state_file, payload)
                ramfile.start_on_ram_file(domain, state_file)
            _path(host.host_id, name, "standby-copies").unlink(missing_ok=True)
        log.warning("%s taken over from %s: running here", name, who)
        return {"running": True, "start_s": round(time.perf_counter() - started, 4)}, b""

    def handlers(self) -> dict[str, peer.Handler]:
        return {"ram-standby": self.standby, "ram-standby-drop": self.drop, "ram-takeover": self.takeover}
