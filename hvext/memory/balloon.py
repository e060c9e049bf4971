"""Balloon control (C1): set a domain's balloon target, follow the guest to it.

``set_target`` asks libvirt to move the balloon (``setMemoryFlags`` with
AFFECT_LIVE, as ``virsh setmem`` does on a running domain; AFFECT_CONFIG,
i.e. the next start's ``currentMemory``, on a shut-off one) and records the
target in hvext's own live metadata element: QEMU reports only where the
balloon *is* (``actual``), and libvirt rewrites the live ``currentMemory``
from every BALLOON_CHANGE event, so neither remembers the target.

``follow`` watches ``actual`` move towards the target: BALLOON_CHANGE events
on hvext's own QMP monitor, plus a ``query-balloon`` poll every second (the
only source for plain libvirt domains reached through QMP passthrough, and a
safety net since QEMU rate-limits the event). It ends when the target is
reached, when ``actual`` has not moved closer for ``stall_after`` seconds (the
guest cannot or will not give more: the result says where it stopped and what
its balloon statistics report as free and available), or at the timeout.

A Linux guest does not refuse politely: its driver grabs pages with
``__GFP_NORETRY`` and, when it can find no more, leaves the guest so short of
memory that the OOM killer (and, once it kills init, a panic) follows. So
shrinking below what the guest can spare (``actual - available`` plus
headroom; MemAvailable from the agent, else from fresh balloon statistics)
is refused unless forced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from lxml import etree

from hvext import aio
from hvext.errors import DomainStateError, HvextError, QMPError, UsageError
from hvext.host import Domain, libvirt_message
from hvext.domxml import libvirt_size
from hvext.units import KIB, MIB, format_size

log = logging.getLogger(__name__)

BALLOON_QOM_PATH = "/machine/peripheral/balloon0"  # libvirt names the balloon device balloon0
METADATA_NS = "https://hvext.dev/xmlns/balloon/1"  # not hvext's domain marker namespace: one element per URI
METADATA_KEY = "hvext-balloon"
MIN_TARGET = 64 * MIB
#: Headroom kept above what the guest uses (actual - available): its page cache working set and
#: the kernel's own allocations. Measured: a 256 MiB guest ballooned to actual - available + 1 MiB
#: OOM-killed its init and panicked.
SAFETY_HEADROOM = 64 * MIB
SAFETY_HEADROOM_FRACTION = 0.05
#: ``actual`` within this of the target counts as reached (QEMU moves in 4 KiB pages).
REACHED_TOLERANCE = 1 * MIB
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_STALL_S = 10.0
POLL_INTERVAL_S = 1.0
#: Balloon statistics older than this are not used to judge a target (hvext asks for them every 2 s;
#: a removed driver leaves its last ones behind).
STATS_FRESH_S = 5.0
AGENT_TIMEOUT_S = 3.0


class BalloonStalled(HvextError):
    """The guest did not bring the balloon to its target; ``result`` says where it stopped and why."""

    def __init__(self, result: BalloonResult) -> None:
        super().__init__(result.message())
        self.result = result


@dataclass(frozen=True)
class Target:
    """A balloon target (bytes) and where hvext knows it from."""

    bytes: int
    source: str  # "hvext" (recorded by set_target) or "definition" (currentMemory of the inactive config)
    set_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BalloonResult:
    """How following the balloon ended."""

    domain: str
    target: int
    start: int
    actual: int
    outcome: str  # reached | stalled | timeout
    elapsed_s: float
    stalled_for_s: float = 0.0
    guest_free: int | None = None
    guest_available: int | None = None
    guest_stats_age_s: float | None = None
    events: int = 0

    @property
    def reached(self) -> bool:
        return self.outcome == "reached"

    def reason(self) -> str:
        if self.reached:
            return "reached"
        shrinking = self.target < self.start
        guest = ""
        if self.guest_free is not None and self.guest_available is not None:
            guest = (f"; the guest reports {format_size(self.guest_free)} free and "
                     f"{format_size(self.guest_available)} available")
        if self.outcome == "timeout":
            return f"still moving when the wait ended after {self.elapsed_s:.0f} s (slow, not stuck){guest}"
        if self.actual == self.start:
            return (f"the guest did not move its balloon at all in {self.stalled_for_s:.0f} s: is its balloon "
                    f"driver (virtio_balloon) loaded?{guest}")
        if shrinking:
            return (f"the guest stopped giving memory back {self.stalled_for_s:.0f} s ago{guest}: it cannot "
                    "(or will not) give more without running out of memory")
        return f"the guest stopped taking memory back {self.stalled_for_s:.0f} s ago{guest}"

    def message(self) -> str:
        if self.reached:
            return (f"balloon of {self.domain!r} reached {format_size(self.actual)} "
                    f"in {self.elapsed_s:.1f} s")
        return (f"balloon of {self.domain!r} stopped at {format_size(self.actual)}, target "
                f"{format_size(self.target)} (started at {format_size(self.start)}): {self.reason()}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(reached=self.reached, reason=self.reason(), message=self.message())
        return data


# -- limits ---------------------------------------------------------------


def boot_memory(domain: Domain) -> int:
    """The balloon's ceiling in bytes: the domain's boot RAM (memory devices such as NVDIMMs excluded)."""
    return boot_memory_of(etree.fromstring(domain.xml().encode()))


def boot_memory_of(root: etree._Element) -> int:
    """Boot RAM in bytes of a domain XML: the sum of the NUMA cells when it has them (hvext
    domains do), else ``<memory>`` minus the memory devices (which libvirt counts in it)."""
    cells = root.findall("cpu/numa/cell")
    if cells:
        return sum(libvirt_size(c.get("memory"), c.get("unit")) for c in cells)
    memory = root.find("memory")
    total = libvirt_size(memory.text, memory.get("unit")) if memory is not None else 0
    devices = sum(libvirt_size(e.text, e.get("unit")) for e in root.iterfind("devices/memory/target/size"))
    return total - devices


def definition_target(root: etree._Element) -> int | None:
    """The balloon target a domain XML starts the guest with, in bytes; None without ``<currentMemory>``.

    libvirt counts memory devices (NVDIMM, virtio-pmem) in ``<currentMemory>``
    (attaching one adds its size), while QEMU's balloon works on boot RAM and
    caps its target there: so the target is ``currentMemory`` capped at the
    boot memory, never a figure that includes PMEM.
    """
    current = root.find("currentMemory")
    if current is None or not current.text:
        return None
    return min(libvirt_size(current.text, current.get("unit")), boot_memory_of(root))


def autodeflate(domain: Domain) -> bool:
    """True when the balloon deflates on guest OOM (then MemTotal keeps the inflated pages)."""
    root = etree.fromstring(domain.xml().encode())
    return any(b.get("autodeflate") == "on" for b in root.iterfind("devices/memballoon"))


def safe_floor(actual: int, available: int) -> int:
    """The lowest target a guest using ``actual - available`` bytes can reach without starving."""
    return actual - available + max(SAFETY_HEADROOM, int(actual * SAFETY_HEADROOM_FRACTION))


def check_target(domain: Domain, size: int) -> int:
    """*size* rounded down to whole KiB, or UsageError when nonsense for *domain*."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise UsageError(f"balloon target must be a number of bytes, not {size!r}")
    ceiling = boot_memory(domain)
    if size < MIN_TARGET:
        raise UsageError(f"balloon target {format_size(size)} is absurdly small: the minimum is "
                         f"{format_size(MIN_TARGET)}")
    if size > ceiling:
        raise UsageError(f"balloon target {format_size(size)} is above the maximum of {domain.name!r} "
                         f"({format_size(ceiling)}, its boot memory); raise that with the domain's definition")
    return size // KIB * KIB


