"""Hypervisor-based persistent memory (C12): volatile PMEM saved on power loss, restored on power-up.

A *protected* device is a guest PMEM device (NVDIMM or hvext virtio-pmem) whose
backing file lives in volatile host memory (``/dev/shm``) and that has a
nonvolatile store on disk (:mod:`hvext.pmem.store`). Registrations are kept in
``STATE_DIR/power/registry.json`` (replaced atomically, under a flock).

* :func:`protect` registers a device, starts the patched QEMU's dirty log for
  its domain (when running) and makes a first, full save.
* :func:`power_loss` (``hvext power loss``, SIGPWR to ``hvextd``): pauses every
  running domain with protected devices, saves each device -- only the 64 KiB
  blocks that the dirty page list names (pages of the device's RAM block map
  1:1 to backing file offsets) when the log has been running, unbroken, since
  the last save in this QEMU process; otherwise every block, compared by
  SHA-256 --, makes it durable and reports bytes and seconds. Guests stay
  paused (the power is going away).
* :func:`power_restore` (``hvext power restore``): recreates missing backing
  files from the stores, then resumes the paused guests or starts the ones that
  were running at the loss (paused first, so the dirty log starts before the
  guest writes).

Persistence hints (issue 6 part 4) plug in through :func:`set_ranges_hook`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from hvext import aio, paths
from hvext.dirty import pages
from hvext.errors import DomainNotFound, HvextError, QMPError, UsageError
from hvext.host import Domain, Host, libvirt_errors
from hvext.pmem import devices, virtio
from hvext.pmem.devices import PmemDevice
from hvext.pmem.store import Store, StoreError, write_atomic

log = logging.getLogger(__name__)

VOLATILE_DIR = paths.VOLATILE_DIR


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
    """The registrations, locked; changes to the list (and its items) are written back atomically."""
    directory = directory or power_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "registry.json"
    fd = os.open(directory / "registry.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            raw = json.loads(path.read_text()) if path.exists() else {"devices": []}
            regs = [Registration(**item) for item in raw["devices"]]
        except (ValueError, KeyError, TypeError) as err:
            raise PowerError(f"power registry {path} is unreadable: {err}") from err
        before = json.dumps([r.to_dict() for r in regs], sort_keys=True)
        yield regs
        after = json.dumps([r.to_dict() for r in regs], sort_keys=True)
        if after != before:
            write_atomic(path, json.dumps({"devices": [r.to_dict() for r in regs]}, indent=1).encode())
    finally:
        os.close(fd)


def registrations(directory: Path | None = None) -> list[Registration]:
    with registry(directory) as regs:
        return list(regs)


# -- persistence hints hook (part 4) -------------------------------------
RangesHook = Callable[[Registration], list[tuple[int, int]] | None]
_ranges_hook: RangesHook | None = None


def set_ranges_hook(hook: RangesHook | None) -> None:
    """Install the function that says which byte ranges of a device must be saved (persistence hints).
    It returns (offset, length) ranges, or None for "the whole device"."""
    global _ranges_hook
    _ranges_hook = hook


PauseHook = Callable[[Domain], dict[str, Any]]
ResumeHook = Callable[[Domain], None]
_before_pause: PauseHook | None = None
_after_resume: ResumeHook | None = None


def set_pause_hooks(before: PauseHook | None, after: ResumeHook | None) -> None:
    """Install what runs just before a save pauses a guest (e.g. freeze applications at an epoch;
    its report goes into the save's report) and after restore resumes it (thaw)."""
    global _before_pause, _after_resume
    _before_pause, _after_resume = before, after


def ranges_to_save(reg: Registration) -> list[tuple[int, int]]:
    """Byte ranges of the device a save must cover; the whole device unless a hints hook narrows it."""
    if _ranges_hook is not None:
        ranges = _ranges_hook(reg)
        if ranges is not None:
            return [(int(o), int(n)) for o, n in ranges]
    return [(0, reg.size)]


# -- finding devices ------------------------------------------------------
def find_device(domain: Domain, backing: Path) -> PmemDevice:
    """The NVDIMM or hvext virtio-pmem device of *domain* backed by *backing*."""
    with libvirt_errors(f"domain {domain.name!r}"):
        xml = domain.dom.XMLDesc(0)
    nvdimms = devices.parse_devices(xml)
    if not nvdimms and domain.dom.isPersistent():
        with libvirt_errors(f"domain {domain.name!r}"):
            nvdimms = devices.parse_devices(domain.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
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
    with libvirt_errors(f"domain {domain.name!r}"):
        live = devices.parse_devices(domain.dom.XMLDesc(0)) if domain.dom.isActive() else []
    match = next((d for d in live if d.path == device.path and d.alias), None)
    return f"mem{match.alias}" if match else ""


# -- dirty log -------------------------------------------------------------
async def _start_log(domain: Domain) -> dict[str, int] | None:
    """Start the patched QEMU's dirty log; None when QEMU lacks it or someone else's log is running."""
    async with domain.qmp() as qmp:
        try:
            commands = {c["name"] for c in await qmp.execute("query-commands")}
            if pages.START not in commands:
                return None
            await qmp.execute(pages.START)
        except QMPError as err:
            log.warning("%s: no dirty log for power-loss saves (%s); saves compare block hashes",
                        domain.name, err)
            return None
    return {"domain_id": domain.dom.ID(), "generation": 0}


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
    store_dir = Path(store_dir) if store_dir else default_store(domain.name, backing)
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
        reg = Registration(domain.name, domain.dom.UUIDString(), str(backing), str(store_dir), device.model,
                           device.size, ram_block_id(domain, device))
        if domain.is_active():
            reg.dirty_log = aio.run(_start_log(domain)) if not _log_owned(regs, domain) else \
                _adopt_log(regs, domain)
        result = store.save(backing)  # full: the log (started first) covers what changes meanwhile
        reg.last_save = result.to_dict()
        regs.append(reg)
    return {"registration": reg.to_dict(), "save": result.to_dict()}


def _log_owned(regs: list[Registration], domain: Domain) -> bool:
    return any(r.domain == domain.name and r.dirty_log and r.dirty_log.get("domain_id") == domain.dom.ID()
               for r in regs)


def _adopt_log(regs: list[Registration], domain: Domain) -> dict[str, int] | None:
    """A second device of a domain shares the log the first started (same generation)."""
    for r in regs:
        if r.domain == domain.name and r.dirty_log and r.dirty_log.get("domain_id") == domain.dom.ID():
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
        shutil.rmtree(reg.store, ignore_errors=True)
    return reg


def _by_domain(regs: list[Registration]) -> dict[str, list[Registration]]:
    groups: dict[str, list[Registration]] = {}
    for reg in regs:
        groups.setdefault(reg.uuid, []).append(reg)
    return groups


def _lookup(host: Host, uuid: str) -> Domain | None:
    try:
        return host.lookup(uuid)
    except DomainNotFound:
        return None


def power_loss(host: Host, *, registry_dir: Path | None = None) -> dict[str, Any]:
    """Pause every guest with protected devices and save those devices durably (see the module doc)."""
    started = time.perf_counter()
    report: list[dict[str, Any]] = []
    with registry(registry_dir) as regs:
        for uuid, group in _by_domain(regs).items():
            domain = _lookup(host, uuid)
            if domain is None:
                report += [{"domain": r.domain, "backing": r.backing, "error": "domain no longer exists"}
                           for r in group]
                continue
            try:
                report += _save_domain(domain, group)
            except HvextError as err:  # one domain failing must not stop the others' saves
                report += [{"domain": r.domain, "backing": r.backing, "error": str(err)} for r in group]
    total_written = sum(r.get("bytes_written", 0) for r in report)
    return {"devices": report, "bytes_written": total_written,
            "seconds": round(time.perf_counter() - started, 4),
            "ok": all("error" not in r for r in report)}


def _save_domain(domain: Domain, group: list[Registration]) -> list[dict[str, Any]]:
    paused_at = time.perf_counter()
    dirty = None
    domain_id = -1
    pending: str | None = None
    epoch: dict[str, Any] | None = None
    if _before_pause is not None and domain.is_active() and domain.dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
        epoch = _before_pause(domain)
    with libvirt_errors(f"pausing {domain.name!r}"):
        state = domain.dom.state()[0]
        if domain.dom.isActive():
            domain_id = domain.dom.ID()
            if state != libvirt.VIR_DOMAIN_PAUSED:
                domain.dom.suspend()
                pending = "resume"
            elif any(r.pending for r in group):
                pending = next(r.pending for r in group if r.pending)
    log_state: dict[str, int] | None = None
    try:
        if domain_id >= 0:
            if any(r.dirty_log and r.dirty_log.get("domain_id") == domain_id for r in group):
                dirty = aio.run(_fetch_dirty(domain))  # one query per domain: it consumes the pages
                if dirty is not None:
                    log_state = {"domain_id": domain_id, "generation": dirty.generation}
            else:  # this QEMU run has no log of ours yet: start it now (guest paused), hash this time
                log_state = aio.run(_start_log(domain))
    except QMPError as err:  # monitor busy or gone: the save still happens, by hashes
        log.warning("%s: QMP unavailable (%s); saving by block hashes", domain.name, err)
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
            wanted = store.blocks_of_ranges(ranges_to_save(reg))
            mode = "dirty-log" if blocks is not None else "hashes"
            result = store.save(Path(reg.backing), sorted(wanted if blocks is None else blocks & wanted),
                                mode=mode)
            reg.last_save = result.to_dict()
            entry.update(result.to_dict())
            # the next query (generation + 1) lists every page written after this save read the device
            reg.dirty_log = dict(log_state) if log_state else None
        except (HvextError, OSError) as err:
            entry["error"] = str(err)
            reg.dirty_log = None  # the pages this save consumed are lost to it: hash everything next time
        reg.pending = pending if domain_id >= 0 else None
        entry["paused"] = domain_id >= 0
        if epoch is not None:
            entry["epoch"] = epoch
        results.append(entry)
    for entry in results:
        entry["guest_paused_seconds"] = round(time.perf_counter() - paused_at, 4)
    return results


def power_restore(host: Host, *, registry_dir: Path | None = None) -> dict[str, Any]:
    """Recreate backing files from the stores where needed, then resume or start the guests."""
    started = time.perf_counter()
    report: list[dict[str, Any]] = []
    with registry(registry_dir) as regs:
        for uuid, group in _by_domain(regs).items():
            domain = _lookup(host, uuid)
            if domain is None:
                report.append({"domain": group[0].domain, "error": "domain no longer exists"})
                continue
            report.append(_restore_domain(domain, group))
    return {"domains": report, "seconds": round(time.perf_counter() - started, 4),
            "ok": all("error" not in r for r in report)}


def _restore_domain(domain: Domain, group: list[Registration]) -> dict[str, Any]:
    entry: dict[str, Any] = {"domain": domain.name, "devices": []}
    pending = next((r.pending for r in group if r.pending), None)
    try:
        if domain.is_active():
            # QEMU still maps the (possibly unlinked) memory: its contents are the newest
            for reg in group:
                entry["devices"].append({"backing": reg.backing, "action": "kept (guest still has it mapped)"})
            if pending and domain.state() == "paused":
                with libvirt_errors(f"resuming {domain.name!r}"):
                    domain.dom.resume()
                if _after_resume is not None:
                    _after_resume(domain)
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
    if backing.exists():
        if not store.differs(backing):
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
    with libvirt_errors(f"starting {domain.name!r}"):
        domain.dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    try:
        dirty_log = aio.run(_start_log(domain))
    except QMPError as err:  # the guest still starts; the next save hashes every block
        log.warning("%s: no dirty log after restore (%s)", domain.name, err)
        dirty_log = None
    finally:
        with libvirt_errors(f"resuming {domain.name!r}"):
            domain.dom.resume()
    return dirty_log


def status(host: Host, *, registry_dir: Path | None = None) -> list[dict[str, Any]]:
    """Registrations with their store's generation and the domain's state."""
    rows = []
    for reg in registrations(registry_dir):
        domain = _lookup(host, reg.uuid)
        row = reg.to_dict()
        row["state"] = domain.state() if domain else "missing"
        try:
            row["store_stats"] = Store.open(Path(reg.store)).stats()
        except StoreError as err:
            row["store_stats"] = {"error": str(err)}
        row["backing_exists"] = Path(reg.backing).exists()
        rows.append(row)
    return rows
