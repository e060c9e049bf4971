"""Reclaim policy (pure): ballooning or host swapping, per VM, from what is known of it.

Seed 000's memory scheduler: ballooning lets the guest pick the pages it can
spare (free pages, clean page cache, inactive anonymous memory it can swap),
which is cheap when such pages exist; host swapping works without the
guest's help but does not know which pages the guest needs. So:

* the balloon takes at most what the guest can spare, keeping a margin;
* host swapping takes the rest, or everything when the balloon driver does
  not respond;
* guest figures are untrusted: when the agent is missing or its report is
  implausible, the balloon is limited to the balloon driver's own "available"
  figure (also guest-reported, so it can only hurt that guest) and the rest
  is swapped.

Nothing here performs I/O; :func:`decide` is a function of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hvext.errors import UsageError
from hvext.units import MIB
METHODS = ("auto", "balloon", "swap")


@dataclass(frozen=True)
class GuestMemory:
    """Guest memory figures in bytes, from the agent's usage classes (validated)."""

    total: int
    free: int
    clean_cache: int
    anon_inactive: int
    swap_free: int = 0  # guest swap space: inactive anonymous pages can only go there


@dataclass(frozen=True)
class VMState:
    """What the policy knows about one VM."""

    name: str
    actual: int  # balloon actual (bytes of RAM the guest has now)
    balloon_responsive: bool  # the balloon driver updates its statistics
    guest: GuestMemory | None = None  # None: agent missing, unresponsive, or implausible
    balloon_available: int | None = None  # balloon driver's "available memory" statistic
    min_guest_memory: int = 128 * MIB  # never take the guest below this, by any method
    balloon_floor: int = 0  # the balloon driver's own limit (what the guest can give without starving)


@dataclass(frozen=True)
class Decision:
    """How much to reclaim by ballooning and by host swapping, and why."""

    vm: str
    requested: int
    balloon: int
    swap: int
    reason: str
    notes: tuple[str, ...] = field(default=())

    @property
    def method(self) -> str:
        if self.balloon and self.swap:
            return "balloon+swap"
        return "balloon" if self.balloon else "swap" if self.swap else "none"


def margin(total: int) -> int:
    """Memory the balloon leaves to the guest beyond what it reports spare (5 %, at least 32 MiB)."""
    return max(32 * MIB, total // 20)


def balloonable(state: VMState) -> tuple[int, str]:
    """Bytes the balloon can take without pushing the guest into trouble, and the basis for it."""
    floor = max(0, state.actual - max(state.min_guest_memory, state.balloon_floor))
    if state.guest is not None:
        g = state.guest
        spare = g.free + g.clean_cache + min(g.anon_inactive, g.swap_free) - margin(g.total)
        basis = (f"guest can spare {max(0, spare) // MIB} MiB (free {g.free // MIB}, clean cache "
                 f"{g.clean_cache // MIB}, swappable inactive anon {min(g.anon_inactive, g.swap_free) // MIB}, "
                 f"minus margin {margin(g.total) // MIB})")
    elif state.balloon_available is not None:
        spare = state.balloon_available - margin(state.actual)
        basis = (f"agent report unavailable: balloon driver says {state.balloon_available // MIB} MiB available, "
                 f"minus margin {margin(state.actual) // MIB}")
    else:
        return 0, "no trustworthy figure of spare guest memory"
    return max(0, min(spare, floor)), basis


def decide(state: VMState, amount: int, method: str = "auto") -> Decision:
    """Split *amount* bytes of reclaim for *state* between balloon and host swap."""
    if method not in METHODS:
        raise UsageError(f"unknown reclaim method {method!r}: use one of {', '.join(METHODS)}")
    if amount <= 0:
        raise UsageError("the amount to reclaim must be positive")
    if amount > state.actual - state.min_guest_memory:
        raise UsageError(f"cannot reclaim {amount // MIB} MiB from {state.name!r}: it has {state.actual // MIB} MiB "
                         f"and keeps at least {state.min_guest_memory // MIB} MiB")
    if method == "swap":
        return Decision(state.name, amount, 0, amount, "host swapping requested")
    if not state.balloon_responsive:
        if method == "balloon":
            raise UsageError(f"the balloon driver of {state.name!r} does not respond (its statistics are stale); "
                             "use --method swap or auto")
        return Decision(state.name, amount, 0, amount, "balloon driver not responding: host swapping")
    if method == "balloon":
        return Decision(state.name, amount, amount, 0, "ballooning requested")
    spare, basis = balloonable(state)
    by_balloon = min(amount, spare)
    by_swap = amount - by_balloon
    if by_swap == 0:
        reason = f"balloon: {basis}"
    elif by_balloon == 0:
        reason = f"host swap: {basis}"
    else:
        reason = f"balloon {by_balloon // MIB} MiB, host swap {by_swap // MIB} MiB: {basis}"
    return Decision(state.name, amount, by_balloon, by_swap, reason)
