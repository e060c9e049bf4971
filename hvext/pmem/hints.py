"""Persistence hints and epochs on the host side (C15, VPM), and their use by power-loss saves.

The guest agent reports hints as guest physical ranges (see
guest-agent/hvext_agent/hints.py). They are untrusted: at most MAX_RANGES,
each must lie inside one of *this* domain's pmem devices (addresses from
QEMU's ``query-memory-devices``), and they only ever shrink what hvext saves
for that domain's own devices — never touch another VM's memory.

Before a power-loss save, hvext asks the guest to freeze hinting
applications at their next epoch boundary, then pauses the VM, so the saved
copy is crash consistent at an epoch; volatile ranges are not saved. All the
agent and QMP calls before the pause end by the save's deadline (one budget
for the whole save, :data:`hvext.pmem.power.PREPAUSE_BUDGET_S`), whatever the
guest does. After the guest is resumed -- or at once when its pause failed --
hvext thaws it; the guest also ends a freeze that is never thawed by itself
(:data:`FREEZE_HOLD_S` seconds of its own time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvext import aio
from hvext.errors import AgentTimeout, HvextError, QMPError
from hvext.host import Domain
from hvext.pmem import devices, power, virtio

log = logging.getLogger(__name__)

MAX_RANGES = 4096
KINDS = ("persistent", "volatile", "hot")
#: Longest wait for hinting applications to reach an epoch (within the pre-pause budget).
FREEZE_TIMEOUT_S = 3.0
#: The guest ends a freeze the host never thawed by itself after hvext_agent.hints.FREEZE_HOLD_S
#: seconds of its own time (60 s; its clock stops while it is paused).
FREEZE_HOLD_S = 60.0
#: Longest a thaw may take (the guest is running: its applications wait at the epoch meanwhile).
THAW_TIMEOUT_S = 3.0


@dataclass
class DeviceHints:
    backing: str
    size: int
    ranges: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: {k: [] for k in KINDS})
    epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"backing": self.backing, "size": self.size, "epochs": self.epochs,
                "ranges": {k: [list(r) for r in v] for k, v in self.ranges.items()},
                "bytes": {k: sum(n for _, n in v) for k, v in self.ranges.items()}}


@dataclass
class Hints:
    domain: str
    devices: dict[str, DeviceHints]  # by backing path
    rejected: list[str]
    frozen: list[int]
    missing: list[int]
    guest_errors: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "devices": {k: v.to_dict() for k, v in self.devices.items()},
                "rejected": self.rejected, "frozen": self.frozen, "missing": self.missing,
                "guest_errors": self.guest_errors}


async def _device_windows(domain: Domain) -> list[tuple[int, int, str]]:
    """(guest physical address, size, backing path) of each pmem device of the running domain."""
    by_alias = {d.alias: d for d in devices.list_devices(domain) + virtio.list_devices(domain) if d.alias}
    async with domain.qmp() as qmp:
        return _windows_from(await qmp.execute("query-memory-devices"), by_alias)


MAX_ADDRESS = 1 << 64  # guest physical addresses and sizes are 64-bit in QEMU


def _u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_ADDRESS


def _windows_from(reply: Any, by_alias: dict[str, Any]) -> list[tuple[int, int, str]]:
    """Check QEMU's ``query-memory-devices`` reply and keep the windows of *by_alias*'s devices.

    Entries of other devices are skipped; one of ours without a sane address
    and size (or seen twice) is a QMPError: the saved ranges depend on it.
    """
    if not isinstance(reply, list):
        raise QMPError("query-memory-devices did not return a list")
    windows: list[tuple[int, int, str]] = []
    seen: set[str] = set()
    for entry in reply:
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), dict):
            raise QMPError("query-memory-devices returned an entry that is not an object with data")
        data, kind = entry["data"], entry.get("type")
        alias = data.get("id")
        if kind not in ("nvdimm", "virtio-pmem") or not isinstance(alias, str) or alias not in by_alias:
            continue
        address, size = data.get("addr", data.get("memaddr")), data.get("size")
        if not _u64(address) or not _u64(size) or not size or address + size > MAX_ADDRESS or alias in seen:
            raise QMPError(f"query-memory-devices gave device {alias[:64]!r} no valid address and size")
        seen.add(alias)
        windows.append((address, size, str(by_alias[alias].path)))
    return windows


MAX_PIDS = 256
MAX_GUEST_ERRORS = 16
MAX_PID = 1 << 22  # Linux's pid_max limit
MAX_EPOCH_DEVICES = 256


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _pids(value: Any) -> list[int]:
    return [p for p in _list(value)[:MAX_PIDS]
            if isinstance(p, int) and not isinstance(p, bool) and 0 < p <= MAX_PID]


def validate(raw: Any, windows: list[tuple[int, int, str]], domain: str) -> Hints:
    """Keep the hints that are well formed and inside one of the domain's devices.

    Total: whatever *raw* is (it comes from the guest), the result is a
    :class:`Hints`; what was not usable is listed in ``rejected``.
    """
    hints = Hints(domain, {path: DeviceHints(path, size) for _, size, path in windows}, [], [], [], [])
    if not isinstance(raw, dict):
        hints.rejected.append("report is not an object")
        return hints
    ranges = _list(raw.get("ranges"))
    if len(ranges) > MAX_RANGES:
        hints.rejected.append(f"{len(ranges) - MAX_RANGES} ranges over the limit of {MAX_RANGES} dropped")
    for item in ranges[:MAX_RANGES]:
        kind = item.get("kind") if isinstance(item, dict) else None
        if not isinstance(kind, str) or kind not in KINDS:
            hints.rejected.append("range without a valid kind")
            continue
        gpa, length = item.get("gpa"), item.get("length")
        if not _u64(gpa) or not _u64(length) or not length:
            hints.rejected.append("range with a bad address or length")
            continue
        window = next(((base, size, path) for base, size, path in windows
                       if base <= gpa and gpa + length <= base + size), None)
        if window is None:
            hints.rejected.append(f"range {gpa:#x}+{length:#x} is outside this domain's pmem devices")
            continue
        hints.devices[window[2]].ranges[kind].append((gpa - window[0], length))
    epochs = raw.get("epochs") if isinstance(raw.get("epochs"), dict) else {}
    counts = [v.get("count") for v in list(epochs.values())[:MAX_EPOCH_DEVICES] if isinstance(v, dict)]
    total_epochs = sum(c for c in counts if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**53)
    for device in hints.devices.values():  # guest device names do not map to backings reliably: count per VM
        device.epochs = total_epochs
    hints.frozen = _pids(raw.get("frozen"))
    hints.missing = _pids(raw.get("missing"))
    hints.guest_errors = [e[:200] for e in _list(raw.get("errors"))[:MAX_GUEST_ERRORS] if isinstance(e, str)]
    return hints


async def fetch(domain: Domain, *, freeze: bool = False, timeout: float | None = None) -> Hints:
    """The domain's validated hints; with *freeze*, after asking hinting applications to stop at an epoch.

    With *timeout*, everything (QMP, agent connection, handshake, request) ends within it
    (AgentTimeout), and the guest waits for its applications at most part of it."""
    if timeout is None:
        return await _fetch(domain, freeze, FREEZE_TIMEOUT_S, FREEZE_TIMEOUT_S + 2)
    try:
        # the guest's own wait leaves time for the reply; the agent calls stop at the deadline
        return await asyncio.wait_for(_fetch(domain, freeze, min(FREEZE_TIMEOUT_S, timeout * 0.6),
                                             max(timeout, 0.001)), max(timeout, 0.001))
    except asyncio.TimeoutError as err:
        raise AgentTimeout(f"{domain.name}: no hints within the {timeout:.1f} s left before the pause") from err


async def _fetch(domain: Domain, freeze: bool, guest_wait: float, timeout: float) -> Hints:
    # the guest first: its freeze is what takes time; the device windows come from QEMU
    async with domain.agent(timeout=timeout) as agent:
        raw = await agent.pmem_freeze(guest_wait, timeout=timeout) if freeze else await agent.pmem_hints()
    return validate(raw, await _device_windows(domain), domain.name)


async def thaw(domain: Domain, timeout: float = THAW_TIMEOUT_S) -> None:
    """Let the guest's applications go on past their epoch (bounded: a hostile agent cannot stall it)."""
    async def run() -> None:
        async with domain.agent(timeout=timeout) as agent:
            await agent.pmem_thaw()
    try:
        await asyncio.wait_for(run(), timeout)
    except asyncio.TimeoutError as err:
        raise AgentTimeout(f"{domain.name}: the guest did not confirm the thaw within {timeout:.1f} s "
                           f"(it ends the freeze by itself after {FREEZE_HOLD_S:.0f} s)") from err


