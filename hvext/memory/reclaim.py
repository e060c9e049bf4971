"""Reclaim memory from a VM by ballooning, host swapping, or both, as the policy decides (C2).

Collect (balloon statistics, the agent's usage classes) -> decide
(:mod:`hvext.memory.policy`, pure) -> act (:mod:`hvext.memory.balloon`,
:mod:`hvext.memory.swap`) -> measure what the host really got back (the QEMU
process's RSS and the host's available memory, not only balloon figures).

Everything blocking (libvirt calls, /proc reads, the ``process_madvise``
page-out, which can take seconds) runs in a thread: hvextd shares its event
loop with libvirt's keepalives and events and with a SIGPWR save.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from hvext.errors import AgentError, QMPError
from hvext.host import Domain
from hvext.memory import balloon, classes, policy, ramfile, swap
from hvext.memory.host import meminfo
from hvext.units import MIB

log = logging.getLogger(__name__)


@dataclass
class ReclaimReport:
    domain: str
    method: str
    decision: dict[str, Any]
    rss_before: int
    rss_after: int
    host_available_before: int
    host_available_after: int
    balloon_actual_before: int
    balloon_actual_after: int
    seconds: float
    notes: list[str]

    @property
    def returned(self) -> int:
        """Bytes the QEMU process gave back to the host."""
        return max(0, self.rss_before - self.rss_after)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["returned"] = self.returned
        return data


async def _swap_writeback_settled(timeout: float = 10.0) -> None:
    """Wait (bounded) until paged-out pages have reached swap and left RAM, so that the
    host's available memory is measured after the fact, not while writes are in flight."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and await asyncio.to_thread(meminfo, "Writeback") > MIB:
        await asyncio.sleep(0.2)


async def collect(domain: Domain) -> tuple[policy.VMState, list[str]]:
    """What the policy needs, from QMP (balloon) and the agent (classes); agent trouble is a note, not a failure."""
    notes: list[str] = []
    actual, stats = await balloon.read_balloon(domain)
    responsive = balloon.stats_fresh(stats)
    available = balloon.stat_value(stats, "stat-available-memory")
    guest = None
    try:
        report = await classes.fetch(domain, timeout=10)
        if report.plausible:
            ps = report.page_size
            guest = policy.GuestMemory(total=report.total * ps, free=report.classes.get("free", 0) * ps,
                                       clean_cache=report.classes.get("page_cache_clean", 0) * ps,
                                       anon_inactive=report.classes.get("anon_inactive", 0) * ps)
        else:
            notes.append(f"agent report implausible ({'; '.join(report.problems)}): not trusted")
    except (AgentError, QMPError) as err:
        notes.append(f"agent unavailable: {err}")
    # The balloon refuses targets that would starve the guest (balloon.safe_floor): the policy
    # must not plan beyond that floor, or an "auto" reclaim would fail instead of swapping the rest.
    floor = 128 * policy.MIB
    if responsive:
        guest_available, _source = await balloon.guest_available(domain)
        if guest_available is not None:
            floor = max(floor, balloon.safe_floor(actual, guest_available))
    state = policy.VMState(domain.name, actual=actual, balloon_responsive=responsive, guest=guest,
                           balloon_available=available if responsive else None, balloon_floor=floor)
    return state, notes


async def reclaim(domain: Domain, amount: int, method: str = "auto") -> ReclaimReport:
    """Take *amount* bytes from the running *domain* and return what was decided, done and measured."""
    await asyncio.to_thread(domain.require_running)
    started = time.monotonic()
    state, notes = await collect(domain)
    decision = policy.decide(state, amount, method)
    log.info("reclaim %s from %s: %s (%s)", amount, domain.name, decision.method, decision.reason)
    pid = await asyncio.to_thread(swap.qemu_pid, domain.name)
    rss_before = (await asyncio.to_thread(ramfile.usage, domain)).total  # a RAM file counted once
    available_before = await asyncio.to_thread(meminfo, "MemAvailable")
    if decision.balloon:
        try:
            await balloon.set_and_follow(domain, state.actual - decision.balloon, timeout=90)
        except balloon.BalloonStalled as err:
            notes.append(f"balloon stopped short: {err}")
    if decision.swap:
        ram = await asyncio.to_thread(balloon.boot_memory, domain)
        result = await asyncio.to_thread(swap.page_out, pid, ram, decision.swap)
        notes.append(f"host swap: {result.reclaimed // MIB} MiB paged out in {result.seconds:.2f} s")
    actual_after, _ = await balloon.read_balloon(domain)
    if decision.swap:
        await _swap_writeback_settled()
    rss_after = (await asyncio.to_thread(ramfile.usage, domain)).total
    available_after = await asyncio.to_thread(meminfo, "MemAvailable")
    return ReclaimReport(
        domain=domain.name, method=decision.method,
        decision={"balloon": decision.balloon, "swap": decision.swap, "reason": decision.reason},
        rss_before=rss_before, rss_after=rss_after,
        host_available_before=available_before, host_available_after=available_after,
        balloon_actual_before=state.actual, balloon_actual_after=actual_after,
        seconds=round(time.monotonic() - started, 2), notes=notes)


__all__ = ["ReclaimReport", "collect", "reclaim"]
