"""Hypervisor-based persistent memory (C12): volatile PMEM saved on power loss, restored on power-up.

A *protected* device is a guest PMEM device (NVDIMM or hvext virtio-pmem) whose
backing file lives in volatile host memory (``/dev/shm``) and that has a
nonvolatile store on disk (:mod:`hvext.pmem.store`). Registrations are kept in
``STATE_DIR/power/registry.json`` (replaced atomically, under a flock).

* :func:`protect` registers a device, starts the patched QEMU's dirty log for
  its domain (when running) and makes a first, full save.
* :func:`power_loss` (``hvext power loss``, SIGPWR to ``hvextd``): pauses every
  running domain with protected devices (concurrently; what guests may do
  before their pause is bounded by one budget, :data:`PREPAUSE_BUDGET_S`),
  saves each device -- only the 64 KiB
  blocks that the dirty page list names (pages of the device's RAM block map
  1:1 to backing file offsets) when the log has been running, unbroken, since
  the last save in this QEMU process; otherwise every block, compared by
  SHA-256 --, makes it durable and reports bytes and seconds. Guests stay
  paused (the power is going away).
* :func:`power_restore` (``hvext power restore``): recreates missing backing
  files from the stores, then resumes the paused guests or starts the ones that
  were running at the loss (paused first, so the dirty log starts before the
  guest writes).

Persistence hints (issue 6 part 4) are a :class:`HintProvider` given to both.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hvext import aio, durable, paths
from hvext.agent import protocol
from hvext.dirty import pages
from hvext.errors import DomainNotFound, HvextError, QMPError, UsageError
from hvext.host import Domain, Host, RunState
from hvext.pmem import devices, virtio
from hvext.pmem.devices import PmemDevice
from hvext.pmem.store import Store, StoreError, make_store_dir

log = logging.getLogger(__name__)

VOLATILE_DIR = paths.VOLATILE_DIR
#: Seconds that guests may hold up their pause in one power-loss save: agent hints, the freeze of
#: applications at an epoch and the wait for a virtio-pmem flush, for all domains together (they
#: run concurrently, against one deadline). After it, every guest is paused whatever it does.
PREPAUSE_BUDGET_S = 5.0
MAX_PREPAUSE_BUDGET_S = 300.0
#: Domains saved at the same time (each in its own thread: libvirt calls and file I/O block).
MAX_PARALLEL_SAVES = 16


class PowerError(HvextError):
    """Power-loss protection failed (registration, save or restore)."""


class PowerUsageError(PowerError, UsageError):
    """A power command was given a device, domain or path it cannot use."""


def power_dir() -> Path:
    return paths.STATE_DIR / "power"


def default_store(domain: str, backing: Path) -> Path:
    return power_dir() / "stores" / domain / backing.stem


def volatile_backing_dir(domain: Domain) -> Path:
    """``/dev/shm/hvext/<domain>``, created for QEMU's user (libvirt labels files, not directories)."""
    _, gid = domain.host.qemu_user()
    return paths.volatile_dir(domain.name, gid)


@dataclass
class Registration:
    """One protected device. ``dirty_log`` is the QEMU run (libvirt domain id) and dirty-log generation
    the last save consumed; ``pending`` is what restore must do with the domain ("resume", "start")."""

    domain: str
    uuid: str
    backing: str
    store: str
    model: str
    size: int
    ram_block: str
    dirty_log: dict[str, int] | None = None
    pending: str | None = None
    last_save: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- registry -------------------------------------------------------------