# -- reading --------------------------------------------------------------


def actual_bytes(reply: Any) -> int:
    """The ``actual`` of a QMP ``query-balloon`` reply (QEMU data, checked); QMPError if it has none."""
    actual = reply.get("actual") if isinstance(reply, dict) else None
    if not isinstance(actual, int) or isinstance(actual, bool) or not 0 <= actual < 2**63:
        raise QMPError("query-balloon gave no valid 'actual'")
    return actual


async def read_balloon(domain: Domain) -> tuple[int, dict[str, Any]]:
    """(actual bytes, QMP guest-stats reply) of a running domain."""
    async with domain.qmp() as qmp:
        actual = actual_bytes(await qmp.execute("query-balloon"))
        return actual, await _guest_stats(qmp)


async def _guest_stats(qmp: Any) -> dict[str, Any]:
    """The balloon driver's statistics; {} when QEMU has none (no stats period, driver absent)."""
    try:
        reply = await qmp.execute("qom-get", {"path": BALLOON_QOM_PATH, "property": "guest-stats"})
    except QMPError:
        return {}
    return reply if isinstance(reply, dict) else {}


async def guest_available(domain: Domain) -> tuple[int | None, str]:
    """The guest's MemAvailable in bytes, and where it came from: the agent, else fresh balloon statistics.

    The agent answers now; the balloon statistics arrive every 2 s and lag a
    balloon change (figures from before an inflation overstate what is
    available). (None, "") when neither is available. Guest figures either way:
    the floor they give protects a guest from its operator, not the host from
    the guest (a guest understating them only keeps memory ``--force`` can take).
    """
    try:
        async with domain.agent(timeout=AGENT_TIMEOUT_S) as agent:
            value = (await agent.meminfo()).meminfo_kb.get("MemAvailable")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53:
            return value * KIB, "agent"
        log.info("agent of %s sent no usable MemAvailable (%r): using balloon statistics", domain.name, value)
    except HvextError as err:
        log.info("agent of %s unavailable (%s): using balloon statistics", domain.name, err)
    _actual, stats = await read_balloon(domain)
    if stats_fresh(stats):
        return stat_value(stats, "stat-available-memory"), "balloon statistics"
    return None, ""


