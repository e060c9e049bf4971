"""Recovery of dirty data from a baseline and dirty page lists (C18), the actor.

**On the source** (the host a RAM-file domain runs on, :mod:`hvext.memory.ramfile`):

* :func:`take_baseline` (``hvext ha baseline DOMAIN --dir DIR``): starts the patched QEMU's dirty log (or
  continues the one an earlier baseline of this QEMU started), takes one query as the *mark*, then copies
  the whole RAM file to ``DIR/<domain>/baseline.<epoch>.ram`` (private, sparse) and writes
  ``DIR/<domain>/baseline.json`` (the epoch, the sizes, the definition, the source host). A page written
  during the copy is on the next list, so baseline + every page listed after the mark = the guest's RAM.
  DIR is a private directory every host reaches (checked as C13's shared store:
  :func:`hvext.ha.shared_store.check_dir`).
* :func:`refresh` (hvextd, every ``refresh_s``): the next dirty list, added to the *dirty set since the
  baseline* kept in this host's private state (``STATE_DIR/ha/volatile/<host id>/<domain>.json``). A list
  that does not continue the mark (QEMU restarted, another reader) makes the set unknown: the baseline is
  marked invalid and recovery refuses it until the next baseline. hvextd also takes a new baseline every
  ``baseline_s`` (:func:`due`).
* :func:`final` (peer request ``ram-final`` from the failover host): the guest is paused, the last list is
  added, the device state is saved without the shared RAM (:func:`hvext.memory.ramfile.save_device_state`,
  QEMU stops, the RAM file stays), and the dirty set and the device state go back to the puller.

**On the failover host**, :func:`recover` (``hvext ha recover DOMAIN --dir DIR``): reads the baseline
record (none: a clear refusal, nothing allocated or started), connects to the source's hvextd, allocates
this host's RAM file, fills it from the baseline, asks the source for ``ram-final``, pulls exactly the pages
on the dirty set (:class:`hvext.ha.pagexfer.SocketRegion`: the data path an RDMA transport could take
over), defines the domain here and starts QEMU on the RAM file and the device state. Any failure before
the guest runs removes what it made here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvext import aio, durable, paths
from hvext.dirty import pages as dirty_pages
from hvext.errors import DomainNotFound, DomainStateError, HAError, HvextError, QMPError, UnsupportedError, UsageError
from hvext.ha import pagexfer, ramsync, shared_store
from hvext.ha import volatile_policy as vpolicy
from hvext.ha.client import check_key_name
from hvext.ha.etcd import Credentials
from hvext.ha.mirror_policy import LogMark
from hvext.host import Domain, Host, RunState
from hvext.memory import ramfile

log = logging.getLogger("hvextd.volatile")

META = "baseline.json"
#: hvextd's defaults: seconds between dirty-list refreshes, and between baselines (0: only on demand).
REFRESH_S = 1.0
BASELINE_S = 0.0
LOCK_WAIT_S = 60.0
COPY_CHUNK = 4 << 20


class VolatileError(HAError):
    """A baseline or a recovery of volatile state failed, or is refused."""


class NoBaseline(VolatileError, UsageError):
    """There is no (valid) baseline to recover from."""


@dataclass
class SourceState:
    """The source host's record of a baselined domain (private, local)."""

    domain: str
    uuid: str
    dir: str
    epoch: int
    ram_path: str
    ram_bytes: int
    page_size: int
    block: str
    mark: dict[str, int]
    dirty: list[list[int]] = field(default_factory=list)
    valid: bool = True
    error: str | None = None
    source_host: str = ""
    refresh_s: float = REFRESH_S
    baseline_s: float = BASELINE_S
    taken_at: float = 0.0
    refreshed_at: float = 0.0
    handed_over: bool = False

    @property
    def log_mark(self) -> LogMark:
        return LogMark(self.mark["domain_id"], self.mark["generation"])

    @property
    def dirty_runs(self) -> vpolicy.Runs:
        return tuple((a, b) for a, b in self.dirty)

    def status(self) -> dict[str, Any]:
        out = asdict(self)
        out["dirty_pages"] = vpolicy.pages(self.dirty_runs)
        out["dirty_bytes"] = out["dirty_pages"] * self.page_size
        del out["dirty"]
        return out