@contextmanager
def registry(directory: Path | None = None) -> Iterator[list[Registration]]:
    """The registrations, locked; changes to the list (and its items) are written back atomically.

    The registry's own I/O failing is a :class:`PowerError` naming the file; what the caller's block
    raises passes unchanged."""
    directory = directory or power_dir()
    path = directory / "registry.json"
    lock = directory / "registry.lock"
    try:
        make_store_dir(directory)  # the registry names guest memory files; stores below hold guest memory
        fd = durable.lock_file(lock)
    except OSError as err:
        raise PowerError(f"cannot lock the power registry {lock}: {err}") from err
    try:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as err:
            raise PowerError(f"cannot read the power registry {path}: {err}") from err
        try:
            # a damaged or hostile file: too deep, huge numbers, not JSON -> PowerError, nothing else
            raw = protocol.loads(data, PowerError, "the file") if data is not None else {"devices": []}
            regs = [Registration(**item) for item in raw["devices"]]
        except (PowerError, ValueError, KeyError, TypeError) as err:
            raise PowerError(f"power registry {path} is unreadable: {err}") from err
        before = json.dumps([r.to_dict() for r in regs], sort_keys=True)
        yield regs
        after = json.dumps([r.to_dict() for r in regs], sort_keys=True)
        if after != before:
            try:
                durable.atomic_write(path, json.dumps({"devices": [r.to_dict() for r in regs]}, indent=1).encode())
            except OSError as err:
                raise PowerError(f"cannot write the power registry {path}: {err}") from err
    finally:
        os.close(fd)


def registrations(directory: Path | None = None) -> list[Registration]:
    with registry(directory) as regs:
        return list(regs)


# -- persistence hints (part 4) ------------------------------------------
class HintProvider(Protocol):
    """What a power-loss save asks of persistence hints; :data:`hvext.pmem.hints.PROVIDER` asks the
    guest agent. Passed to :func:`power_loss` and :func:`power_restore` (None: no hints).

    ``before_pause(domain, deadline)`` runs just before the save pauses a running guest (e.g. freeze
    applications at an epoch; its report goes into the save's report) and must return by *deadline*
    (``time.monotonic()``). ``after_resume(domain)`` undoes it: after restore resumes the guest, or
    at once when the pause that ``before_pause`` prepared did not happen (the guest runs on).
    ``ranges(registration)`` says which (offset, length) byte ranges of the device a save must
    cover, None for the whole device. Their exceptions are reported, never raised further.
    """

    def before_pause(self, domain: Domain, deadline: float) -> dict[str, Any]: ...

    def after_resume(self, domain: Domain) -> None: ...

    def ranges(self, reg: Registration) -> list[tuple[int, int]] | None: ...


def ranges_to_save(reg: Registration, hints: HintProvider | None) -> list[tuple[int, int]]:
    """Byte ranges of the device a save must cover; the whole device unless *hints* narrow it."""
    if hints is not None:
        ranges = hints.ranges(reg)
        if ranges is not None:
            return [(int(o), int(n)) for o, n in ranges]
    return [(0, reg.size)]


# -- finding devices ------------------------------------------------------
def find_device(domain: Domain, backing: Path) -> PmemDevice:
    """The NVDIMM or hvext virtio-pmem device of *domain* backed by *backing*."""
    nvdimms = devices.parse_devices(domain.xml())
    if not nvdimms and domain.is_persistent():
        nvdimms = devices.parse_devices(domain.xml(inactive=True))
    for device in nvdimms + virtio.list_devices(domain):
        if device.path == Path(backing):
            return device
    raise PowerUsageError(f"domain {domain.name!r} has no pmem device backed by {backing}; "
                          f"`hvext pmem-list {domain.name}` shows them")


def ram_block_id(domain: Domain, device: PmemDevice) -> str:
    """QEMU's RAM block id of the device: libvirt's memory backend ("mem" + alias) or hvext's virtio id."""
    if device.model == "virtio-pmem":
        return device.alias or ""
    if device.alias:
        return f"mem{device.alias}"
    live = devices.parse_devices(domain.xml()) if domain.is_active() else []
    match = next((d for d in live if d.path == device.path and d.alias), None)
    return f"mem{match.alias}" if match else ""