def stats_fresh(reply: Any) -> bool:
    """True when the guest sent its statistics recently (a removed driver leaves old ones behind)."""
    updated = reply.get("last-update") if isinstance(reply, dict) else None
    return isinstance(updated, int) and not isinstance(updated, bool) and 0 <= updated < 2**63 \
        and time.time() - updated <= STATS_FRESH_S


def stat_value(reply: Any, key: str) -> int | None:
    stats = reply.get("stats") if isinstance(reply, dict) else None
    value = stats.get(key) if isinstance(stats, dict) else None
    # QEMU reports a statistic the guest never sent as 2**64 - 1
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else None


def recorded_target(domain: Domain) -> Target | None:
    """The target hvext last set on the running domain, else the definition's currentMemory.

    The fallback is what libvirt set at start; a change made outside hvext
    (``virsh setmem``) is not seen. None for a domain with no definition to ask.
    """
    try:
        xml = domain.metadata(METADATA_NS, live=True) if domain.is_active() else None
        if xml is not None:
            element = etree.fromstring(xml.encode())
            return Target(int(element.get("target-kib", "")) * KIB, "hvext",
                          float(element.get("set-at", "nan")) if element.get("set-at") else None)
    except HvextError as err:
        log.warning("cannot read the balloon target hvext recorded for %s: %s", domain.name, libvirt_message(err))
        return None
    except (ValueError, etree.XMLSyntaxError) as err:  # a metadata element someone else wrote
        log.warning("ignoring the unreadable balloon target recorded for %s: %s", domain.name, err)
    try:
        root = etree.fromstring(domain.xml(inactive=domain.is_persistent()).encode())
    except HvextError as err:
        log.warning("cannot read the definition of %s: %s", domain.name, libvirt_message(err))
        return None
    target = definition_target(root)
    return Target(target, "definition") if target is not None else None


# -- setting --------------------------------------------------------------


@dataclass(frozen=True)
class SetResult:
    domain: str
    target: int
    live: bool  # False: only the definition (next start) changed
    previous_actual: int | None
    safe_floor: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def apply_target(domain: Domain, size: int, *, force: bool = False) -> SetResult:
    """Set the balloon target of *domain* to *size* bytes (see the module doc).

    Refuses (UsageError) sizes below 64 MiB or above the boot memory and, unless
    *force*, shrinking a running guest below what it can spare. libvirt calls
    run in threads, so the daemon can await this.
    """
    target = await asyncio.to_thread(check_target, domain, size)
    live = await asyncio.to_thread(domain.is_active)
    actual = floor = None
    if live:
        available, source = await guest_available(domain)
        actual = (await read_balloon(domain))[0]
        if available is not None and target < actual:
            floor = safe_floor(actual, available)
            if target < floor and not force:
                raise UsageError(
                    f"balloon target {format_size(target)} is below what {domain.name!r} can give without "
                    f"running out of memory: it uses about {format_size(actual - available)} (actual "
                    f"{format_size(actual)}, available {format_size(available)} by its {source}) and needs "
                    f"headroom, so {format_size(floor)} is the lowest safe target; --force tries anyway (the "
                    "guest may OOM-kill its processes, or panic)")
    await asyncio.to_thread(_set_memory, domain, target, live)
    return SetResult(domain.name, target, live, actual, floor)


