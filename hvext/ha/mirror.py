"""Memory mirroring (C19, kMemvisor-like), the actor: a backup copy of a guest's RAM (all of it or chosen
guest-physical ranges) on this host, kept in sync from the patched QEMU's dirty page lists, and the repair
of a page with an uncorrectable memory error from that copy.

The guest's RAM must be a file the host can read (``share=on``): a RAM-file domain's
(:mod:`hvext.memory.ramfile`: ``/dev/shm/hvext/<domain>/ram.<host id>``, block ``hvext-ram``) or a C6
swap-file domain's (``hvext define --swap-file``: libvirt's ``memory_backing_dir/<id>-<name>/ram-node0``,
block ``ram-node0``). The RAM block (checked in every dirty list: that id, that size) maps page for page
onto the file.

State, per mirrored domain (by UUID) in ``STATE_DIR/mirror`` (0700): ``<uuid>.json`` (what is mirrored,
the last dirty-log query consumed, statistics), ``<uuid>.ram`` (the copy: private, sparse, RAM-sized, pages
at their RAM file offsets) and ``<uuid>.lock``: one sync or repair at a time, whoever runs it (hvextd's
mirror loop, ``hvext ha mirror --sync``, ``hvext ha inject-memory-error``).

* :func:`start` starts the dirty log, then copies every mirrored page (the log's first query, taken
  before the copy, makes the copy consistent: a page written during it is on the next list).
Records name the libvirt host (host UUID) whose domain they mirror: several hvextd on one machine (the
lab's hosts) share the file system, and each syncs only its own host's mirrors.

* :func:`sync` takes the next dirty list and copies the mirrored pages on it
  (:func:`hvext.ha.mirror_policy.plan_sync`: all of them when the list does not continue the last one).
* :func:`inject_memory_error` simulates an uncorrectable error in one page and handles it as hvext would
  handle a machine check (see its docstring for the order of events).

The dirty log has one consumer per QEMU (``x-hvext-dirty-log-start`` refuses a second): a mirrored
domain cannot also use PMEM power protection's or ``hvext dirty --watch``'s log; :func:`start` says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from hvext import aio, durable, paths
from hvext.dirty import pages as dirty_pages
from hvext.errors import DomainNotFound, DomainStateError, HAError, HvextError, QMPError, UnsupportedError
from hvext.ha import mirror_policy as policy
from hvext.ha import ramsync
from hvext.ha.mirror_policy import Layout, LogMark, MirrorUsageError
from hvext.host import Domain, Host, RunState
from hvext.memory import balloon, ramfile, swapfile
from hvext.qmp import QMPSession

log = logging.getLogger(__name__)

MIRROR_DIR_NAME = "mirror"
#: Bytes written over a page to simulate its destruction (any pattern a guest would not hold by chance).
POISON = b"\xde\xad\x4d\xce" * 1024
#: Seconds a CLI sync or repair waits for a sync in progress.
LOCK_WAIT_S = 30.0


class MirrorError(HAError):
    """Mirroring a domain failed, or it is not mirrored."""


class MirrorStopped(MirrorError):
    """The mirror stopped (domain stopped, copy missing): its status says why."""


@dataclass(frozen=True)
class RamSource:
    """Where a running guest's RAM is: the file, the dirty list's block for it, its size."""

    path: Path
    block: str
    ram_bytes: int


def ram_source(domain: Domain) -> RamSource:
    """The RAM file of a running domain whose guest RAM is a shared file: a RAM-file domain's
    (:mod:`hvext.memory.ramfile`, ``/dev/shm/hvext/...``) or a C6 swap-file domain's (libvirt's
    ``memory_backing_dir``, block named after the file, ``ram-node0``). DomainStateError for any other."""
    domain.require_running()
    ram = ramfile.of(domain)
    if ram is not None:
        return RamSource(ram.path, ram.block_id, ram.size)
    try:
        path = swapfile.domain_file(domain)
    except DomainStateError:
        raise DomainStateError(f"the guest RAM of {domain.name!r} is not in a file the host can read: define it "
                               "with a RAM file (hvext.memory.ramfile) or --swap-file to mirror it") from None
    return RamSource(path, path.name, balloon.boot_memory(domain))


@dataclass
class Record:
    """One mirrored domain (``<uuid>.json``)."""

    domain: str
    uuid: str
    source: str
    block: str
    ram_bytes: int
    below_4g: int
    ranges: list[list[int]]
    covered: list[list[int]]
    interval_ms: int
    target: str
    target_token: str
    host_uuid: str = ""  # the libvirt host whose domain this is: other hosts' hvextd (a lab on one machine) skip it
    page_size: int = policy.PAGE_SIZE
    mark: dict[str, int] | None = None
    state: str = "active"  # "active" or "stopped"
    error: str | None = None
    started_at: float = 0.0
    last_sync_at: float | None = None
    last_pages: int = 0
    last_seconds: float = 0.0
    last_reason: str = ""
    syncs: int = 0
    full_syncs: int = 0
    pages_copied: int = 0
    last_repair: dict[str, Any] | None = field(default=None)

    @property
    def layout(self) -> Layout:
        return Layout(self.ram_bytes, self.below_4g)

    @property
    def covered_runs(self) -> policy.Runs:
        return tuple((a, b) for a, b in self.covered)

    @property
    def log_mark(self) -> LogMark | None:
        return LogMark(self.mark["domain_id"], self.mark["generation"]) if self.mark else None

    def status(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        out = asdict(self)
        out["covered_pages"] = policy.pages(self.covered_runs)
        out["covered_bytes"] = out["covered_pages"] * self.page_size
        out["lag_seconds"] = None if self.last_sync_at is None else round(max(0.0, now - self.last_sync_at), 3)
        out["ranges"] = [f"{gpa:#x}:{length}" for gpa, length in self.ranges]
        del out["covered"]
        return out


def mirror_root() -> Path:
    return paths.STATE_DIR / MIRROR_DIR_NAME


def mirror_dir() -> Path:
    root = mirror_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    return paths.private_dir(root)


def _record_path(uuid: str) -> Path:
    return mirror_root() / f"{uuid}.json"


def _load(uuid: str) -> Record | None:
    try:
        return Record(**json.loads(_record_path(uuid).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        raise MirrorError(f"cannot read the mirror record {_record_path(uuid)}: {err}") from err


def _save(record: Record) -> None:
    durable.atomic_write(_record_path(record.uuid), json.dumps(asdict(record), indent=1).encode())


@contextmanager
def _locked(uuid: str, wait: float | None = LOCK_WAIT_S) -> Iterator[None]:
    try:
        with durable.locked(mirror_dir() / f"{uuid}.lock", wait=wait):
            yield
    except BlockingIOError:
        raise MirrorError("another sync or repair of this mirror is in progress") from None


def records() -> list[Record]:
    """Every mirror record on this host (unreadable ones are logged and skipped)."""
    root = mirror_root()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob("*.json")):
        try:
            record = _load(path.stem)
        except MirrorError as err:
            log.warning("skipping mirror record %s: %s", path, err)
            continue
        if record is not None:
            found.append(record)
    return found


def _record_of(host: Host, name: str) -> tuple[Domain, Record]:
    domain = host.lookup(name)
    record = _load(domain.uuid())
    if record is None:
        raise MirrorError(f"domain {domain.name!r} is not mirrored (`hvext ha mirror {domain.name}` first)")
    return domain, record


# -- QEMU -----------------------------------------------------------------------------------------------


def _machine(domain: Domain) -> str:
    node = etree.fromstring(domain.xml().encode()).find("os/type")
    return (node.get("machine") if node is not None else None) or "pc"


async def query_layout(qmp: QMPSession, machine: str, ram_bytes: int) -> Layout:
    """The guest's RAM split around the 4 GiB hole, from QEMU's PCI host (q35 or i440fx), else computed."""
    host_path = "/machine/q35" if "q35" in machine else "/machine/i440fx"
    try:
        below = await qmp.execute("qom-get", {"path": host_path, "property": "below-4g-mem-size"})
        above = await qmp.execute("qom-get", {"path": host_path, "property": "above-4g-mem-size"})
    except QMPError as err:
        log.info("no RAM split from QEMU (%s): computing it for %s", err, machine)
        return Layout(ram_bytes, policy.default_below_4g(machine, ram_bytes))
    return policy.layout_from_qemu(below, above, ram_bytes)


async def _fetch(qmp: QMPSession, record: Record) -> tuple[dirty_pages.DirtyPages, bool]:
    """The next dirty list; (list, restarted) -- restarted when the log was off (a new QEMU) and was started."""
    restarted = False
    try:
        reply = await qmp.execute(dirty_pages.QUERY, {"encoding": "runs"})
    except QMPError as err:
        if "not active" not in str(err.desc or err):
            raise
        await qmp.execute(dirty_pages.START)
        restarted = True
        reply = await qmp.execute(dirty_pages.QUERY, {"encoding": "runs"})
    dirty = dirty_pages.decode(reply)
    block = dirty.blocks.get(record.block)
    if block is None or block.length != record.ram_bytes or dirty.page_size != record.page_size:
        raise MirrorError(f"QEMU's dirty list has no {record.ram_bytes}-byte block {record.block!r} of "
                          f"{record.page_size}-byte pages: the guest's RAM is not the file being mirrored")
    return dirty, restarted


def _runs(dirty: dirty_pages.DirtyPages, block: str) -> policy.Runs:
    return tuple(dirty.blocks[block].runs)


# -- start, stop, status ------------------------------------------------------------------------------


def start(host: Host, name: str, ranges: list[tuple[int, int]], interval_ms: int) -> dict[str, Any]:
    """Mirror running domain *name* (all its RAM, or *ranges* of guest physical (gpa, length)): start the dirty
    log, copy the mirrored pages, record it. Nothing is left behind when a step fails."""
    policy.interval_ms(interval_ms)
    domain = host.lookup(name)
    domain.require_running()
    source = ram_source(domain)
    uuid = domain.uuid()
    directory = mirror_dir()
    with _locked(uuid):
        if _load(uuid) is not None:
            raise MirrorUsageError(f"domain {domain.name!r} is mirrored already (`hvext ha mirror {domain.name} "
                                   "--stop` first)")
        target_path = directory / f"{uuid}.ram"
        target_path.unlink(missing_ok=True)  # a copy without a record is a leftover of a crashed start
        target, token = ramsync.LocalFileTarget.create(target_path, source.ram_bytes)
        try:
            record = aio.run(_start(domain, source, ranges, interval_ms, target, token))
        except BaseException:
            target.close()
            target_path.unlink(missing_ok=True)
            raise
        target.close()
        _save(record)
    return record.status()


async def _start(domain: Domain, source: RamSource, ranges: list[tuple[int, int]], interval_ms: int,
                 target: ramsync.LocalFileTarget, token: str) -> Record:
    async with domain.qmp() as qmp:
        layout = await query_layout(qmp, _machine(domain), source.ram_bytes)
        covered = policy.covered_pages(layout, ranges)
        if dirty_pages.QUERY not in dirty_pages.command_names(await qmp.execute("query-commands")):
            raise UnsupportedError("memory mirroring needs dirty page lists: the patched QEMU (`make qemu`)")
        try:
            await qmp.execute(dirty_pages.START)
        except QMPError as err:
            raise MirrorError(f"the dirty log of {domain.name!r} is in use by another hvext user (PMEM power "
                              f"protection, `hvext dirty --watch`): {err}") from err
        try:
            record = Record(domain.name, domain.uuid(), str(source.path), source.block, source.ram_bytes,
                            layout.below_4g, [list(r) for r in ranges], [list(r) for r in covered], interval_ms,
                            str(target.path), token, domain.host.host_uuid, started_at=time.time())
            dirty, _ = await _fetch(qmp, record)
            fd = ramsync.open_source(source.path, source.ram_bytes)
            try:
                result = await asyncio.to_thread(ramsync.copy_runs, fd, covered, record.page_size, target)
            finally:
                os.close(fd)
        except BaseException:
            try:
                await qmp.execute(dirty_pages.STOP)
            except QMPError:
                pass
            raise
        _account(record, policy.SyncPlan(covered, True, "first sync"), result, domain.id() or 0, dirty.generation)
        return record


def _account(record: Record, plan: policy.SyncPlan, result: ramsync.CopyResult, domain_id: int,
             generation: int) -> None:
    record.mark = {"domain_id": domain_id, "generation": generation}
    record.last_sync_at = time.time()
    record.last_pages = result.pages
    record.last_seconds = round(result.seconds, 6)
    record.last_reason = plan.reason
    record.syncs += 1
    record.full_syncs += int(plan.full)
    record.pages_copied += result.pages


def stop(host: Host, name: str) -> dict[str, Any]:
    """Stop mirroring *name*: its dirty log stops (when the QEMU that the mirror started it in still runs),
    the copy and the record are removed. A domain undefined meanwhile is found by its record's name."""
    try:
        domain: Domain | None
        domain, record = _record_of(host, name)
    except DomainNotFound:
        found = [r for r in records() if name in (r.domain, r.uuid)]
        if not found:
            raise
        domain, record = None, found[0]
    with _locked(record.uuid):
        if domain is not None and record.mark and domain.id() == record.mark["domain_id"]:
            async def stop_log() -> None:
                async with domain.qmp() as qmp:
                    try:
                        await qmp.execute(dirty_pages.STOP)
                    except QMPError as err:
                        log.info("dirty log of %s already stopped: %s", domain.name, err)
            aio.run(stop_log())
        Path(record.target).unlink(missing_ok=True)
        _record_path(record.uuid).unlink(missing_ok=True)
    return {"domain": record.domain, "stopped": True, "pages_copied": record.pages_copied, "syncs": record.syncs}