# -- dirty log -------------------------------------------------------------
async def _start_log(domain: Domain) -> dict[str, int] | None:
    """Start the patched QEMU's dirty log; None when QEMU lacks it or someone else's log is running."""
    async with domain.qmp() as qmp:
        try:
            commands = pages.command_names(await qmp.execute("query-commands"))
            if pages.START not in commands:
                return None
            await qmp.execute(pages.START)
        except QMPError as err:
            log.warning("%s: no dirty log for power-loss saves (%s); saves compare block hashes",
                        domain.name, err)
            return None
    domain_id = domain.id()
    return None if domain_id is None else {"domain_id": domain_id, "generation": 0}


async def _fetch_dirty(domain: Domain) -> pages.DirtyPages | None:
    async with domain.qmp() as qmp:
        try:
            return pages.decode(await qmp.execute(pages.QUERY, {"encoding": "runs"}))
        except QMPError as err:
            log.info("%s: dirty pages unavailable (%s); hashing every block", domain.name, err)
            return None


def _dirty_blocks(reg: Registration, dirty: pages.DirtyPages | None, domain_id: int, store: Store) \
        -> set[int] | None:
    """Blocks the dirty list says may have changed, or None when the list cannot be trusted for *reg*."""
    if dirty is None or reg.dirty_log is None or reg.dirty_log.get("domain_id") != domain_id \
            or dirty.generation != reg.dirty_log.get("generation", -2) + 1:
        return None  # no log, another QEMU run, or someone else consumed pages in between
    block = dirty.blocks.get(reg.ram_block)
    if block is None or block.length != reg.size:
        return None
    ranges = [(first * dirty.page_size, count * dirty.page_size) for first, count in block.runs]
    return store.blocks_of_ranges(ranges)


# -- commands --------------------------------------------------------------
def protect(domain: Domain, backing: Path, store_dir: Path | None = None, *,
            registry_dir: Path | None = None) -> dict[str, Any]:
    """Register the device backed by *backing* for power-loss saves and make its first full save."""
    backing = Path(backing)
    device = find_device(domain, backing)
    # recorded absolute: a restore at boot (hvextd, another working directory) must find the same store
    store_dir = Path(os.path.abspath(store_dir)) if store_dir else default_store(domain.name, backing)
    if store_dir.resolve().is_relative_to(Path("/dev/shm")):
        raise PowerUsageError(f"store {store_dir} is in volatile memory; put it on disk")
    if not backing.is_file():
        raise PowerUsageError(f"backing {backing} does not exist (start the domain, or restore it first)")
    with registry(registry_dir) as regs:
        if any(r.backing == str(backing) for r in regs):
            raise PowerUsageError(f"{backing} is already protected; `hvext power list` shows it")
        if any(r.store == str(store_dir) for r in regs):
            raise PowerUsageError(f"store {store_dir} already belongs to another device")
        try:
            store = Store.open_or_create(store_dir, device.size)
        except StoreError as err:
            raise PowerError(f"cannot use store {store_dir}: {err}") from err
        reg = Registration(domain.name, domain.uuid(), str(backing), str(store_dir), device.model,
                           device.size, ram_block_id(domain, device))
        if domain.is_active():
            reg.dirty_log = aio.run(_start_log(domain)) if not _log_owned(regs, domain) else \
                _adopt_log(regs, domain)
        with os.fdopen(devices.open_backing(backing, os.O_RDONLY), "rb") as current:  # no link, no FIFO
            result = store.save(current)  # full: the log (started first) covers what changes meanwhile
        reg.last_save = result.to_dict()
        regs.append(reg)
    return {"registration": reg.to_dict(), "save": result.to_dict()}


def _log_owned(regs: list[Registration], domain: Domain) -> bool:
    domain_id = domain.id()
    return any(r.domain == domain.name and r.dirty_log and r.dirty_log.get("domain_id") == domain_id
               for r in regs)