def save_ranges(device: DeviceHints) -> list[tuple[int, int]]:
    """The device minus its volatile ranges (what a save must keep)."""
    cuts = sorted(device.ranges["volatile"])
    keep, position = [], 0
    for offset, length in cuts:
        if offset > position:
            keep.append((position, offset - position))
        position = max(position, offset + length)
    if position < device.size:
        keep.append((position, device.size - position))
    return keep


# -- power-loss integration ---------------------------------------------------
_prepared: dict[str, list[tuple[int, int]]] = {}


FLUSH_WAIT_S = 2.0


async def _next_flush(domain: Domain, timeout: float) -> dict[str, Any] | None:
    """Wait (bounded) for the guest's next virtio-pmem flush (patched QEMU): a durability point."""
    async with domain.qmp() as qmp:
        if not getattr(qmp, "supports_events", False):
            return None
        try:
            async def first() -> dict[str, Any]:
                async for event in qmp.events("X_HVEXT_PMEM_FLUSH"):  # type: ignore[attr-defined]
                    return dict(event.get("data", {}))
                return {}
            return await asyncio.wait_for(first(), timeout)
        except asyncio.TimeoutError:
            return None


def before_pause(domain: Domain, deadline: float | None = None) -> dict[str, Any]:
    """Bring the guest to an epoch boundary before it is paused, and remember what to save (best effort).

    Hinting applications are frozen at their next epoch. Without any, for a
    domain with virtio-pmem devices, the pause follows the guest's next flush
    request (QEMU's X_HVEXT_PMEM_FLUSH event, patched QEMU): the guest's
    file system has just made its data durable there. Returns by *deadline*
    (``time.monotonic()``; default: the power-loss budget from now), never raises.
    """
    if deadline is None:
        deadline = time.monotonic() + power.PREPAUSE_BUDGET_S
    hints = None
    try:  # ranges an earlier save prepared but did not use must not narrow this one
        for device in devices.list_devices(domain) + virtio.list_devices(domain):
            _prepared.pop(str(device.path), None)
    except HvextError as err:
        log.warning("%s: cannot list pmem devices: %s", domain.name, err)
    report: dict[str, Any] = {"epoch_consistent": False, "hints": "unavailable: no time left before the pause"}
    remaining = deadline - time.monotonic()
    try:
        if remaining > 0.05:
            hints = aio.run(fetch(domain, freeze=True, timeout=remaining))
    except HvextError as err:
        report["hints"] = f"unavailable: {err}"
    except Exception as err:  # never let a guest's report stop the pause
        log.exception("%s: hints failed", domain.name)
        report["hints"] = f"unavailable: unexpected {type(err).__name__}: {err}"
    if hints is not None:
        for backing, device in hints.devices.items():
            _prepared[backing] = save_ranges(device)
        report = {"epoch_consistent": not hints.missing and bool(hints.frozen), "frozen": hints.frozen,
                  "not_frozen": hints.missing, "rejected_hints": len(hints.rejected),
                  "volatile_bytes_skipped": sum(sum(n for _, n in d.ranges["volatile"])
                                                for d in hints.devices.values())}
    try:
        wait = min(FLUSH_WAIT_S, deadline - time.monotonic())
        if not report["epoch_consistent"] and wait > 0 and virtio.list_devices(domain):
            flush = aio.run(_bounded(_next_flush(domain, wait), wait))
            if flush:
                report["paused_after_flush"] = flush  # the guest's last durability point before the pause
    except Exception as err:  # QMP gone or busy: the pause just does not wait for a flush
        report["flush"] = f"unavailable: {err}"
    return report