def _set_memory(domain: Domain, target: int, live: bool) -> None:
    domain.set_memory(target // KIB, live=live)
    if live:
        record = etree.Element("balloon", {"target-kib": str(target // KIB), "set-at": f"{time.time():.3f}"})
        domain.set_metadata(METADATA_KEY, METADATA_NS, etree.tostring(record, encoding="unicode"), live=True)


def set_target(domain: Domain, size: int, *, force: bool = False) -> SetResult:
    """Synchronous :func:`apply_target` (for the CLI and tests)."""
    return aio.run(apply_target(domain, size, force=force))


# -- following ------------------------------------------------------------


async def follow(domain: Domain, target: int, *, timeout: float = DEFAULT_TIMEOUT_S,
                 stall_after: float = DEFAULT_STALL_S,
                 progress: Callable[[int], None] | None = None,
                 start: int | None = None) -> BalloonResult:
    """Watch ``actual`` until it reaches *target*, stalls for *stall_after* s, or *timeout* passes.

    *start* is where the balloon was before the target was set (default: now).
    """
    if not await asyncio.to_thread(domain.is_active):
        raise DomainStateError(f"domain {domain.name!r} is not running: there is no balloon to follow")
    began = time.monotonic()
    async with domain.qmp() as qmp:
        updates: asyncio.Queue[int] = asyncio.Queue()
        watcher = None
        if qmp.supports_events:
            async def watch() -> None:
                async for event in qmp.events("BALLOON_CHANGE"):  # type: ignore[attr-defined]
                    updates.put_nowait(event_actual(event))
            watcher = asyncio.ensure_future(watch())
            await asyncio.sleep(0)  # subscribed before the first query
        try:
            actual = actual_bytes(await qmp.execute("query-balloon"))
            first = actual if start is None else start
            best_gap = abs(actual - target)
            last_progress = time.monotonic()
            events = 0
            outcome = "timeout"
            while True:
                if progress is not None:
                    progress(actual)
                now = time.monotonic()
                if abs(actual - target) <= REACHED_TOLERANCE:
                    outcome = "reached"
                    break
                if abs(actual - target) < best_gap:
                    best_gap, last_progress = abs(actual - target), now
                if now - last_progress >= stall_after:
                    outcome = "stalled"
                    break
                if now - began >= timeout:
                    break
                wait = min(POLL_INTERVAL_S, max(0.05, timeout - (now - began)))
                try:
                    value = await asyncio.wait_for(updates.get(), wait)
                    events += 1
                    if value >= 0:
                        actual = value
                        continue
                except TimeoutError:
                    pass
                actual = actual_bytes(await qmp.execute("query-balloon"))
            stats = await _guest_stats(qmp) if outcome != "reached" else {}
        finally:
            if watcher is not None:
                watcher.cancel()
                await _reap_watcher(watcher, domain.name)
    updated = stats.get("last-update")
    last_update = updated if isinstance(updated, int) and not isinstance(updated, bool) and 0 < updated < 2**63 \
        else None  # a huge value would overflow the float arithmetic below
    return BalloonResult(
        domain=domain.name, target=target, start=first, actual=actual, outcome=outcome,
        elapsed_s=round(time.monotonic() - began, 2),
        stalled_for_s=round(time.monotonic() - last_progress, 1) if outcome != "reached" else 0.0,
        guest_free=stat_value(stats, "stat-free-memory"), guest_available=stat_value(stats, "stat-available-memory"),
        guest_stats_age_s=round(time.time() - last_update, 1) if last_update else None,
        events=events)


def event_actual(event: Any) -> int:
    """``actual`` (bytes) of a BALLOON_CHANGE event from QEMU, or -1 when the event does not carry one."""
    data = event.get("data") if isinstance(event, dict) else None
    actual = data.get("actual") if isinstance(data, dict) else None
    if isinstance(actual, int) and not isinstance(actual, bool) and 0 <= actual < 2**63:
        return actual
    return -1


async def _reap_watcher(watcher: asyncio.Future[None], name: str) -> None:
    """Wait for a cancelled event watcher; a failure it met is logged (following fell back to polling)."""
    try:
        await watcher
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the caller itself is being cancelled, not only the watcher
    except Exception as err:
        log.warning("BALLOON_CHANGE events of %s stopped (%s: %s); following relied on polling",
                    name, type(err).__name__, err)


async def set_and_follow(domain: Domain, size: int, *, force: bool = False,
                         timeout: float = DEFAULT_TIMEOUT_S, stall_after: float = DEFAULT_STALL_S,
                         progress: Callable[[int], None] | None = None) -> BalloonResult:
    """:func:`apply_target` then :func:`follow`; raises BalloonStalled when the target is not reached."""
    done = await apply_target(domain, size, force=force)
    if not done.live:
        raise DomainStateError(f"domain {domain.name!r} is not running: its definition now starts it with "
                               f"{format_size(done.target)}, there is nothing to wait for")
    result = await follow(domain, done.target, timeout=timeout, stall_after=stall_after, progress=progress,
                          start=done.previous_actual)
    if not result.reached:
        raise BalloonStalled(result)
    return result
