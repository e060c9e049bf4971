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

from hvext.errors import AgentError, AgentProtocolError, QMPError
from hvext.host import Domain
from hvext.memory import balloon
from hvext.memory.balloon import BALLOON_QOM_PATH

#: (label, QMP guest-stats key (bytes or count), agent source, agent key, agent unit bytes)
SIDE_BY_SIDE: list[tuple[str, str, str, str, int]] = [
    ("total memory", "stat-total-memory", "meminfo_kb", "MemTotal", 1024),
    ("free memory", "stat-free-memory", "meminfo_kb", "MemFree", 1024),
    ("available memory", "stat-available-memory", "meminfo_kb", "MemAvailable", 1024),
    ("disk caches", "stat-disk-caches", "meminfo_kb", "Cached", 1024),
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
                         "unit": "bytes" if unit == 1024 or qmp_key.endswith("memory") else "count"})
        rows[0]["unit"] = "bytes"
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"balloon_actual": self.balloon_actual,
                "balloon_target": self.balloon_target.to_dict() if self.balloon_target else None,
                "guest_stats": self.guest_stats,
                "guest_stats_last_update": self.guest_stats_updated, "agent": self.agent,
                "agent_error": self.agent_error, "qmp_error": self.qmp_error, "rows": self.rows()}


def _clean_counters(raw: Any, limit: int = 4096) -> dict[str, int]:
    """Keep only str -> non-negative int entries of an untrusted mapping (bounded)."""
    if not isinstance(raw, dict):
        raise AgentProtocolError("agent meminfo section is not an object")
    clean: dict[str, int] = {}
    for key, value in list(raw.items())[:limit]:
        if isinstance(key, str) and len(key) <= 64 and isinstance(value, int) \
                and not isinstance(value, bool) and 0 <= value < 2**63:
            clean[key] = value
    return clean


async def agent_meminfo(domain: Domain) -> dict[str, dict[str, int]]:
    """The guest's /proc/meminfo (kB) and /proc/vmstat, validated."""
    async with domain.agent() as agent:
        result = await agent.request("meminfo")
    return {"meminfo_kb": _clean_counters(result.get("meminfo_kb")),
            "vmstat": _clean_counters(result.get("vmstat"))}


def guest_stats_of(reply: Any) -> tuple[dict[str, int], int | None]:
    """(statistics, last update) of QEMU's guest-stats reply, keeping only sane values: QEMU reports
    a statistic the guest never sent as 2**64 - 1 (-1 in older versions)."""
    if not isinstance(reply, dict):
        return {}, None
    raw = reply.get("stats")
    keys = [k for k in raw if isinstance(k, str)][:64] if isinstance(raw, dict) else []
    clean = {k: v for k in keys if (v := balloon.stat_value(reply, k)) is not None}
    updated = reply.get("last-update")
    return clean, updated if isinstance(updated, int) and not isinstance(updated, bool) else None


async def collect(domain: Domain) -> MemStats:
    """Balloon figures from QMP and meminfo from the agent; a missing agent is reported, not fatal."""
    stats = MemStats(balloon_target=await asyncio.to_thread(balloon.recorded_target, domain))
    try:
        async with domain.qmp() as qmp:
            stats.balloon_actual = await balloon.query_actual(qmp)
            guest = await qmp.execute("qom-get", {"path": BALLOON_QOM_PATH, "property": "guest-stats"})
            stats.guest_stats, stats.guest_stats_updated = guest_stats_of(guest)
    except QMPError as err:
        stats.qmp_error = str(err)
    try:
        stats.agent = await agent_meminfo(domain)
    except AgentError as err:
        stats.agent_error = str(err)
    return stats
