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

:func:`mom_step` is the baseline the reclaim benchmark compares against: a
balloon-only controller with oVirt MOM's rules.

Nothing here performs I/O; :func:`decide` and :func:`mom_step` are functions of their inputs.
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


#: oVirt MOM's balloon rules (its default ``balloon.rules``): the host is under pressure
#: below 20 % free; a guest keeps 20 % of its memory free; a balloon moves at most 5 %
#: of the guest's memory per policy interval, and not at all for changes under 0.25 %.
MOM_PRESSURE_THRESHOLD = 0.20
MOM_GUEST_FREE_FRACTION = 0.20
MOM_MAX_CHANGE_FRACTION = 0.05
MOM_MIN_CHANGE_FRACTION = 0.0025


def mom_step(host_free_fraction: float, actual: int, maximum: int, guest_free: int) -> int | None:
    """One interval of a MOM-like balloon-only controller: the new balloon target in bytes, or None (no change).

    Under host pressure (*host_free_fraction* below 20 %) the guest shrinks by at
    most 5 % of *actual*, but never below what it uses (``actual - guest_free``)
    plus 20 % of *actual* free; otherwise a ballooned guest grows by at most 5 %
    back towards *maximum*, at least to what it uses plus 20 % of *maximum*.
    Changes under 0.25 % of *actual* are skipped. *guest_free* is the guest's own
    unused-memory figure (MOM reads the balloon driver's ``unused``, MemFree:
    page cache does not count as free), untrusted and clamped to [0, actual].

    Left out of MOM's rules on purpose: scaling the kept free fraction down with
    the host's free fraction and forcing guest swap below 5 % host free (the
    baseline keeps the plain 20 %).
    """
    if actual <= 0 or maximum <= 0:
        raise UsageError("balloon actual and maximum must be positive")
    used = actual - max(0, min(guest_free, actual))
    if host_free_fraction < MOM_PRESSURE_THRESHOLD:
        target = max(int(actual * (1 - MOM_MAX_CHANGE_FRACTION)), used + int(actual * MOM_GUEST_FREE_FRACTION))
        if target >= actual:
            return None
    else:
        if actual >= maximum:
            return None
        target = min(maximum, max(int(actual * (1 + MOM_MAX_CHANGE_FRACTION)),
                                  used + int(maximum * MOM_GUEST_FREE_FRACTION)))
    return target if abs(target - actual) > actual * MOM_MIN_CHANGE_FRACTION else None
