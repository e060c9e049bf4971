"""Collectors for a domain's memory figures: QMP balloon statistics and the agent's meminfo.

The balloon target is hvext's own record (see :mod:`hvext.memory.balloon`):
QEMU reports only where the balloon is.

Collectors only read. Agent figures are untrusted guest input: they are
checked to be non-negative integers and kept apart from the hypervisor's own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from hvext.errors import AgentError, QMPError
from hvext.host import Domain
from hvext.memory import balloon
from hvext.memory.balloon import BALLOON_QOM_PATH
from hvext.units import KIB

#: (label, QMP guest-stats key (bytes or count), agent source, agent key, agent unit bytes)
SIDE_BY_SIDE: list[tuple[str, str, str, str, int]] = [
    ("total memory", "stat-total-memory", "meminfo_kb", "MemTotal", KIB),
    ("free memory", "stat-free-memory", "meminfo_kb", "MemFree", KIB),
    ("available memory", "stat-available-memory", "meminfo_kb", "MemAvailable", KIB),
    ("disk caches", "stat-disk-caches", "meminfo_kb", "Cached", KIB),
    ("swapped in (pages)", "stat-swap-in", "vmstat", "pswpin", 1),
    ("swapped out (pages)", "stat-swap-out", "vmstat", "pswpout", 1),
    ("major faults", "stat-major-faults", "vmstat", "pgmajfault", 1),
    ("minor faults", "stat-minor-faults", "vmstat", "pgfault", 1),
]


@dataclass
class MemStats:
    balloon_actual: int | None = None  # bytes, from query-balloon
    balloon_target: balloon.Target | None = None  # what hvext set (QEMU reports only actual)
    guest_stats: dict[str, int] = field(default_factory=dict)  # QMP guest-stats
    guest_stats_updated: int | None = None
    agent: dict[str, dict[str, int]] | None = None
    agent_error: str | None = None
    qmp_error: str | None = None

    def rows(self) -> list[dict[str, Any]]:
        target = self.balloon_target
        rows: list[dict[str, Any]] = [
            {"name": "balloon actual", "qmp": self.balloon_actual, "agent": None},
            {"name": "balloon target" + (" (definition)" if target and target.source != "hvext" else ""),
             "qmp": target.bytes if target else None, "agent": None, "unit": "bytes"},
        ]
        for label, qmp_key, source, agent_key, unit in SIDE_BY_SIDE:
            qmp_value = self.guest_stats.get(qmp_key)
            agent_value = None
            if self.agent is not None and agent_key in self.agent.get(source, {}):
                agent_value = self.agent[source][agent_key] * unit
            rows.append({"name": label, "qmp": qmp_value, "agent": agent_value,
                         "unit": "bytes" if unit == KIB or qmp_key.endswith("memory") else "count"})
        rows[0]["unit"] = "bytes"
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"balloon_actual": self.balloon_actual,
                "balloon_target": self.balloon_target.to_dict() if self.balloon_target else None,
                "guest_stats": self.guest_stats,
                "guest_stats_last_update": self.guest_stats_updated, "agent": self.agent,
                "agent_error": self.agent_error, "qmp_error": self.qmp_error, "rows": self.rows()}


def guest_stats(reply: Any) -> tuple[dict[str, int], int | None]:
    """The balloon driver's statistics from a QMP guest-stats reply (the guest's figures, via QEMU), checked.

    QEMU reports a statistic the guest never sent as 2**64 - 1 (-1 in older
    versions): it is left out, like anything that is not a non-negative integer.
    """
    if not isinstance(reply, dict):
        raise QMPError("guest-stats is not an object")
    raw = reply.get("stats", {})
    counters = {k: v for k in _stat_keys(raw) if _counter(v := raw[k])}
    updated = reply.get("last-update")
    return counters, updated if _counter(updated) else None


def _stat_keys(raw: Any) -> list[str]:
    return [k for k in list(raw)[:64] if isinstance(k, str) and len(k) <= 64] if isinstance(raw, dict) else []


def _counter(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


async def agent_meminfo(domain: Domain) -> dict[str, dict[str, int]]:
    """The guest's /proc/meminfo (kB) and /proc/vmstat, validated."""
    async with domain.agent() as agent:
        result = await agent.meminfo()
    return {"meminfo_kb": result.meminfo_kb, "vmstat": result.vmstat}


async def collect(domain: Domain) -> MemStats:
    """Balloon figures from QMP and meminfo from the agent; a missing agent is reported, not fatal."""
    stats = MemStats(balloon_target=await asyncio.to_thread(balloon.recorded_target, domain))
    try:
        async with domain.qmp() as qmp:
            stats.balloon_actual = balloon.actual_bytes(await qmp.execute("query-balloon"))
            guest = await qmp.execute("qom-get", {"path": BALLOON_QOM_PATH, "property": "guest-stats"})
            stats.guest_stats, stats.guest_stats_updated = guest_stats(guest)
    except QMPError as err:
        stats.qmp_error = str(err)
    try:
        stats.agent = await agent_meminfo(domain)
    except AgentError as err:
        stats.agent_error = str(err)
    return stats
