"""Migration policy (pure): which QEMU features to use, and when to switch to post-copy.

Pre-copy converges when the guest dirties memory clearly slower than the link
sends it; the closer the dirty rate comes to the bandwidth, the more it needs
help: XBZRLE (sends deltas of re-dirtied pages) and auto-converge (throttles
the vCPUs). At or above the bandwidth only post-copy finishes in bounded time:
the guest moves and pulls the rest on demand. Multifd uses several streams,
which only pays when nothing caps the bandwidth; QEMU 7.2 cannot combine it
with post-copy.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
LOW, HIGH = 0.3, 0.8  # dirty rate / bandwidth thresholds


@dataclass(frozen=True)
class Plan:
    policy: str
    downtime_ms: int
    bandwidth_mib: int | None  # the cap, or None
    auto_converge: bool = False
    xbzrle_cache: int = 0  # bytes; 0 = no XBZRLE
    multifd_channels: int = 0
    postcopy: bool = False  # enable the capability (switch decided by adapt())
    time_budget_s: float = 120.0
    reason: str = ""


@dataclass(frozen=True)
class Progress:
    """One sample of a running migration (from libvirt's job statistics)."""

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
                    + (", multifd (no cap)" if channels else ", post-copy as a safety net"))
    cache = min(max(64 * MIB, ram // 4), 1024 * MIB)
    if ratio < HIGH:
        return Plan("auto", downtime_ms, bandwidth_cap_mib, auto_converge=True, xbzrle_cache=cache, postcopy=True,
                    time_budget_s=budget, reason=f"{base}: XBZRLE and auto-converge, post-copy if it stalls")
    return Plan("auto", downtime_ms, bandwidth_cap_mib, auto_converge=True, xbzrle_cache=cache, postcopy=True,
                time_budget_s=budget, reason=f"{base}: pre-copy cannot converge, switch to post-copy after a pass")


def should_switch_to_postcopy(p: Plan, history: list[Progress]) -> str:
    """Why to switch now (a non-empty reason), or "" to keep pre-copying."""
    if not p.postcopy or not history:
        return ""
    now = history[-1]
    if now.iteration < 2:
        return ""  # let one full pass go first: post-copy then pulls only what was dirtied since
    if now.elapsed_s > p.time_budget_s * 0.5:
        return f"pre-copy has not finished after {now.elapsed_s:.0f} s"
    if now.expected_downtime_ms <= p.downtime_ms:
        return ""
    if now.dirty_rate >= now.bps > 0:
        return f"guest dirties {now.dirty_rate / MIB:.0f} MiB/s, link sends {now.bps / MIB:.0f} MiB/s"
    same_pass = [h for h in history if h.iteration >= now.iteration - 2]
    if now.iteration >= 4 and min(h.remaining for h in same_pass) >= 0.9 * max(h.remaining for h in same_pass):
        return f"remaining RAM stopped shrinking ({now.remaining / MIB:.0f} MiB after {now.iteration} passes)"
    return ""