def _adopt_log(regs: list[Registration], domain: Domain) -> dict[str, int] | None:
    """A second device of a domain shares the log the first started (same generation)."""
    domain_id = domain.id()
    for r in regs:
        if r.domain == domain.name and r.dirty_log and r.dirty_log.get("domain_id") == domain_id:
            return dict(r.dirty_log)
    return None


def unprotect(domain_name: str, backing: Path, *, remove_store: bool = False,
              registry_dir: Path | None = None, missing_ok: bool = False) -> Registration | None:
    """Drop the registration of *backing* (the store is kept unless *remove_store*)."""
    with registry(registry_dir) as regs:
        reg = next((r for r in regs if r.backing == str(backing) and r.domain == domain_name), None)
        if reg is None:
            if missing_ok:
                return None
            raise PowerUsageError(f"{backing} of {domain_name!r} is not protected; `hvext power list` shows "
                                  "what is")
        regs.remove(reg)
    if remove_store:
        _remove_store(reg)
    return reg


def _remove_store(reg: Registration) -> None:
    """Delete what hvext wrote in the store (not files someone else put there), and default dirs left empty."""
    store_dir = Path(reg.store)
    Store.remove(store_dir)
    domain_stores = power_dir() / "stores" / reg.domain
    if store_dir.parent == domain_stores:
        try:
            domain_stores.rmdir()
        except OSError:
            pass  # other devices' stores, or not there


def check_registry_access(registry_dir: Path | None = None) -> bool:
    """Whether this host has a power registry; PowerError when this user cannot even tell (the
    registry's directory is root's, 0700), so that callers fail before they change anything."""
    directory = registry_dir or power_dir()
    try:
        return (directory / "registry.json").exists()
    except PermissionError as err:
        raise PowerError(f"cannot read hvext's power registry in {directory} ({err.strerror}): the "
                         "domain's power-loss registrations can only be checked and dropped as root") from err


def unregister_domain(name: str, uuid: str, *, remove_store: bool = False,
                      registry_dir: Path | None = None) -> list[Registration]:
    """Drop every registration of the domain *uuid* (it is being undefined); stores kept unless asked."""
    if not check_registry_access(registry_dir):
        return []  # nothing was ever protected on this host
    with registry(registry_dir) as regs:
        gone = [r for r in regs if r.uuid == uuid or (not r.uuid and r.domain == name)]
        regs[:] = [r for r in regs if r not in gone]
    if remove_store:
        for reg in gone:
            _remove_store(reg)
    return gone


def _by_domain(regs: list[Registration]) -> dict[str, list[Registration]]:
    groups: dict[str, list[Registration]] = {}
    for reg in regs:
        groups.setdefault(reg.uuid, []).append(reg)
    return groups


def _selected(regs: list[Registration], domains: Collection[str] | None) -> dict[str, list[Registration]]:
    """The registrations grouped by domain, only those of *domains* (names) when given."""
    if domains is None:
        return _by_domain(regs)
    wanted = set(domains)
    unknown = sorted(wanted - {r.domain for r in regs})
    if unknown:
        raise PowerUsageError(f"no protected pmem devices for domain(s) {', '.join(unknown)}; "
                              "`hvext power list` shows them")
    return _by_domain([r for r in regs if r.domain in wanted])


def _lookup(host: Host, uuid: str) -> Domain | None:
    try:
        return host.lookup(uuid)
    except DomainNotFound:
        return None


def _missing(group: list[Registration]) -> list[dict[str, Any]]:
    """Registrations whose domain no longer exists (undefined outside hvext): reported, not failed."""
    return [{"domain": r.domain, "uuid": r.uuid, "backing": r.backing, "store": r.store} for r in group]


def check_budget(budget: float) -> float:
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget) \
            or not 0 <= budget <= MAX_PREPAUSE_BUDGET_S:
        raise PowerUsageError(f"the pre-pause budget must be 0 to {MAX_PREPAUSE_BUDGET_S:.0f} seconds, "
                              f"not {budget!r}")
    return float(budget)


