"""hvextd's reclaim loop: keep the host's available memory above a floor (C2, continuous use).

Every ``interval_s`` it reads the host's MemAvailable; below ``host_available_min_mib``
it takes memory from running hvext VMs, largest first (by how far their
balloon is above their pool entitlement when they are assigned to a pool,
else by size), at most ``step_mib`` per VM per round, each through the same
collect -> decide -> act path as ``hvext reclaim``, and logs every decision.

Config (TOML, section ``[reclaim]``)::

    interval_s = 10
    host_available_min_mib = 2048
    step_mib = 256
    method = "auto"            # or "balloon" / "swap"
    domains = ["web1", "db1"]  # optional: only these
"""

from __future__ import annotations

import asyncio
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvext.errors import HvextError, UsageError
from hvext.host import Domain, Host
from hvext.memory import reclaim
from hvext.memory.host import meminfo
from hvext.memory.policy import METHODS, MIB

log = logging.getLogger("hvextd.reclaim")


@dataclass(frozen=True)
class ReclaimConfig:
    interval_s: float = 10.0
    host_available_min_mib: int = 2048
    step_mib: int = 256
    method: str = "auto"
    domains: tuple[str, ...] = field(default=())

    @classmethod
    def load(cls, path: Path) -> ReclaimConfig:
        try:
            data = tomllib.loads(path.read_text()).get("reclaim", {})
        except OSError as err:
            raise UsageError(f"cannot read config {path}: {err.strerror}") from err
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"config {path} is not valid TOML: {err}") from err
        unknown = set(data) - {"interval_s", "host_available_min_mib", "step_mib", "method", "domains"}
        if unknown:
            raise UsageError(f"config {path}: unknown [reclaim] keys {sorted(unknown)}")
        values: dict[str, Any] = {k: tuple(v) if k == "domains" else v for k, v in data.items()}
        config = cls(**values)
        if not (isinstance(config.interval_s, (int, float)) and config.interval_s >= 1):
            raise UsageError("reclaim.interval_s must be at least 1")
        if not (isinstance(config.step_mib, int) and config.step_mib >= 16):
            raise UsageError("reclaim.step_mib must be an integer of at least 16")
        if not isinstance(config.host_available_min_mib, int) or config.host_available_min_mib < 0:
            raise UsageError("reclaim.host_available_min_mib must be a non-negative integer")
        if config.method not in METHODS:
            raise UsageError(f"reclaim.method must be one of {', '.join(METHODS)}")
        return config


def _pool_entitlements(domains: list[Domain], demand: dict[str, int]) -> dict[str, int]:
    """Entitlement in bytes per domain assigned to a pool (others absent)."""
    try:
        from hvext.memory.pools_store import PoolStore
        tree = PoolStore().load(capacity_mib=max(1, sum(demand.values()) // MIB))
    except (HvextError, OSError):
        return {}
    by_leaf = {}
    for domain in domains:
        leaf = tree.lookup(domain.name)
        if leaf is not None:
            by_leaf[leaf] = domain.name
    if not by_leaf:
        return {}
    shares = tree.entitlements({leaf: demand[name] // MIB for leaf, name in by_leaf.items()})
    return {by_leaf[leaf]: mib * MIB for leaf, mib in shares.items() if leaf in by_leaf}


async def one_round(host: Host, config: ReclaimConfig) -> list[dict[str, Any]]:
    """Reclaim once if the host is short of memory; returns what was done (also logged)."""
    available = meminfo("MemAvailable")
    floor = config.host_available_min_mib * MIB
    if available >= floor:
        return []
    need = floor - available
    candidates = [d for d in host.domains(include_inactive=False)
                  if d.facts().hvext_managed and (not config.domains or d.name in config.domains)]
    actual = {d.name: d.info()["used_memory_kib"] * 1024 for d in candidates}
    entitled = _pool_entitlements(candidates, actual)
    candidates.sort(key=lambda d: actual[d.name] - entitled.get(d.name, 0), reverse=True)
    log.info("host available %d MiB < %d MiB: reclaiming %d MiB from %d VMs", available // MIB,
             config.host_available_min_mib, need // MIB, len(candidates))
    done = []
    for domain in candidates:
        if need <= 0:
            break
        amount = min(config.step_mib * MIB, need)
        try:
            report = await reclaim.reclaim(domain, amount, config.method)
        except HvextError as err:
            log.warning("reclaim from %s refused: %s", domain.name, err)
            continue
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
        try:
            await asyncio.wait_for(stopping.wait(), config.interval_s)
        except asyncio.TimeoutError:
            pass
