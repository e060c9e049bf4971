"""Migration policy (pure): which QEMU features to use, and when to switch to post-copy.

Pre-copy converges when the guest dirties memory clearly slower than the link
sends it; the closer the dirty rate comes to the bandwidth, the more it needs
help: XBZRLE (sends deltas of re-dirtied pages) and auto-converge (throttles
the vCPUs). At or above the bandwidth pre-copy cannot converge, and every
further pass re-sends the working set: post-copy then starts as soon as the
migration runs, so each page crosses the link once (the guest moves and
pulls the rest on demand). Below that, post-copy is only a safety net, used
when the passes show that pre-copy does not converge after all. Multifd uses
several streams, which only pays when nothing caps the bandwidth; QEMU 7.2
cannot combine it with post-copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvext.units import MIB
LOW, HIGH = 0.3, 0.8  # dirty rate / bandwidth thresholds
STALLED_PASSES = 4  # passes after which remaining RAM that does not shrink means pre-copy has stalled


@dataclass(frozen=True)
class Plan:
    policy: str
    downtime_ms: int
    bandwidth_mib: int | None  # the cap, or None
    auto_converge: bool = False
    xbzrle_cache: int = 0  # bytes; 0 = no XBZRLE
    multifd_channels: int = 0
    postcopy: bool = False  # enable the capability (switch decided by should_switch_to_postcopy())
    postcopy_at_start: bool = False  # switch as soon as the migration runs: pre-copy cannot converge
    time_budget_s: float = 120.0
    reason: str = ""


@dataclass(frozen=True)
class Progress:
    """One sample of a running migration (from libvirt's job statistics).

    *iteration* is QEMU's dirty-bitmap sync count: 0 while the job sets up,
    1 during the first full pass over RAM, n + 1 once n passes are done.
    *dirty_rate* is QEMU's rate over the last finished pass (0 during the first).
    """

    elapsed_s: float
    iteration: int
    remaining: int  # bytes of RAM still to send
    total: int
    dirty_rate: int  # bytes/s
    bps: int  # bytes/s sent
    expected_downtime_ms: int


def plan(policy: str, ram: int, dirty_rate: int, bandwidth: int | None, downtime_ms: int,
         bandwidth_cap_mib: int | None) -> Plan:
    """Choose the features for a migration of *ram* bytes at *dirty_rate* bytes/s over *bandwidth* bytes/s.

    *bandwidth* is the cap when there is one, else an estimate (or None: unknown, assumed fast).
    *dirty_rate* is measured before the migration (QEMU's calc-dirty-rate).
    """
    link = bandwidth or 1024 * MIB
    budget = max(60.0, 3 * ram / link + 30)
    if policy == "plain":  # like virsh migrate --live: never gives up by itself
        return Plan("plain", downtime_ms, bandwidth_cap_mib, time_budget_s=float("inf"),
                    reason="plain: libvirt's default live migration")
    ratio = dirty_rate / link
    base = f"dirty rate {dirty_rate / MIB:.0f} MiB/s is {ratio:.0%} of {link / MIB:.0f} MiB/s"
    if ratio < LOW:
        channels = 0 if bandwidth_cap_mib else 2
        return Plan("auto", downtime_ms, bandwidth_cap_mib, multifd_channels=channels, postcopy=channels == 0,
                    time_budget_s=budget, reason=f"{base}: pre-copy converges"
                    + (", multifd (no cap)" if channels else ", post-copy only if it stalls"))
    if ratio < 1:
        cache = min(max(64 * MIB, ram // 4), 1024 * MIB)
        return Plan("auto", downtime_ms, bandwidth_cap_mib, auto_converge=True, xbzrle_cache=cache, postcopy=True,
                    time_budget_s=budget, reason=f"{base}: XBZRLE and auto-converge, post-copy if it stalls")
    # Each pre-copy pass would re-send the working set the guest dirtied meanwhile: move the guest now.
    return Plan("auto", downtime_ms, bandwidth_cap_mib, postcopy=True, postcopy_at_start=True,
                time_budget_s=budget, reason=f"{base}: pre-copy cannot converge, post-copy from the start "
                                             "(each page sent once)")


def should_switch_to_postcopy(p: Plan, history: list[Progress]) -> str:
    """Why to switch now (a non-empty reason), or "" to keep pre-copying."""
    if not p.postcopy or not history:
        return ""
    now = history[-1]
    if p.postcopy_at_start:
        if now.iteration < 1:
            return ""  # QEMU's side of the job has not started yet
        return "planned: the guest dirties memory at least as fast as the link sends it"
    if now.iteration < 2:
        return ""  # the first pass sends everything once whatever happens; judge it when it is done
    if now.elapsed_s > p.time_budget_s * 0.5:
        return f"pre-copy has not finished after {now.elapsed_s:.0f} s"
    if now.expected_downtime_ms <= p.downtime_ms:
        return ""  # about to complete
    link = link_rate(history)
    if link and now.dirty_rate >= HIGH * link:
        return (f"the guest dirtied {now.dirty_rate / MIB:.0f} MiB/s during the last pass, "
                f"the link sends {link / MIB:.0f} MiB/s: pre-copy would re-send the working set")
    starts = pass_starts(history)
    if now.iteration >= STALLED_PASSES and len(starts) >= 3 and starts[-1] >= 0.9 * min(starts[-3:-1]):
        return f"remaining RAM stopped shrinking ({starts[-1] / MIB:.0f} MiB to send in pass {now.iteration})"
    return ""


def link_rate(history: list[Progress]) -> int:
    """The link's sending rate so far (bytes/s): the median sample, so that one slow moment is not the link."""
    rates = sorted(h.bps for h in history if h.bps > 0)
    return rates[len(rates) // 2] if rates else 0


def pass_starts(history: list[Progress]) -> list[int]:
    """The RAM left to send at the start of each pass after the first, oldest first (largest sample of each)."""
    starts: dict[int, int] = {}
    for h in history:
        if h.iteration >= 2:
            starts[h.iteration] = max(starts.get(h.iteration, 0), h.remaining)
    return [starts[i] for i in sorted(starts)]


@dataclass(frozen=True)
class Recovery:
    """What to do with the source after a failed migration, and what to tell the user."""

    resume: bool
    outcome: str


def after_failure(state: str, pause_reason: str, paused_before: bool, postcopy_started: bool) -> Recovery:
    """Whether to resume the source of a failed migration: only if the migration itself paused it.

    *state* is the source's state now ("running", "paused", ...), *pause_reason*
    why it is paused ("migration", "user", "post-copy", "post-copy failed", ...),
    *paused_before* whether it was paused when the migration started and
    *postcopy_started* whether hvext asked for the switch to post-copy. After
    that switch the guest's newest memory is on the destination: resuming the
    source would run it from stale memory, so it stays paused.
    """
    if state == "running":
        return Recovery(False, "the source keeps running; no guest state was lost")
    if state != "paused":
        return Recovery(False, f"the source is {state}")
    if postcopy_started or pause_reason.startswith("post-copy"):
        return Recovery(False, "the source is paused after the switch to post-copy and was not resumed (part of "
                               "the guest's memory is only on the destination): check it with `hvext dominfo`")
    if paused_before:
        return Recovery(False, "the source is paused, as it was before the migration")
    if pause_reason == "migration":
        return Recovery(True, "the source was paused for the migration and has been resumed")
    return Recovery(False, f"the source is paused ({pause_reason}), not by the migration, and was left so")