def power_loss(host: Host, *, hints: HintProvider | None, domains: Collection[str] | None = None,
               budget: float | None = None, registry_dir: Path | None = None) -> dict[str, Any]:
    """Pause every guest with protected devices (only *domains*, names, when given) and save those
    devices durably (see the module doc), with persistence *hints* (None: whole devices, no freeze).

    Domains are saved concurrently. Guests may delay their pause (hints, epoch freeze, flush wait)
    until one deadline, *budget* seconds (:data:`PREPAUSE_BUDGET_S`) from now. One domain's failure,
    whatever it is, is reported in its entries and does not stop the others or the registry update.
    Registrations whose domain is gone are listed under ``missing`` and do not make ``ok`` false.
    """
    budget = check_budget(PREPAUSE_BUDGET_S if budget is None else budget)
    started = time.perf_counter()
    deadline = time.monotonic() + budget
    report: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    with registry(registry_dir) as regs:
        groups = list(_selected(regs, domains).items())
        if groups:
            with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_SAVES, len(groups)),
                                    thread_name_prefix="hvext-power") as pool:
                futures = [pool.submit(_save_guarded, host, uuid, group, hints, started, deadline)
                           for uuid, group in groups]
                for future in futures:  # in registry order; each never raises
                    saved, gone = future.result()
                    report += saved
                    missing += gone
    total_written = sum(r.get("bytes_written", 0) for r in report)
    return {"devices": report, "missing": missing, "bytes_written": total_written,
            "seconds": round(time.perf_counter() - started, 4), "budget_seconds": budget,
            "ok": all("error" not in r for r in report)}


def _error_text(err: BaseException) -> str:
    """An error for a report: hvext's and I/O errors as they are, anything else named (it is a bug)."""
    return str(err) if isinstance(err, (HvextError, OSError)) else f"unexpected {type(err).__name__}: {err}"


