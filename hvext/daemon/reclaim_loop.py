"""hvextd's reclaim loop: keep the host's available memory above a floor (C2, continuous use).

Every ``interval_s`` it reads the host's MemAvailable; below ``host_available_min_mib``
it takes memory from running hvext VMs, largest first (by how far their
balloon is above their pool entitlement when they are assigned to a pool,
else by size), at most ``step_mib`` per VM per round, each through the same
collect -> decide -> act path as ``hvext reclaim``, and logs every decision.

Each round first applies the pool bindings of the assigned running VMs
(memtune limits and balloon: hvext.memory.bind; idempotent, only what
differs changes), whatever the host's available memory, then rebalances the
swap reservation when the host has one (hvext.memory.swapfile: the VMs'
swap files grew as the bindings and the host pushed their pages out).

Its config is the ``[reclaim]`` section of hvextd's file (keys, defaults
and allowed values: hvext/daemon/config.py); without that section the loop
does not run.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hvext.daemon import metrics
from hvext.errors import HvextError, UsageError
from hvext.host import Domain, Host
from hvext.memory import bind, demand, reclaim, swapfile
from hvext.memory.host import meminfo
from hvext.memory.pools import ResourceTree
from hvext.memory.policy import METHODS, MIB

log = logging.getLogger("hvextd.reclaim")


@dataclass(frozen=True)
class ReclaimConfig:
    """The ``[reclaim]`` section (keys documented in hvext/daemon/config.py)."""

    KEYS: ClassVar[tuple[str, ...]] = ("interval_s", "host_available_min_mib", "step_mib", "method", "domains")
    interval_s: float = 10.0
    host_available_min_mib: int = 2048
    step_mib: int = 256
    method: str = "auto"
    domains: tuple[str, ...] = field(default=())

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> ReclaimConfig:
        """The checked section (known keys only: hvext.daemon.config checks the names)."""
        domains = table.get("domains", [])
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise UsageError(f'domains: must be a list of domain names, e.g. ["web1", "db1"], not {domains!r:.80}')
        values: dict[str, Any] = {k: tuple(v) if k == "domains" else v for k, v in table.items()}
        return cls(**values).validate()

    def validate(self) -> ReclaimConfig:
        """This config, or UsageError naming the first bad value (TOML has nan, inf and booleans)."""
        def number(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if not (number(self.interval_s) and math.isfinite(self.interval_s) and 1 <= self.interval_s <= 86400):
            raise UsageError(f"interval_s: must be a number of seconds from 1 to 86400, not {self.interval_s!r}")
        if not (number(self.step_mib) and isinstance(self.step_mib, int) and 16 <= self.step_mib <= 1 << 30):
            raise UsageError(f"step_mib: must be an integer from 16 to {1 << 30}, not {self.step_mib!r}")
        if not (number(self.host_available_min_mib) and isinstance(self.host_available_min_mib, int)
                and 0 <= self.host_available_min_mib <= 1 << 40):
            raise UsageError(f"host_available_min_mib: must be an integer from 0 to {1 << 40}, "
                             f"not {self.host_available_min_mib!r}")
        if self.method not in METHODS:
            raise UsageError(f"method: must be one of {', '.join(map(repr, METHODS))}, not {self.method!r:.80}")
        return self


def _pool_entitlements(host: Host, actual: dict[str, int]) -> dict[str, int]:
    """Entitlement in bytes per domain of *actual* (its demand in bytes) assigned to a pool.

    Others are absent; none when there is no pool store or it is unusable. Read
    only (:func:`hvext.memory.demand.stored_tree`): the store is not created here,
    and it is closed again every round.
    """
    try:
        with demand.stored_tree() as tree:
            if tree is None:
                return {}
            entitled = demand.entitlements(tree, {name: amount // MIB for name, amount in actual.items()})
    except (HvextError, OSError) as err:
        log.warning("pool entitlements unavailable, ordering VMs by size: %s", err)
        return {}
    return {name: mib * MIB for name, mib in entitled.items()}


def candidates(host: Host, config: ReclaimConfig) -> list[Domain]:
    """Running hvext VMs to take from, most above their entitlement first (blocking: libvirt, pool store).

    A VM that cannot be read (it vanished, libvirt failed on it) is skipped
    this round, logged: it must not stop the others from being considered.
    """
    found: list[Domain] = []
    actual: dict[str, int] = {}
    for domain in host.domains(include_inactive=False):
        if config.domains and domain.name not in config.domains:
            continue
        try:
            if not domain.facts().hvext_managed:
                continue
            actual[domain.name] = demand.demand_bytes(domain)
        except HvextError as err:
            log.warning("skipping %s this round: %s", domain.name, err)
            continue
        found.append(domain)
    entitled = _pool_entitlements(host, actual)
    found.sort(key=lambda d: actual[d.name] - entitled.get(d.name, 0), reverse=True)
    return found


def _stored_tree() -> ResourceTree | None:
    """The pool tree as stored, read only (never creates the store), the store closed again (blocking)."""
    with demand.stored_tree() as tree:
        return tree


async def bind_pools(host: Host, config: ReclaimConfig) -> list[bind.Applied]:
    """Apply the pool bindings of the assigned VMs (those of ``domains`` when it is set); logged, never raises."""
    try:
        tree = await asyncio.to_thread(_stored_tree)  # SQLite off the shared loop, closed before the awaits
        if tree is None:
            return []
        done = await bind.apply(host, tree, config.domains or None)
    except (HvextError, OSError) as err:
        log.warning("pool bindings not applied this round: %s", err)
        return []
    for item in done:
        if item.memtune_changes or item.balloon_target_mib is not None:
            log.info("pool binding of %s: %s%s", item.domain, item.memtune_changes or "memtune unchanged",
                     f", balloon target {item.balloon_target_mib} MiB" if item.balloon_target_mib else "")
    return done


def rebalance_swap(host: Host) -> swapfile.Report | None:
    """Rebalance the swap reservation against the running VMs' swap files (blocking); None without one.

    Logged, never raises: a reservation that cannot move this round is tried again the next.
    """
    if not swapfile.reservation_path().exists():
        return None
    try:
        report = swapfile.rebalance(swapfile.domain_files(host))
    except (HvextError, OSError) as err:
        log.warning("swap reservation not rebalanced this round: %s", err)
        return None
    if report.move is not None and not report.move.idle:
        log.info("swap reservation: punched %d KiB, refilled %d KiB; holds %d MiB, VM files %d MiB",
                 report.move.punch >> 10, report.move.refill >> 10, report.balance.reservation // MIB,
                 report.balance.vm_sum // MIB)
    for note in report.notes:
        log.warning("swap reservation: %s", note)
    return report


async def one_round(host: Host, config: ReclaimConfig) -> list[dict[str, Any]]:
    """Apply the pool bindings, then reclaim once if the host is short of memory; returns what reclaim did.

    Blocking work runs in threads; a VM whose reclaim fails, however, is
    logged and the next one is tried.
    """
    await bind_pools(host, config)
    await asyncio.to_thread(rebalance_swap, host)
    available = await asyncio.to_thread(meminfo, "MemAvailable")
    floor = config.host_available_min_mib * MIB
    if available >= floor:
        return []
    need = floor - available
    found = await asyncio.to_thread(candidates, host, config)
    log.info("host available %d MiB < %d MiB: reclaiming %d MiB from %d VMs", available // MIB,
             config.host_available_min_mib, need // MIB, len(found))
    done = []
    for domain in found:
        if need <= 0:
            break
        amount = min(config.step_mib * MIB, need)
        try:
            report = await reclaim.reclaim(domain, amount, config.method)
        except HvextError as err:
            log.warning("reclaim from %s refused: %s", domain.name, err)
            metrics.RECLAIM_FAILURES.labels(domain.name).inc()
            continue
        except Exception:
            log.exception("reclaim from %s failed unexpectedly", domain.name)
            metrics.RECLAIM_FAILURES.labels(domain.name).inc()
            continue
        metrics.count_reclaim(domain.name, report.method, report.returned)
        log.info("reclaimed from %s: %s, %d MiB returned (%s)", domain.name, report.method,
                 report.returned // MIB, report.decision["reason"])
        need -= max(report.returned, 0)
        done.append(report.to_dict())
    return done


async def run(host: Host, config: ReclaimConfig, stopping: asyncio.Event) -> None:
    """Rounds every interval until *stopping* is set; a failing round is logged, never fatal."""
    while not stopping.is_set():
        try:
            await one_round(host, config)
        except HvextError as err:
            log.error("reclaim round failed: %s", err)
        except Exception:
            log.exception("reclaim round failed unexpectedly; the next one runs in %s s", config.interval_s)
        try:
            await asyncio.wait_for(stopping.wait(), config.interval_s)
        except asyncio.TimeoutError:
            pass