async def _bounded(coro: Any, timeout: float) -> Any:
    """*coro*'s result, or None when it has not finished in *timeout* (e.g. a slow QMP connect)."""
    try:
        return await asyncio.wait_for(coro, timeout)
    except asyncio.TimeoutError:
        return None


def after_resume(domain: Domain) -> None:
    try:
        aio.run(thaw(domain))
    except HvextError as err:
        log.warning("could not thaw %s: %s", domain.name, err)


def take_prepared(backing: Path | str) -> list[tuple[int, int]] | None:
    """What :func:`before_pause` said must be kept of *backing* (None: no hints: everything)."""
    return _prepared.pop(str(Path(backing)), None)


def overlaps(offset: int, length: int, keep: list[tuple[int, int]]) -> bool:
    return any(start < offset + length and offset < start + size for start, size in keep)


class GuestHints:
    """The guest agent's hints as a :class:`hvext.pmem.power.HintProvider`: freeze at an epoch before
    the pause, thaw after it, save what :func:`before_pause` prepared (all but volatile ranges)."""

    def before_pause(self, domain: Domain, deadline: float) -> dict[str, Any]:
        return before_pause(domain, deadline)

    def after_resume(self, domain: Domain) -> None:
        after_resume(domain)

    def ranges(self, reg: power.Registration) -> list[tuple[int, int]] | None:
        return take_prepared(reg.backing)


#: What ``hvext power loss``/``restore`` and hvextd pass to :func:`hvext.pmem.power.power_loss`.
PROVIDER: power.HintProvider = GuestHints()