# -------------------------------------------------------------------------------------------- files


def state_root(host_id: str) -> Path:
    """This host's baseline states (``STATE_DIR`` is shared by a lab's hosts: one directory per host)."""
    ramfile.ram_path("x", host_id)  # the host id's checks
    return paths.STATE_DIR / "ha" / "volatile" / host_id


def _state_dir(host_id: str) -> Path:
    root = state_root(host_id)
    root.parent.parent.mkdir(parents=True, exist_ok=True)
    paths.private_dir(root.parent)
    return paths.private_dir(root)


def _state_path(host_id: str, name: str) -> Path:
    ramfile.ram_path(name, host_id)
    return state_root(host_id) / f"{name}.json"


def load_state(host_id: str, name: str) -> SourceState | None:
    try:
        return SourceState(**json.loads(_state_path(host_id, name).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        raise VolatileError(f"cannot read the baseline state {_state_path(host_id, name)}: {err}") from err


def _save_state(host_id: str, state: SourceState) -> None:
    _state_dir(host_id)
    durable.atomic_write(_state_path(host_id, state.domain), json.dumps(asdict(state)).encode())


def states(host_id: str) -> list[SourceState]:
    root = state_root(host_id)
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.glob("*.json")):
        try:
            found = load_state(host_id, path.stem)
        except VolatileError as err:
            log.warning("%s", err)
            continue
        if found is not None:
            out.append(found)
    return out


@contextlib.contextmanager
def _locked(host_id: str, name: str, wait: float | None = LOCK_WAIT_S) -> Any:
    try:
        with durable.locked(_state_dir(host_id) / f"{name}.lock", wait=wait):
            yield
    except BlockingIOError:
        raise vpolicy.Busy(f"another baseline, refresh or hand-over of {name!r} is in progress") from None


def store_dir(base: Path, name: str) -> Path:
    """``DIR/<domain>``, private, made without following a link."""
    check_key_name("domain", name)
    return paths.private_dir(base / name)


def read_meta(base: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """The baseline record of *name* in the shared directory *base*; NoBaseline when there is none."""
    root = shared_store.check_dir(base)
    check_key_name("domain", name)
    path = root / name / META
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NoBaseline(f"no baseline of {name!r} in {root}: its RAM cannot be recovered from dirty pages (the "
                         f"primary died before `hvext ha baseline {name}` finished, or it never ran); nothing "
                         "was started") from None
    except OSError as err:
        raise VolatileError(f"cannot read {path}: {err.strerror}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise VolatileError(f"{path} is not a private file of hvext's")
        raw = os.read(fd, 8 << 20)
    finally:
        os.close(fd)
    try:
        meta = json.loads(raw)
    except ValueError as err:
        raise VolatileError(f"{path} is not a baseline record: {err}") from err
    need = {"domain": str, "uuid": str, "epoch": int, "ram_bytes": int, "page_size": int, "file": str,
            "source_host": str, "source_host_id": str, "definition": str, "taken_at": (int, float)}
    if not isinstance(meta, dict) or any(not isinstance(meta.get(k), t) for k, t in need.items()):
        raise VolatileError(f"{path} is not a complete baseline record")
    if meta["domain"] != name or "/" in meta["file"] or meta["page_size"] not in dirty_pages.PAGE_SIZES \
            or meta["ram_bytes"] <= 0 or meta["ram_bytes"] % meta["page_size"]:
        raise VolatileError(f"{path} does not describe a baseline of {name!r}")
    meta["path"] = str(root / name / meta["file"])
    return meta


def _copy_file(src_fd: int, dst_fd: int, size: int) -> int:
    """Copy *size* bytes, leaving all-zero chunks as holes; bytes written."""
    written = 0
    offset = 0
    while offset < size:
        chunk = os.pread(src_fd, min(COPY_CHUNK, size - offset), offset)
        if not chunk:
            raise VolatileError(f"the source ended at {offset:#x} of {size:#x}")
        if chunk.count(0) != len(chunk):
            pagexfer.write_extents(dst_fd, ((offset, len(chunk)),), chunk)
            written += len(chunk)
        offset += len(chunk)
    return written


# -------------------------------------------------------------------------------------- source side


async def query_dirty(domain: Domain, block: str, size: int, *, start: bool) -> dirty_pages.DirtyPages:
    async with domain.qmp() as qmp:
        if start:
            if dirty_pages.QUERY not in dirty_pages.command_names(await qmp.execute("query-commands")):
                raise UnsupportedError("a baseline needs dirty page lists: the patched QEMU (`make qemu`)")
            try:
                await qmp.execute(dirty_pages.START)
            except QMPError as err:
                raise VolatileError(f"the dirty log of {domain.name!r} is in use by another hvext user (mirroring, "
                                    f"PMEM power protection, `hvext dirty --watch`): {err}") from err
        dirty = dirty_pages.decode(await qmp.execute(dirty_pages.QUERY, {"encoding": "runs"}))
    found = dirty.blocks.get(block)
    if found is None or found.length != size:
        raise VolatileError(f"QEMU's dirty list of {domain.name!r} has no {size}-byte block {block!r}")
    return dirty


async def stop_log(domain: Domain) -> None:
    with contextlib.suppress(HvextError):
        async with domain.qmp() as qmp:
            await qmp.execute(dirty_pages.STOP)


def _add(state: SourceState, domain_id: int, dirty: dirty_pages.DirtyPages) -> None:
    """Add a dirty list to the state's set, or mark the set unknown when the list does not continue it."""
    reason = vpolicy.continues(state.log_mark, domain_id, dirty.generation)
    if reason is not None:
        if state.valid:
            log.error("baseline of %s is no longer usable: %s", state.domain, reason)
        state.valid, state.error = False, f"the dirty pages since the baseline are unknown: {reason}"
        return
    state.dirty = [list(r) for r in vpolicy.union(state.dirty_runs, dirty.blocks[state.block].runs)]
    state.mark = {"domain_id": domain_id, "generation": dirty.generation}
    state.refreshed_at = time.time()


def take_baseline(host: Host, name: str, directory: str | os.PathLike[str], host_name: str, *,
                  refresh_s: float | None = None, baseline_s: float | None = None) -> dict[str, Any]:
    """``hvext ha baseline DOMAIN --dir DIR``: a new baseline of the running RAM-file domain *name* (see the
    module docstring). An earlier baseline stays usable when this one fails; a dirty log started here is
    stopped again when there was none."""
    base = shared_store.check_dir(directory)
    check_key_name("host", host_name)
    domain = host.lookup(name)
    domain.require_running()
    ram = ramfile.require(domain)
    for value, what in ((refresh_s, "refresh interval"), (baseline_s, "baseline interval")):
        if value is not None and not (0 <= value <= 86400):
            raise UsageError(f"the {what} is seconds from 0 to 86400")
    target_dir = store_dir(base, domain.name)
    try:
        return _take(host, domain, ram, base, target_dir, host_name, refresh_s, baseline_s)
    except BaseException:
        with contextlib.suppress(OSError):
            target_dir.rmdir()  # made here and still empty: nothing is left of a failed first baseline
        raise


def _take(host: Host, domain: Domain, ram: ramfile.RamFile, base: Path, target_dir: Path, host_name: str,
          refresh_s: float | None, baseline_s: float | None) -> dict[str, Any]:
    host_id = host.host_id
    with _locked(host_id, domain.name):
        old = load_state(host_id, domain.name)
        domain_id = domain.id()
        if domain_id is None:
            raise DomainStateError(f"domain {domain.name!r} stopped")
        continuing = old is not None and old.mark.get("domain_id") == domain_id and not old.handed_over
        dirty = aio.run(query_dirty(domain, ram.block_id, ram.size, start=not continuing))
        epoch = (old.epoch + 1) if old is not None else 1
        if continuing and old is not None:
            _add(old, domain_id, dirty)  # the old baseline stays exact if this copy fails
            _save_state(host_id, old)
        final_name = f"baseline.{epoch}.ram"
        partial = target_dir / f".{final_name}.part"
        started = time.perf_counter()
        try:
            partial.unlink(missing_ok=True)
            dst = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(dst, ram.size)
                src = ramsync.open_source(ram.path, ram.size)
                try:
                    written = _copy_file(src, dst, ram.size)
                finally:
                    os.close(src)
                os.fsync(dst)
            finally:
                os.close(dst)
            os.replace(partial, target_dir / final_name)
            state = SourceState(domain.name, domain.uuid(), str(base), epoch, str(ram.path), ram.size,
                                dirty.page_size, ram.block_id,
                                {"domain_id": domain_id, "generation": dirty.generation}, source_host=host_name,
                                refresh_s=old.refresh_s if old and refresh_s is None else (refresh_s or REFRESH_S),
                                baseline_s=old.baseline_s if old and baseline_s is None else (baseline_s or 0.0),
                                taken_at=time.time(), refreshed_at=time.time())
            _save_state(host_id, state)
            meta = {"domain": domain.name, "uuid": domain.uuid(), "epoch": epoch, "ram_bytes": ram.size,
                    "page_size": dirty.page_size, "block": ram.block_id, "file": final_name,
                    "source_host": host_name, "source_host_id": host_id,
                    "definition": domain.xml(inactive=True), "taken_at": state.taken_at}
            durable.atomic_write(target_dir / META, json.dumps(meta).encode())
            durable.fsync_dir(target_dir)
        except BaseException:
            partial.unlink(missing_ok=True)
            if not continuing:
                aio.run(stop_log(domain))
            raise
    for stale in target_dir.glob("baseline.*.ram"):
        if stale.name != final_name:
            stale.unlink(missing_ok=True)
    return {**state.status(), "file": str(target_dir / final_name), "bytes_written": written,
            "seconds": round(time.perf_counter() - started, 3)}


def refresh(host: Host, name: str, *, wait: float | None = 0) -> dict[str, Any]:
    """Add the next dirty list of *name* to its dirty set since the baseline (hvextd's schedule)."""
    host_id = host.host_id
    with _locked(host_id, name, wait):
        state = load_state(host_id, name)
        if state is None:
            raise NoBaseline(f"domain {name!r} has no baseline on this host")
        if not state.valid or state.handed_over:
            return state.status()
        try:
            domain = host.lookup(state.uuid)
        except DomainNotFound:
            state.valid, state.error = False, "the domain is gone"
            _save_state(host_id, state)
            return state.status()
        domain_id = domain.id()
        if domain_id is None:
            return state.status()  # QEMU stopped: the RAM file no longer changes; a new QEMU breaks the mark
        try:
            dirty = aio.run(query_dirty(domain, state.block, state.ram_bytes, start=False))
        except QMPError as err:
            if domain.id() != domain_id:
                return state.status()
            raise VolatileError(f"dirty list of {name!r}: {err}") from err
        _add(state, domain_id, dirty)
        _save_state(host_id, state)
        return state.status()


def due(state: SourceState, now: float) -> str | None:
    """What hvextd owes *state* at *now*: "baseline", "refresh" or None (pure)."""
    if state.handed_over:
        return None
    if state.baseline_s > 0 and now - state.taken_at >= state.baseline_s:
        return "baseline"
    if state.valid and now - state.refreshed_at >= state.refresh_s:
        return "refresh"
    return None


def final(host: Host, name: str, epoch: int) -> tuple[dict[str, Any], bytes]:
    """The source's side of a recovery: pause, last dirty list, device state (QEMU stops, the RAM file is
    kept); (the dirty set and sizes, the device-state bytes). Refused when the baseline asked for is not
    this host's current, valid one, or when the guest does not run here (the pages written since the last
    refresh could not be listed)."""
    host_id = host.host_id
    with _locked(host_id, name):
        state = load_state(host_id, name)
        if state is None:
            raise NoBaseline(f"this host keeps no dirty pages of {name!r}")
        if state.epoch != epoch:
            raise NoBaseline(f"baseline {epoch} of {name!r} is not this host's current one ({state.epoch})")
        if not state.valid:
            raise NoBaseline(f"the baseline of {name!r} is unusable: {state.error}")
        if state.handed_over:
            raise VolatileError(f"{name!r} was handed over already")
        domain = host.lookup(state.uuid)
        domain_id = domain.id()
        if domain_id is None:
            raise VolatileError(f"{name!r} does not run on this host: the pages written since the last refresh "
                                f"({time.time() - state.refreshed_at:.1f} s ago) cannot be listed")
        if domain.state is RunState.RUNNING:
            domain.suspend()
        try:
            dirty = aio.run(query_dirty(domain, state.block, state.ram_bytes, start=False))
            _add(state, domain_id, dirty)
            if not state.valid:
                raise NoBaseline(f"the baseline of {name!r} is unusable: {state.error}")
            with tempfile.TemporaryDirectory(dir=_state_dir(host_id)) as tmp:
                saved = ramfile.save_device_state(domain, Path(tmp) / "device-state")
                data = saved.state_file.read_bytes()
        except BaseException:
            with contextlib.suppress(HvextError):
                if domain.is_active() and domain.state is RunState.PAUSED:
                    domain.resume()
            _save_state(host_id, state)
            raise
        state.handed_over = True
        _save_state(host_id, state)
    return {"epoch": state.epoch, "runs": state.dirty, "page_size": state.page_size,
            "ram_bytes": state.ram_bytes, "state_bytes": len(data)}, data


def forget(host: Host, name: str) -> bool:
    """Drop *name*'s baseline state on this host (the shared copy stays); whether there was one."""
    host_id = host.host_id
    with _locked(host_id, name):
        state = load_state(host_id, name)
        if state is None:
            return False
        with contextlib.suppress(DomainNotFound):
            domain = host.lookup(state.uuid)
            if domain.id() == state.mark.get("domain_id") and not state.handed_over:
                aio.run(stop_log(domain))
        _state_path(host_id, name).unlink(missing_ok=True)
    return True


class SourceService:
    """hvextd's peer handlers of the source side: which RAM it offers (domains with a valid baseline here)
    and ``ram-final``."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._host_id: str | None = None

    @property
    def host_id(self) -> str:
        if self._host_id is None:
            with Host(self.uri) as host:
                self._host_id = host.host_id
        return self._host_id

    def sources(self, name: str) -> tuple[Path, int] | None:
        try:
            state = load_state(self.host_id, name)
        except (VolatileError, UsageError):
            return None
        if state is None or not state.valid:
            return None
        return Path(state.ram_path), state.ram_bytes

    def final(self, header: dict[str, Any], payload: bytes, who: str) -> tuple[dict[str, Any], bytes]:
        name, epoch = header.get("domain"), header.get("epoch")
        if not isinstance(name, str) or not isinstance(epoch, int) or isinstance(epoch, bool):
            raise VolatileError("ram-final needs a domain and an epoch")
        check_key_name("domain", name)
        log.warning("handing %s over to %s (baseline %d)", name, who, epoch)
        with Host(self.uri) as host:
            return final(host, name, epoch)

    def region_service(self) -> pagexfer.RegionService:
        return pagexfer.RegionService(pagexfer.ram_file_copy(self.uri), self.sources, {"ram-final": self.final})


# ------------------------------------------------------------------------------------- failover side


def recover(host: Host, name: str, directory: str | os.PathLike[str], creds: Credentials, peer_address: str,
            *, paused: bool = False) -> dict[str, Any]:
    """``hvext ha recover DOMAIN --dir DIR``: run *name* on this host from its baseline in *directory* and the
    pages its source (hvextd at *peer_address*) lists as dirty since; see the module docstring. Returns the
    accounting (:class:`volatile_policy.PullAccount`) and timings."""
    started = time.perf_counter()
    meta = read_meta(directory, name)  # NoBaseline: nothing made yet
    if meta["source_host_id"] == host.host_id:
        raise UsageError(f"the baseline of {name!r} was taken on this host: recover it on another one")
    try:
        existing: Domain | None = host.lookup(name)
    except DomainNotFound:
        existing = None
    if existing is not None and existing.is_active():
        raise DomainStateError(f"domain {name!r} already runs on this host")
    if existing is not None and ramfile.saved_to_ram(existing):
        raise DomainStateError(f"domain {name!r} is saved to RAM on this host: `hvext start` it, or "
                               f"`hvext managedsave-remove {name}` first")
    ram = ramfile.RamFile(ramfile.ram_path(name, host.host_id), meta["ram_bytes"])
    definition = _definition_here(meta, host)
    conn = pagexfer.connect(creds, peer_address)  # unreachable or refused: nothing made yet
    made: list[str] = []
    timings: dict[str, float] = {}
    try:
        with conn:
            if ramfile.prepare_on(host, name, ram):
                made.append("ram")
            ramfile.empty(ram)
            fill_started = time.perf_counter()
            base_fd = ramsync.open_source(Path(meta["path"]), meta["ram_bytes"])
            try:
                dst = os.open(ram.path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    filled = _copy_file(base_fd, dst, meta["ram_bytes"])
                    timings["fill_s"] = time.perf_counter() - fill_started
                    pull_started = time.perf_counter()
                    request = {"op": "ram-final", "domain": name, "epoch": meta["epoch"]}
                    reply, state_bytes = conn.request(request)
                    control = pagexfer._frame_bytes(request, b"") + pagexfer._frame_bytes(reply, b"")
                    if reply.get("ram_bytes") != meta["ram_bytes"] or reply.get("page_size") != meta["page_size"]:
                        raise VolatileError("the source's RAM is not the baseline's size")
                    runs = vpolicy.check_runs(reply.get("runs"), meta["ram_bytes"] // meta["page_size"])
                    region = pagexfer.SocketRegion(conn, name, "source", meta["ram_bytes"])
                    pulled = 0
                    for batch in vpolicy.batches(runs, meta["page_size"]):
                        data = region.read(batch)
                        pagexfer.write_extents(dst, batch, data)
                        pulled += len(data)
                    timings["pull_s"] = time.perf_counter() - pull_started
                finally:
                    os.close(dst)
            finally:
                os.close(base_fd)
        account = vpolicy.PullAccount(vpolicy.pages(runs), meta["page_size"], pulled, region.wire_bytes + control,
                                      len(state_bytes), region.requests + 1)
        start_started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=_state_dir(host.host_id)) as tmp:
            state_file = Path(tmp) / "device-state"
            durable.atomic_write(state_file, state_bytes)
            if existing is None:
                domain = host.define_xml(definition)
                made.append("definition")
            else:
                existing.redefine(definition)
                domain = host.lookup(name)
            host.prepare_runtime_dir(name)
            ramfile.start_on_ram_file(domain, state_file, paused=paused)
        timings["start_s"] = time.perf_counter() - start_started
    except BaseException:
        _undo(host, name, ram, made)
        raise
    return {"domain": name, "epoch": meta["epoch"], "source_host": meta["source_host"], "ram_file": str(ram.path),
            "baseline_bytes_written": filled, **account.to_dict(),
            "runs": [list(r) for r in runs],
            **{k: round(v, 4) for k, v in timings.items()}, "seconds": round(time.perf_counter() - started, 4)}


def _definition_here(meta: dict[str, Any], host: Host) -> str:
    from hvext.migrate.orchestrate import rewrite_host_paths
    xml = rewrite_host_paths(meta["definition"], meta["domain"], meta["source_host_id"], host.host_id)
    ram = ramfile.parse(xml)
    if ram is None or ram.path != ramfile.ram_path(meta["domain"], host.host_id) or ram.size != meta["ram_bytes"]:
        raise VolatileError(f"the baseline's definition of {meta['domain']!r} has no RAM file of "
                            f"{meta['ram_bytes']} bytes")
    return xml


def _undo(host: Host, name: str, ram: ramfile.RamFile, made: list[str]) -> None:
    with contextlib.suppress(HvextError):
        domain = host.lookup(name)
        if domain.is_active():
            domain.destroy()
        if "definition" in made:
            domain.undefine(remove_state=False)
    with contextlib.suppress(HvextError, OSError):
        if "ram" in made:
            ramfile.remove(ram)
        else:
            ramfile.empty(ram)


def peer_address_of(client: Any, host_name: str) -> str:
    """The peer address (host:port) hvextd of *host_name* registered in the cluster."""
    address = (client.host_records().get(host_name) or {}).get("peer")
    if not isinstance(address, str) or ":" not in address:
        raise VolatileError(f"host {host_name} is not alive in the cluster or has no peer address: its dirty "
                            "pages cannot be pulled")
    return address


__all__ = ["NoBaseline", "SourceService", "SourceState", "VolatileError", "due", "final", "forget",
           "load_state", "read_meta", "recover", "refresh", "states", "take_baseline"]