def status(host: Host | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """The status of every mirror (or *name*'s): last sync, pages copied, lag."""
    if name is not None:
        if host is None:
            raise MirrorUsageError("a host connection is needed to look a domain up")
        return [_record_of(host, name)[1].status()]
    return [r.status() for r in records()]


# -- sync -----------------------------------------------------------------------------------------------


def _stopped(record: Record, reason: str) -> MirrorStopped:
    record.state, record.error = "stopped", reason
    _save(record)
    return MirrorStopped(f"mirror of {record.domain!r} stopped: {reason}")


async def sync_record(host: Host, uuid: str, *, wait: float | None = LOCK_WAIT_S) -> dict[str, Any]:
    """One sync of mirror *uuid*: the next dirty list's mirrored pages copied. A stopped domain or a missing
    copy stops the mirror (:class:`MirrorStopped`; the status says why) instead of failing at every round.
    Blocking work (lock, files, libvirt) runs in threads: hvextd calls this on its shared loop."""
    lock = mirror_dir() / f"{uuid}.lock"
    try:
        lock_fd = await asyncio.to_thread(durable.lock_file, lock, wait=wait)
    except BlockingIOError:
        raise MirrorError("another sync or repair of this mirror is in progress") from None
    try:
        return await _sync_locked(host, uuid)
    finally:
        os.close(lock_fd)


async def _sync_locked(host: Host, uuid: str) -> dict[str, Any]:
    record = await asyncio.to_thread(_load, uuid)
    if record is None:
        raise MirrorError(f"no mirror {uuid}")
    if record.state != "active":
        raise MirrorStopped(f"mirror of {record.domain!r} is stopped: {record.error}")
    host_uuid = await asyncio.to_thread(lambda: host.host_uuid)
    if record.host_uuid != host_uuid:  # not this libvirt host's domain: never judge (or stop) it from here
        raise MirrorError(f"the mirror of {record.domain!r} belongs to libvirt host {record.host_uuid}, "
                          f"not this one ({host_uuid})")
    try:
        domain = await asyncio.to_thread(host.lookup, record.uuid)
        domain_id = await asyncio.to_thread(domain.id)
    except DomainNotFound as err:
        raise await asyncio.to_thread(_stopped, record, f"the domain is gone ({err})") from None
    if domain_id is None:
        raise await asyncio.to_thread(_stopped, record, "the domain is not running")
    if record.mark and record.mark["domain_id"] != domain_id:  # a new QEMU: its RAM file may be elsewhere
        try:
            source = await asyncio.to_thread(ram_source, domain)
        except HvextError as err:
            raise await asyncio.to_thread(_stopped, record, f"the domain restarted: {err}") from err
        if source.ram_bytes != record.ram_bytes:
            raise await asyncio.to_thread(_stopped, record, f"the domain restarted with {source.ram_bytes} bytes "
                                          f"of RAM, not {record.ram_bytes}")
        record.source, record.block = str(source.path), source.block
    try:
        target = await asyncio.to_thread(ramsync.LocalFileTarget.open, Path(record.target), record.target_token,
                                         record.ram_bytes)
    except ramsync.MirrorTargetError as err:
        raise await asyncio.to_thread(_stopped, record, str(err)) from err
    try:
        async with domain.qmp() as qmp:
            dirty, _ = await _fetch(qmp, record)
        plan = policy.plan_sync(record.covered_runs, record.log_mark, domain_id, dirty.generation,
                                _runs(dirty, record.block))
        result = await asyncio.to_thread(_copy_from_source, record, plan.runs, target)
    except (QMPError, ramsync.RamSourceError) as err:
        if await asyncio.to_thread(domain.id) != domain_id:
            raise await asyncio.to_thread(_stopped, record, f"the domain stopped during a sync ({err})") from err
        raise
    except ramsync.MirrorTargetError as err:
        raise await asyncio.to_thread(_stopped, record, str(err)) from err
    finally:
        target.close()
    _account(record, plan, result, domain_id, dirty.generation)
    await asyncio.to_thread(_save, record)
    return record.status()


def _copy_from_source(record: Record, runs: policy.Runs, target: ramsync.Target) -> ramsync.CopyResult:
    fd = ramsync.open_source(Path(record.source), record.ram_bytes)
    try:
        return ramsync.copy_runs(fd, runs, record.page_size, target)
    finally:
        os.close(fd)


def sync(host: Host, name: str) -> dict[str, Any]:
    """One sync of *name*'s mirror now (``hvext ha mirror DOMAIN --sync``)."""
    _, record = _record_of(host, name)
    return aio.run(sync_record(host, record.uuid))


# -- memory errors ----------------------------------------------------------------------------------------


def inject_memory_error(host: Host, name: str, gpa: int, *, readable: bool = False,
                        resume_stale: bool = False) -> dict[str, Any]:
    """Simulate an uncorrectable memory error in the page at guest physical *gpa* and handle it.

    Order of events (*readable* False, the default: a real uncorrectable error, the page's content is gone):
    the page's bytes in the RAM file are overwritten (:data:`POISON`); then hvext is told (as a machine check
    would tell it): it pauses the guest, takes a final dirty list and copies every listed mirrored page
    *except* the failed one (it cannot be read any more), restores the failed page from the mirror, and
    resumes the guest when the restored page is exact -- not written since the last sync. A page written
    since then is restored from the older copy: the guest's writes of the last interval to it are lost;
    the guest stays paused unless *resume_stale*.

    *readable* True simulates an error predicted while the page can still be read (a failing page found
    by corrected-error counts or a patrol scrub): hvext is told first, pauses the guest, the final sync
    includes the page, then the page is destroyed and restored: always exact.
    """
    domain, record = _record_of(host, name)
    if record.state != "active":
        raise MirrorStopped(f"mirror of {record.domain!r} is stopped ({record.error}): it cannot repair a page")
    offset = record.layout.offset(gpa)
    page = offset // record.page_size
    if not any(first <= page < first + count for first, count in record.covered_runs):
        raise MirrorUsageError(f"guest physical address {gpa:#x} is not in a mirrored range "
                               f"({', '.join(record.status()['ranges']) or 'all'}): nothing could repair it")
    return aio.run(_inject(domain, record.uuid, gpa, page, readable, resume_stale))


async def _inject(domain: Domain, uuid: str, gpa: int, page: int, readable: bool,
                  resume_stale: bool) -> dict[str, Any]:
    with _locked(uuid):
        record = _load(uuid)
        if record is None or record.state != "active":
            raise MirrorStopped(f"the mirror of {domain.name!r} stopped meanwhile")
        domain_id = domain.id()
        if domain_id is None:
            raise DomainStateError(f"domain {domain.name!r} is not running")
        offset = page * record.page_size
        target = ramsync.LocalFileTarget.open(Path(record.target), record.target_token, record.ram_bytes)
        fd = ramsync.open_source(Path(record.source), record.ram_bytes, writable=True)
        events: list[str] = []
        state = {"destroyed": False, "restored": False}

        def destroy() -> None:
            os.pwrite(fd, POISON[:record.page_size], offset)
            state["destroyed"] = True
            events.append("page destroyed")

        def restore() -> None:
            os.pwrite(fd, target.read(offset, record.page_size), offset)
            state["restored"] = True
            events.append("page restored from the mirror")

        try:
            if not readable:
                destroy()
            started = time.perf_counter()
            was_running = domain.state is RunState.RUNNING
            if was_running:
                domain.suspend()
            events.append("guest paused")
            async with domain.qmp() as qmp:
                dirty, _ = await _fetch(qmp, record)
            plan = policy.plan_sync(record.covered_runs, record.log_mark, domain_id, dirty.generation,
                                    _runs(dirty, record.block))
            listed = plan.runs if not plan.full else record.covered_runs  # a gap: assume the page was written
            decision = policy.decide_repair(page, record.covered_runs, listed, readable)
            skip = frozenset() if readable else frozenset({page})
            result = ramsync.copy_runs(fd, plan.runs, record.page_size, target, skip=skip)
            events.append(f"final sync: {result.pages} pages" + ("" if readable else " (the failed page skipped)"))
            _account(record, plan, result, domain_id, dirty.generation)
            if readable:
                destroy()
            restore()
            resume = was_running and (decision.exact or resume_stale)
            if resume:
                domain.resume()
                events.append("guest resumed")
            else:
                events.append("guest left paused" if was_running else "guest was paused already")
            paused_ms = (time.perf_counter() - started) * 1000
        except Exception as err:
            if state["destroyed"] and not state["restored"]:
                try:  # the mirror's copy beats the poison; the guest stays paused for whoever looks next
                    restore()
                except HvextError:
                    pass
            raise MirrorError(f"repair of {gpa:#x} in {domain.name!r} failed after: {', '.join(events) or 'nothing'}"
                              f" (the guest is left as it is): {err}") from err
        finally:
            os.close(fd)
            target.close()
        report = {"domain": domain.name, "gpa": f"{gpa:#x}", "offset": offset, "page": page,
                  "readable": readable, "exact": decision.exact, "dirty_since_sync": decision.dirty_since_sync,
                  "action": decision.action, "resumed": resume, "paused_ms": round(paused_ms, 3),
                  "final_sync_pages": result.pages, "events": events, "at": time.time()}
        record.last_repair = report
        _save(record)
        return report

