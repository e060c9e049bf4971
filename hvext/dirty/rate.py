"""Dirty-page rates of a running domain, from QMP ``calc-dirty-rate`` (C9).

Modes QEMU offers: ``page-sampling`` (hashes sampled pages; any accelerator),
``dirty-bitmap`` (the accelerator's dirty log; Debian's stock QEMU 7.2
segfaults in it under TCG, the hvext patch series fixes that) and
``dirty-ring`` (KVM with a dirty ring only). :func:`available_modes` says
which work on a domain, and :func:`measure` refuses the others clearly
instead of crashing the VM.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from hvext import accel
from hvext.errors import QMPError, UnsupportedError, UsageError
from hvext.dirty.pages import command_names
from hvext.host import Domain
from hvext.qmp import QMPSession

MODES = ("page-sampling", "dirty-bitmap", "dirty-ring")
#: A QMP command only the hvext patch series has; its presence means dirty-bitmap is safe under TCG.
PATCH_MARKER_COMMAND = "x-hvext-query-dirty-pages"


@dataclass(frozen=True)
class DirtyRate:
    mode: str
    seconds: float
    rate_mib_s: int  # what QEMU reports (MiB/s)
    sample_pages: int | None
    wall_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def qmp_commands(qmp: QMPSession) -> set[str]:
    return command_names(await qmp.execute("query-commands"))


async def available_modes(qmp: QMPSession) -> dict[str, str]:
    """Mode -> "" when usable, else why not."""
    patched = PATCH_MARKER_COMMAND in await qmp_commands(qmp)
    kvm = accel.current().is_kvm
    reasons = {"page-sampling": ""}
    reasons["dirty-bitmap"] = "" if kvm or patched else \
        "stock QEMU 7.2 crashes in dirty-bitmap mode under TCG; build the patched QEMU (`make qemu`)"
    reasons["dirty-ring"] = "" if kvm else "dirty-ring needs KVM with a dirty ring (this domain runs under TCG)"
    return reasons


async def measure(domain: Domain, seconds: float = 1.0, mode: str = "page-sampling",
                  sample_pages: int = 512) -> DirtyRate:
    """Measure the domain's dirty rate over *seconds* in *mode* (opens its own QMP session)."""
    async with domain.qmp() as qmp:
        return await measure_with(qmp, seconds, mode, sample_pages)


async def measure_with(qmp: QMPSession, seconds: float = 1.0, mode: str = "page-sampling",
                       sample_pages: int = 512) -> DirtyRate:
    """Like :func:`measure`, on a QMP session the caller holds (QEMU serves one client per monitor)."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
    if not 1 <= seconds <= 60 or seconds != int(seconds):
        raise UsageError("seconds must be a whole number from 1 to 60 (QEMU's calc-time)")
    if not 128 <= sample_pages <= 262144:
        raise UsageError("sample pages must be from 128 to 262144 per GiB")
    why_not = (await available_modes(qmp))[mode]
    if why_not:
        raise UnsupportedError(f"dirty rate mode {mode}: {why_not}")
    arguments: dict[str, Any] = {"calc-time": int(seconds), "mode": mode}
    if mode == "page-sampling":
        arguments["sample-pages"] = sample_pages
    started = time.monotonic()
    try:
        await qmp.execute("calc-dirty-rate", arguments)
    except QMPError as err:
        raise QMPError(f"calc-dirty-rate refused: {err} (another measurement may be running)") from err
    deadline = started + seconds + 30
    while True:
        await asyncio.sleep(min(0.5, seconds / 4))
        result = await qmp.execute("query-dirty-rate")
        status = result.get("status") if isinstance(result, dict) else None
        if status == "measured":
            break
        if time.monotonic() > deadline:
            raise QMPError(f"dirty rate still {str(status)[:32]!r} {seconds + 30:.0f} s after starting")
    return parse_result(result, mode, seconds, started)


def parse_result(result: Any, mode: str, seconds: float, started: float) -> DirtyRate:
    """Check a measured ``query-dirty-rate`` reply (QEMU data); QMPError if it is malformed."""
    if not isinstance(result, dict):
        raise QMPError("query-dirty-rate did not return an object")
    rate, sample = result.get("dirty-rate", 0), result.get("sample-pages")
    reported_mode = result.get("mode", mode)
    if not isinstance(rate, int) or isinstance(rate, bool) or not 0 <= rate < 2**63:
        raise QMPError("query-dirty-rate gave no valid dirty-rate")
    if sample is not None and (not isinstance(sample, int) or isinstance(sample, bool) or not 0 <= sample < 2**63):
        raise QMPError("query-dirty-rate gave an invalid sample-pages")
    if reported_mode not in MODES:
        raise QMPError("query-dirty-rate gave an unknown mode")
    return DirtyRate(mode=reported_mode, seconds=seconds, rate_mib_s=rate, sample_pages=sample,
                     wall_seconds=round(time.monotonic() - started, 2))