def _save_guarded(host: Host, uuid: str, group: list[Registration], hints: HintProvider | None,
                  started: float, deadline: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One domain's save (devices, missing); any exception becomes an error entry of its devices."""
    try:
        domain = _lookup(host, uuid)
        if domain is None:
            return [], _missing(group)
        return _save_domain(domain, group, hints, started, deadline), []
    except Exception as err:  # one domain failing must not stop the others' saves or the registry write
        log.exception("power-loss save of %s failed", group[0].domain)
        return [{"domain": r.domain, "backing": r.backing, "error": _error_text(err)} for r in group], []


def _prepare_pause(hints: HintProvider, domain: Domain, deadline: float) -> dict[str, Any]:
    """The hints' pause report (bounded by *deadline*); its failure is reported, never raised."""
    try:
        return hints.before_pause(domain, deadline)
    except Exception as err:
        log.warning("%s: preparing the pause failed: %s", domain.name, _error_text(err))
        return {"epoch_consistent": False, "hints": f"failed: {_error_text(err)}"}


def _thaw(hints: HintProvider | None, domain: Domain) -> None:
    if hints is None:
        return
    try:
        hints.after_resume(domain)
    except Exception as err:
        log.warning("%s: could not thaw the guest: %s", domain.name, _error_text(err))


def _save_domain(domain: Domain, group: list[Registration], hints: HintProvider | None,
                 started: float | None = None, deadline: float | None = None) -> list[dict[str, Any]]:
    started = time.perf_counter() if started is None else started
    deadline = time.monotonic() + PREPAUSE_BUDGET_S if deadline is None else deadline
    dirty = None
    domain_id = -1
    pending: str | None = None
    epoch: dict[str, Any] | None = None
    prepared = paused = False
    paused_at = time.perf_counter()
    try:
        running = domain.is_active() and domain.state is not RunState.PAUSED
        if hints is not None and running:
            prepared = True  # from here the guest may hold applications at an epoch: thawed unless paused
            epoch = _prepare_pause(hints, domain, deadline)
        state = domain.state
        running_id = domain.id()  # None: not running (nothing to pause)
        if running_id is not None:
            if state is not RunState.PAUSED:
                domain.suspend()
                pending = "resume"
            elif any(r.pending for r in group):
                pending = next(r.pending for r in group if r.pending)
            domain_id = running_id
        paused = domain_id >= 0
        paused_at = time.perf_counter()
        for reg in group:  # recorded now: restore resumes (and thaws) the guest even if the save fails
            reg.pending = pending if paused else None
    except Exception as err:  # not paused: no consistent copy to take; the other domains go on
        log.warning("%s: pausing failed: %s", domain.name, _error_text(err))
        return [{"domain": r.domain, "backing": r.backing, "model": r.model, "error": _error_text(err),
                 "paused": False, **({"epoch": epoch} if epoch is not None else {})} for r in group]
    finally:
        if prepared and not paused:  # the pause failed or the guest stopped: let its applications go
            _thaw(hints, domain)
    log_state: dict[str, int] | None = None
    try:
        if domain_id >= 0:
            if any(r.dirty_log and r.dirty_log.get("domain_id") == domain_id for r in group):
                dirty = aio.run(_fetch_dirty(domain))  # one query per domain: it consumes the pages
                if dirty is not None:
                    log_state = {"domain_id": domain_id, "generation": dirty.generation}
            else:  # this QEMU run has no log of ours yet: start it now (guest paused), hash this time
                log_state = aio.run(_start_log(domain))
    except Exception as err:  # monitor busy or gone: the save still happens, by hashes
        log.warning("%s: QMP unavailable (%s); saving by block hashes", domain.name, _error_text(err))
        dirty, log_state = None, None
    results = []
    for reg in group:
        entry: dict[str, Any] = {"domain": reg.domain, "backing": reg.backing, "model": reg.model}
        if domain_id < 0 and not Path(reg.backing).exists():
            entry.update(skipped="domain off and backing gone: the store holds the last save", bytes_written=0)
            results.append(entry)
            continue
        try:
            if domain_id >= 0:  # cold-plugged NVDIMMs only get their alias (the RAM block id) at start
                reg.ram_block = ram_block_id(domain, find_device(domain, Path(reg.backing))) or reg.ram_block
            store = Store.open(Path(reg.store))
            blocks = _dirty_blocks(reg, dirty, domain_id, store)
            wanted = store.blocks_of_ranges(ranges_to_save(reg, hints))
            mode = "dirty-log" if blocks is not None else "hashes"
            with os.fdopen(devices.open_backing(Path(reg.backing), os.O_RDONLY), "rb") as current:  # as root
                result = store.save(current, sorted(wanted if blocks is None else blocks & wanted), mode=mode)
            reg.last_save = result.to_dict()
            entry.update(result.to_dict())
            # the next query (generation + 1) lists every page written after this save read the device
            reg.dirty_log = dict(log_state) if log_state else None
        except Exception as err:  # this device failed; the domain's other devices are still saved
            if not isinstance(err, (HvextError, OSError)):
                log.exception("%s: saving %s failed", reg.domain, reg.backing)
            entry["error"] = _error_text(err)
            reg.dirty_log = None  # the pages this save consumed are lost to it: hash everything next time
        entry["paused"] = paused
        if paused:
            entry["paused_after_seconds"] = round(paused_at - started, 4)  # since the power-loss save began
        if epoch is not None:
            entry["epoch"] = epoch
        results.append(entry)
    for entry in results:
        entry["guest_paused_seconds"] = round(time.perf_counter() - paused_at, 4)
    return results


def power_restore(host: Host, *, hints: HintProvider | None, domains: Collection[str] | None = None,
                  registry_dir: Path | None = None) -> dict[str, Any]:
    """Recreate backing files from the stores where needed, then resume or start the guests (only
    *domains*, names, when given); *hints* thaw a resumed guest frozen at an epoch. Registrations
    whose domain is gone are listed under ``missing``."""
    started = time.perf_counter()
    report: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    with registry(registry_dir) as regs:
        for uuid, group in _selected(regs, domains).items():
            try:
                domain = _lookup(host, uuid)
                if domain is None:
                    missing += _missing(group)
                    continue
                report.append(_restore_domain(domain, group, hints))
            except Exception as err:  # one domain failing must not stop the others' restores
                log.exception("power restore of %s failed", group[0].domain)
                report.append({"domain": group[0].domain, "error": _error_text(err)})
    return {"domains": report, "missing": missing, "seconds": round(time.perf_counter() - started, 4),
            "ok": all("error" not in r for r in report)}


def _restore_domain(domain: Domain, group: list[Registration], hints: HintProvider | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"domain": domain.name, "devices": []}
    pending = next((r.pending for r in group if r.pending), None)
    try:
        if domain.is_active():
            # QEMU still maps the (possibly unlinked) memory: its contents are the newest
            for reg in group:
                entry["devices"].append({"backing": reg.backing, "action": "kept (guest still has it mapped)"})
            if pending and domain.state is RunState.PAUSED:
                domain.resume()
                if hints is not None:
                    hints.after_resume(domain)
                entry["action"] = "resumed"
        else:
            owner = domain.host.qemu_user()
            for reg in group:
                entry["devices"].append(_restore_file(domain, reg, owner, force=bool(pending)))
            if pending:
                dirty_log = _start_paused_with_log(domain)
                for reg in group:
                    reg.dirty_log = dict(dirty_log) if dirty_log else None
                entry["action"] = "started"
        for reg in group:
            reg.pending = None
        entry.setdefault("action", "none")
    except (HvextError, OSError) as err:
        entry["error"] = str(err)
    return entry


def _restore_file(domain: Domain, reg: Registration, owner: tuple[int, int], *, force: bool) -> dict[str, Any]:
    backing = Path(reg.backing)
    store = Store.open(Path(reg.store))
    if os.path.lexists(backing):
        with os.fdopen(devices.open_backing(backing, os.O_RDONLY), "rb") as current:  # no link, no FIFO
            differs = store.differs(current)
        if not differs:
            return {"backing": reg.backing, "action": "intact"}
        if not force:
            return {"backing": reg.backing, "action": "kept (differs from the store, and no power loss "
                                                      "was recorded: it is newer)"}
    if backing.parent.is_relative_to(VOLATILE_DIR):
        volatile_backing_dir(domain)
    elif not backing.parent.is_dir():
        raise PowerError(f"directory {backing.parent} of {backing} does not exist")
    result = store.restore(backing, owner=owner)
    return {"backing": reg.backing, "action": "restored", **result}


def _start_paused_with_log(domain: Domain) -> dict[str, int] | None:
    """Start the domain paused, start the dirty log, then let it run (no write escapes the log)."""
    domain.start(paused=True)
    try:
        dirty_log = aio.run(_start_log(domain))
    except QMPError as err:  # the guest still starts; the next save hashes every block
        log.warning("%s: no dirty log after restore (%s)", domain.name, err)
        dirty_log = None
    finally:
        domain.resume()
    return dirty_log


def status(host: Host, *, registry_dir: Path | None = None) -> list[dict[str, Any]]:
    """Registrations with their store's generation and the domain's state."""
    rows = []
    for reg in registrations(registry_dir):
        domain = _lookup(host, reg.uuid)
        row = reg.to_dict()
        row["state"] = domain.state.value if domain else "missing"
        try:
            row["store_stats"] = Store.open(Path(reg.store)).stats()
        except StoreError as err:
            row["store_stats"] = {"error": str(err)}
        row["backing_exists"] = Path(reg.backing).exists()
        rows.append(row)
    return rows
