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

With ``nvm_ram = true`` each round then also grows or shrinks the NVM RAM
(virtio-mem on the NVM tier, hvext.memory.nvmram) of the VMs that have it:
grown while the host is short and the tier has room, given back when the
tier runs short (hvext.memory.nvmram_policy), every change logged with why.

Its config is the ``[reclaim]`` section of hvextd's file (keys, defaults
and allowed values: hvext/daemon/config.py); without that section the loop
does not run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hvext.daemon import metrics
from hvext.errors import HvextError, UsageError
from hvext.host import Domain, Host
from hvext.memory import bind, demand, nvmram, nvmram_policy, reclaim, swapfile
from hvext.memory.host import meminfo
from hvext.memory.pools import ResourceTree
from hvext.memory.policy import METHODS, MIB

log = logging.getLogger("hvextd.reclaim")


@dataclass(frozen=True)
class ReclaimConfig:
    """The ``[reclaim]`` section (keys documented in hvext/daemon/config.py)."""

    KEYS: ClassVar[tuple[str, ...]] = ("interval_s", "host_available_min_mib", "step_mib", "method", "domains",
                                       "nvm_ram", "nvm_dir", "nvm_free_min_mib", "nvm_free_high_mib",
                                       "nvm_step_mib")
    interval_s: float = 10.0
    host_available_min_mib: int = 2048
    step_mib: int = 256
    method: str = "auto"
    domains: tuple[str, ...] = field(default=())
    nvm_ram: bool = False  # grow/shrink VMs' NVM RAM (hvext.memory.nvmram) each round
    nvm_dir: str = ""  # the NVM tier: only NVM RAM backed by files in it is managed
    nvm_free_min_mib: int = 1024
    nvm_free_high_mib: int = 2048
    nvm_step_mib: int = 256

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
        if not isinstance(self.nvm_ram, bool):
            raise UsageError(f"nvm_ram: must be true or false, not {self.nvm_ram!r:.80}")
        if not isinstance(self.nvm_dir, str) or (self.nvm_dir and not self.nvm_dir.startswith("/")):
            raise UsageError(f"nvm_dir: must be an absolute directory path, not {self.nvm_dir!r:.80}")
        if self.nvm_ram and not self.nvm_dir:
            raise UsageError("nvm_dir: nvm_ram = true needs the NVM tier's directory")
        for key in ("nvm_free_min_mib", "nvm_free_high_mib", "nvm_step_mib"):
            value = getattr(self, key)
            if not (number(value) and isinstance(value, int) and (16 if key == "nvm_step_mib" else 0) <= value
                    <= 1 << 40):
                raise UsageError(f"{key}: must be an integer from {16 if key == 'nvm_step_mib' else 0} to "
                                 f"{1 << 40}, not {value!r:.80}")
        if self.nvm_free_high_mib < self.nvm_free_min_mib:
            raise UsageError(f"nvm_free_high_mib: must not be below nvm_free_min_mib ({self.nvm_free_min_mib}), "
                             f"not {self.nvm_free_high_mib!r}")
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
    done = await _reclaim(host, config, available)
    if config.nvm_ram:
        done += await nvm_round(host, config, available)
    return done


async def _reclaim(host: Host, config: ReclaimConfig, available: int) -> list[dict[str, Any]]:
    """Take memory from VMs when *available* lies below the floor (see :func:`one_round`)."""
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


def nvm_candidates(host: Host, config: ReclaimConfig) -> list[tuple[Domain, nvmram.NvmRam]]:
    """Running hvext VMs with NVM RAM on the configured tier, in :func:`candidates`' order (blocking).

    A VM whose device cannot be read is skipped this round, logged; one whose
    device is backed elsewhere (another directory, or libvirt's own RAM) is
    not hvext's to move.
    """
    tier = Path(os.path.abspath(config.nvm_dir))
    found = []
    for domain in candidates(host, config):
        try:
            device = nvmram.parse(domain.xml())
        except HvextError as err:
            log.warning("NVM RAM of %s skipped this round: %s", domain.name, err)
            continue
        if device is None:
            continue
        if device.path is None or not device.path.is_relative_to(tier):
            log.debug("NVM RAM of %s is not backed on the NVM tier %s (%s): not managed", domain.name, tier,
                      device.path or "libvirt's RAM backend")
            continue
        found.append((domain, device))
    return found


async def nvm_round(host: Host, config: ReclaimConfig, available: int) -> list[dict[str, Any]]:
    """Grow or shrink VMs' NVM RAM as :mod:`hvext.memory.nvmram_policy` decides; logged, never raises HvextError.

    Returns the changes made (VM, requested size before and after, reason).
    """
    try:
        free = await asyncio.to_thread(nvmram.tier_free, Path(config.nvm_dir))
    except HvextError as err:
        log.warning("NVM RAM not managed this round: %s", err)
        return []
    found = await asyncio.to_thread(nvm_candidates, host, config)
    limits = nvmram_policy.Thresholds(host_available_min=config.host_available_min_mib * MIB,
                                      nvm_free_min=config.nvm_free_min_mib * MIB,
                                      nvm_free_high=config.nvm_free_high_mib * MIB, step=config.nvm_step_mib * MIB)
    vms = [nvmram_policy.VMNvmRam(d.name, dev.size, dev.requested, dev.current, dev.block_size) for d, dev in found]
    plan = nvmram_policy.decide(available, free, vms, limits)
    (log.info if plan.changes or available < limits.host_available_min or free < limits.nvm_free_min
     else log.debug)("NVM RAM (%d VMs): %s", len(vms), plan.reason)
    domains = {d.name: d for d, _ in found}
    done = []
    for change in plan.changes:
        log.info("NVM RAM of %s: %d -> %d MiB: %s", change.vm, change.requested_before // MIB,
                 change.requested // MIB, change.reason)
        try:
            await asyncio.to_thread(nvmram.resize, domains[change.vm], change.requested)
        except HvextError as err:
            log.warning("NVM RAM resize of %s refused: %s", change.vm, err)
            continue
        except Exception:
            log.exception("NVM RAM resize of %s failed unexpectedly", change.vm)
            continue
        done.append({"domain": change.vm, "nvm_ram_before": change.requested_before,
                     "nvm_ram_requested": change.requested, "reason": change.reason})
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
