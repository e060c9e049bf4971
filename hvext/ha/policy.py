"""Pure HA decisions beside the actor (hvext.ha.client does the etcd work): which orphaned VMs
this host claims, when it must fence itself, how often it renews its lease.

No I/O here: every input is a value, so each rule is tested alone (tests/unit/test_ha_policy.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

#: Renewals per TTL: a lease of TTL s is renewed every TTL/RENEWALS_PER_TTL s.
RENEWALS_PER_TTL = 3
#: Seconds before the lease could expire at which a host that has not renewed fences itself:
#: the fence (pause, then destroy) must be done before another host may claim its VMs.
DEFAULT_FENCE_MARGIN_S = 1.0
#: The measured latency of the fence's path (hvextd's wake-up, its thread, libvirt's answers) is
#: counted this many times over, plus :data:`FENCE_SLACK_S`: the pause itself is one more libvirt
#: call (and QEMU's answer) than what is measured, and the load that delayed a sample may grow.
FENCE_LATENCY_FACTOR = 2.0
FENCE_SLACK_S = 0.5


def renew_interval(ttl: float) -> float:
    """Seconds between two renewals of a lease of *ttl* s (several tries fit in one TTL)."""
    if ttl <= 0:
        raise ValueError(f"lease TTL must be positive, not {ttl}")
    return ttl / RENEWALS_PER_TTL


class Fence(Enum):
    """What a host does about its VMs, given how long ago its lease was last renewed."""

    RUN = "run"          # renewed recently enough: keep running
    FENCE = "fence"      # the lease may expire before another renewal: stop the protected VMs now


def fence_decision(last_renewal: float, now: float, ttl: float, margin: float = DEFAULT_FENCE_MARGIN_S) -> Fence:
    """FENCE when no renewal succeeded for ``ttl - margin`` s or more (clock: the same monotonic one).

    *last_renewal* is when the last successful renewal was *sent* (not answered): the lease's
    expiry at the server counts from no earlier than that, so fencing by this clock is on the
    safe side. A margin of ttl or more fences at once; a negative margin is refused.
    """
    if ttl <= 0:
        raise ValueError(f"lease TTL must be positive, not {ttl}")
    if margin < 0:
        raise ValueError(f"fence margin must not be negative, not {margin}")
    return Fence.FENCE if now - last_renewal >= ttl - margin else Fence.RUN


def fence_margin(configured: float, latency: float, ttl: float) -> float:
    """The margin the watchdog keeps: the *configured* one, widened when the fence's path was
    measured slow (*latency*: the worst recent round trip, s) so that the pause lands before the
    lease can end, also on a loaded host, but never past half the TTL (the renewals that still fit
    before the fence must be able to keep the lease). A configured margin of *ttl* or more, which
    would fence at once, is taken as half the TTL too.
    """
    if ttl <= 0:
        raise ValueError(f"lease TTL must be positive, not {ttl}")
    if configured < 0 or latency < 0:
        raise ValueError(f"fence margin and latency must not be negative, not {configured}, {latency}")
    if configured >= ttl:
        return ttl / 2
    needed = FENCE_LATENCY_FACTOR * latency + FENCE_SLACK_S
    return max(configured, min(needed, ttl / 2))


@dataclass(frozen=True)
class Orphan:
    """A protected domain whose owner key is gone (its owner's lease ended), and who should claim it."""

    domain: str
    preferred: str       # the live host the rendezvous hash picks: it claims first


def _weight(domain: str, host: str) -> bytes:
    return hashlib.sha256(f"{domain}\0{host}".encode()).digest()


def preferred_host(domain: str, live_hosts: Iterable[str]) -> str | None:
    """Rendezvous hashing: the live host with the highest weight for *domain* (None: no live host).

    Every host computes the same answer from the same host list, so orphans spread over the
    survivors and, usually, only one host claims each; the etcd transaction decides anyway.
    """
    hosts = sorted(set(live_hosts))
    return max(hosts, key=lambda h: _weight(domain, h)) if hosts else None


def orphans(protected: Iterable[str], owners: Mapping[str, str], live_hosts: Iterable[str],
            eligible: Mapping[str, Collection[str]] | None = None) -> list[Orphan]:
    """Protected domains with no owner (key gone), each with the live host that should claim it
    (for a domain in *eligible*: only among those hosts, e.g. a replicated domain's replicas)."""
    live = sorted(set(live_hosts))
    allowed = eligible or {}
    out = []
    for domain in sorted(set(protected)):
        if domain in owners:
            continue
        preferred = preferred_host(domain, [h for h in live if domain not in allowed or h in allowed[domain]])
        if preferred is not None:
            out.append(Orphan(domain, preferred))
    return out


def to_claim(me: str, protected: Iterable[str], owners: Mapping[str, str], live_hosts: Iterable[str],
             orphaned_for: Mapping[str, float] | None = None, grace: float = 0.0,
             eligible: Mapping[str, Collection[str]] | None = None) -> list[str]:
    """The orphaned domains *me* claims now: those it is preferred for, and, once a domain has
    been orphaned for *grace* s or more (its preferred host did not take it), every other one too.
    A domain in *eligible* is claimed only by one of its hosts there (never by another, whatever
    the grace: a replicated domain's PMEM exists only on its replicas, C16).

    *me* must be among *live_hosts* (a host whose own key is gone claims nothing: its lease
    ended, so it may be fenced or partitioned).
    """
    live = set(live_hosts)
    if me not in live:
        return []
    since = orphaned_for or {}
    allowed = eligible or {}
    return [o.domain for o in orphans(protected, owners, live, allowed)
            if (o.domain not in allowed or me in allowed[o.domain])
            and (o.preferred == me or since.get(o.domain, 0.0) >= grace > 0.0)]


def to_adopt(me: str, homes: Mapping[str, str], owners: Mapping[str, str], live_hosts: Iterable[str],
             orphaned_for: Mapping[str, float] | None = None, grace: float = 0.0,
             eligible: Mapping[str, Collection[str]] | None = None) -> list[str]:
    """The protected domains (*homes*: domain -> the host that last ran it) *me* claims now.

    A domain with an owner is left alone. One without: its home claims it while the home is alive
    (right after ``ha protect``, or after the home fenced itself and holds a new lease), so a
    running domain is never started elsewhere while its host lives; once the home is not alive,
    the survivors share it as :func:`to_claim` says (only *eligible* hosts, for a domain there).
    *me* must be alive to claim anything.
    """
    live = set(live_hosts)
    if me not in live:
        return []
    unowned = {d: h for d, h in homes.items() if d not in owners}
    mine = [d for d, h in unowned.items() if h == me]
    orphaned = [d for d, h in unowned.items() if h not in live]
    return sorted(mine + to_claim(me, orphaned, owners, live, orphaned_for, grace, eligible))
