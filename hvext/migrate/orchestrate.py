"""Run a live migration through libvirt (peer to peer), watch it, adapt it, report it.

The blocking ``migrateToURI3`` call runs in a worker thread while a loop on
hvext's event loop samples the job statistics, feeds progress to the caller
and switches to post-copy when the policy says so. If the migration fails
(destination gone, network broken), libvirt cancels it and the source keeps
running; the error says what happened and in which state the source is. A
source left paused is resumed only if the migration paused it (see
:func:`hvext.migrate.policy.after_failure`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hvext.dirty import rate
from hvext.errors import HostError, HvextError, UsageError
from hvext.host import Domain, Host, JobStats, MigrationOptions, RunState, libvirt_message, rewrite_host_paths
from hvext.memory import balloon, ramfile
from hvext.migrate.policy import MIB, Plan, Progress, after_failure, plan, should_switch_to_postcopy

log = logging.getLogger(__name__)
POLL_S = 0.5


class MigrationError(HostError):
    """A migration failed; the message says whether the source still runs."""


@dataclass
class Result:
    domain: str
    destination: str
    policy: str
    plan_reason: str
    postcopy_switch: str
    postcopy_switch_error: str  # why a switch the policy asked for was refused ("" if none was)
    total_s: float
    downtime_ms: int | None
    bytes_sent: int | None
    ram: int
    iterations: int | None
    measured_dirty_rate_mib_s: float | None
    samples: list[dict[str, Any]] = field(default_factory=list)
    #: Why auto planned without a measured dirty rate ("" when it had one, or for plain).
    dirty_rate_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _progress(stats: JobStats, started: float) -> Progress:
    page = stats.memory_page_size or 4096
    return Progress(
        elapsed_s=time.monotonic() - started,
        iteration=stats.memory_iteration or 0,
        remaining=stats.memory_remaining or 0,
        total=stats.memory_total or 0,
        dirty_rate=(stats.memory_dirty_rate or 0) * page,
        bps=stats.memory_bps or 0,
        expected_downtime_ms=stats.downtime_ms or 0,
    )


def migration_options(p: Plan, dest_xml: str, *, shared_storage: bool) -> MigrationOptions:
    """What libvirt is asked for to carry out plan *p* (*shared_storage*: the disk is the same file on
    both hosts, as in a lab or on NFS, which libvirt cannot check)."""
    return MigrationOptions(dest_xml=dest_xml, bandwidth_mib=p.bandwidth_mib, auto_converge=p.auto_converge,
                            xbzrle_cache=p.xbzrle_cache, multifd_channels=p.multifd_channels,
                            postcopy=p.postcopy, unsafe=shared_storage)


async def migrate(domain: Domain, dest_uri: str, *, policy: str = "auto", downtime_ms: int = 300,
                  bandwidth_mib: int | None = None, shared_storage: bool = True, timeout_s: float | None = None,
                  on_progress: Callable[[Progress, str], None] | None = None) -> Result:
    """Migrate a running domain to *dest_uri*; return what happened, or raise MigrationError.

    *timeout_s* bounds the whole migration: past it the job is aborted (the
    source keeps running). Without it, auto uses its plan's budget and plain
    waits as long as libvirt does.
    """
    if policy not in ("auto", "plain"):
        raise UsageError(f"unknown policy {policy!r}: use auto or plain")
    if not 1 <= downtime_ms <= 60_000:
        raise UsageError("downtime must be 1 to 60000 ms")
    if bandwidth_mib is not None and not 1 <= bandwidth_mib <= 100_000:
        raise UsageError("bandwidth must be 1 to 100000 MiB/s")
    # Every libvirt call and file access runs in a thread: the loop may be hvextd's, shared with
    # keepalives, events and power-loss saves.
    paused_before = await asyncio.to_thread(_paused_before, domain)
    loop = asyncio.get_running_loop()
    dest = await loop.run_in_executor(None, Host, dest_uri)
    try:
        if dest.host_id == domain.host.host_id:
            raise UsageError(f"{dest_uri} is the host {domain.name!r} already runs on")
        if dest_uri.startswith(("qemu:///", "qemu+unix:///")) and "socket=" not in dest_uri:
            raise UsageError("peer-to-peer migration needs a destination URI the source libvirtd can reach, "
                             "e.g. qemu+tcp://HOST/system")
        # same file system in a lab; see docs for separate hosts
        await asyncio.to_thread(dest.prepare_runtime_dir, domain.name)
        source_ram = await asyncio.to_thread(ramfile.of, domain)
        dest_ram = ramfile.moved(source_ram, domain.name, dest.host_id) if source_ram else None
        if dest_ram is not None:  # QEMU cannot create it; the destination's own file (hosts may share /dev/shm)
            await asyncio.to_thread(ramfile.prepare_on, dest, domain.name, dest_ram)
        ram, measured, rate_error = await _ram_and_rate(domain, policy)
        p = plan(policy, ram, int((measured or 0) * MIB), bandwidth_mib * MIB if bandwidth_mib else None,
                 downtime_ms, bandwidth_mib)
        xml = await asyncio.to_thread(_migratable_xml, domain)
        dest_xml = rewrite_host_paths(xml, domain.name, domain.host.host_id, dest.host_id)
        if timeout_s is not None:
            if timeout_s <= 0:
                raise UsageError("timeout must be positive")
            p = dataclasses.replace(p, time_budget_s=timeout_s)
        options = migration_options(p, dest_xml, shared_storage=shared_storage)
        migrate_uri = dest_uri.replace("+unix", "").split("?")[0] if "+unix" in dest_uri else dest_uri
        started = time.monotonic()
        worker = loop.run_in_executor(None, domain.migrate, migrate_uri, options)
        history: list[Progress] = []
        switched = ""
        switch_error = ""
        asked_switch = False
        aborted = ""
        downtime_set = False
        while not worker.done():
            await asyncio.wait([worker], timeout=POLL_S)
            if worker.done():
                break
            try:
                if not downtime_set:
                    await asyncio.to_thread(domain.set_max_downtime, downtime_ms)
                    downtime_set = True
                stats = await asyncio.to_thread(domain.job_stats)
            except HvextError:
                continue  # the job may not have started yet, or just ended
            if stats is None or not stats.active:
                continue
            sample = _progress(stats, started)
            history.append(sample)
            if not switched:
                reason = should_switch_to_postcopy(p, history)
                if reason:
                    asked_switch = True
                    try:
                        await asyncio.to_thread(domain.start_postcopy)
                        switched = reason
                    except HvextError as err:  # e.g. the job is just finishing: retried next poll
                        cause = libvirt_message(err)
                        if cause != switch_error:
                            log.warning("%s: switching to post-copy (%s) refused, pre-copy goes on: %s",
                                        domain.name, reason, cause)
                        switch_error = cause
            if on_progress:
                on_progress(sample, "post-copy" if switched else "pre-copy")
            if time.monotonic() - started > p.time_budget_s and not switched and not aborted:
                await asyncio.to_thread(domain.abort_job)
                aborted = f"did not converge within {p.time_budget_s:.0f} s and was aborted"
        try:
            await worker
        except HvextError as err:
            failure = await asyncio.to_thread(_failure, domain, err, aborted, paused_before, asked_switch)
            if dest_ram is not None and await asyncio.to_thread(domain.is_active):
                await asyncio.to_thread(ramfile.remove, dest_ram)  # the guest stayed here
            raise failure from err
        if source_ram is not None:  # the guest's RAM is in the destination's file now
            await asyncio.to_thread(ramfile.remove, source_ram)
        total = time.monotonic() - started
        completed = await asyncio.to_thread(_source_completed_stats, domain) or \
            await loop.run_in_executor(None, _completed_stats, dest, domain.name) or JobStats(active=False)
        await asyncio.to_thread(_finish_source, domain, dest)
        return Result(
            domain=domain.name, destination=dest_uri, policy=policy, plan_reason=p.reason, postcopy_switch=switched,
            postcopy_switch_error="" if switched else switch_error,
            total_s=round(total, 2), downtime_ms=completed.downtime_ms,
            bytes_sent=completed.data_processed, ram=ram, iterations=completed.memory_iteration,
            measured_dirty_rate_mib_s=measured,
            samples=[asdict(h) for h in history[-200:]],
            dirty_rate_error=rate_error,
        )
    finally:
        dest.close()


def _paused_before(domain: Domain) -> bool:
    domain.require_running()
    return domain.state is RunState.PAUSED


async def _ram_and_rate(domain: Domain, policy: str) -> tuple[int, float | None, str]:
    """The guest RAM to move (boot memory: PMEM is not RAM), auto's measured dirty rate (MiB/s) or
    None, and why there is none ("" when measured or not asked for)."""
    ram = await asyncio.to_thread(balloon.boot_memory, domain)
    if policy != "auto":
        return ram, None, ""
    try:
        measured = await rate.measure(domain, 2, "page-sampling", 2048)
    except HvextError as err:  # e.g. no QMP (plain libvirt domain): plan without it, and say so
        log.warning("%s: dirty rate not measured (%s: %s); planning without it", domain.name,
                    type(err).__name__, err)
        return ram, None, str(err) or type(err).__name__
    return ram, float(measured.rate_mib_s), ""


def _migratable_xml(domain: Domain) -> str:
    return domain.xml(migratable=True, secure=True)


def _finish_source(domain: Domain, dest: Host) -> None:
    """After success: dest owns the shared state dir; the source definition goes (its state dir stays:
    it is the destination's now)."""
    dest.adopt_state(domain.name, domain.uuid())
    if domain.is_persistent() and not domain.is_active():
        domain.undefine(remove_state=False)


def _failure(domain: Domain, err: HvextError, aborted: str, paused_before: bool,
             postcopy_started: bool) -> MigrationError:
    """Say what went wrong and what state the source is in now (resumed only if the migration paused it)."""
    try:
        run_state, reason = domain.state_and_reason()
        state = run_state.value
    except HvextError:
        state, reason = RunState.UNKNOWN.value, ""
    cause = f"migrating {domain.name!r} {aborted}" if aborted else str(err)
    recovery = after_failure(state, reason, paused_before, postcopy_started)
    outcome = recovery.outcome
    if recovery.resume:
        try:
            domain.resume()
        except HvextError as resume_err:
            outcome = (f"the source was paused for the migration and could not be resumed "
                       f"({libvirt_message(resume_err)}): check it with `hvext dominfo`")
    return MigrationError(f"{cause}; {outcome}")


def _source_completed_stats(domain: Domain) -> JobStats | None:
    try:
        return domain.job_stats(completed=True)
    except HvextError:
        return None


def _completed_stats(dest: Host, name: str, wait_s: float = 10.0) -> JobStats | None:
    """The destination's record of the finished job (post-copy finishes there a little later)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            stats = dest.lookup(name).job_stats(completed=True)
        except HvextError:
            stats = None
        if (stats is not None and stats.downtime_ms is not None) or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)
