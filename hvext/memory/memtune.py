"""What a pool entitlement means for a VM on the host (C3, pools that bind): the pure decision.

:mod:`hvext.memory.bind` applies what this module decides. For a running
domain assigned to a pool leaf, given its boot RAM, its balloon actual (its
demand), the tree's *entitlement* (capacity, reservations, limits and
shares), its *limited* entitlement (the same division with the pool limits
alone binding: what the limits leave it, whatever the host's capacity) and
the part of the reservations above it that reaches it
(``demand.reserved_entitlements``: a pool's reservation is shared by its VMs):

* ``hard_limit = entitlement + overhead``: the QEMU process's cgroup may not
  hold more; beyond it the host swaps the guest's pages out (the cgroup's
  ``memory.limit_in_bytes``: libvirt's memtune ``hard_limit``);
* ``soft_limit = min(reservation, entitlement) + overhead``: libvirt's QEMU
  driver has no ``min_guarantee`` (only ESX's has), so the guarantee becomes
  a cgroup v1 soft limit: under host memory pressure the kernel reclaims
  first from the cgroups most above their soft limit, i.e. from VMs above
  their reservation, and a reserved VM's memory up to its reservation is
  taken last. The hard limits of the others, which leave room for every
  reservation (the entitlements always cover ``min(demand, reservation)``),
  are what makes the guarantee firm;
* the balloon target: ``limited`` when the balloon is above it (the guest
  gives its memory back instead of being swapped behind its back), never
  below :data:`hvext.memory.balloon.MIN_TARGET`; the actor also keeps it above
  what the guest can spare (balloon's safe floor). The balloon does not
  follow capacity contention (the hard limit handles that, and the reclaim
  loop): a VM ballooned down stays down, since its demand *is* its balloon.

The **overhead** margin: the QEMU process holds more than guest RAM (its own
heap, device emulation, TCG's translated code, I/O buffers and page cache
charged to its cgroup). A hard limit at guest RAM would make the kernel swap
or OOM-kill QEMU itself, so every limit carries :func:`overhead_mib`: 256 MiB
plus 1/16 of the boot RAM (measured here: a 512 MiB TCG guest's QEMU holds
about 150 MiB beyond the guest's pages after boot).

Sizes are MiB in, KiB out (libvirt's memtune unit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

__all__ = [
    "UNLIMITED_KIB",
    "OVERHEAD_BASE_MIB",
    "MIN_BALLOON_MIB",
    "BindInput",
    "Memtune",
    "Binding",
    "overhead_mib",
    "decide",
    "memtune_changes",
]

#: libvirt's VIR_DOMAIN_MEMORY_PARAM_UNLIMITED (a C macro, absent from libvirt-python): no limit.
UNLIMITED_KIB: Final = 9007199254740991
OVERHEAD_BASE_MIB: Final = 256
OVERHEAD_FRACTION: Final = 16  # plus boot RAM / 16
MIN_BALLOON_MIB: Final = 64  # hvext.memory.balloon.MIN_TARGET


def overhead_mib(boot_mib: int) -> int:
    """QEMU's margin above guest RAM for a guest of *boot_mib* (see the module doc)."""
    return OVERHEAD_BASE_MIB + boot_mib // OVERHEAD_FRACTION


@dataclass(frozen=True)
class BindInput:
    """What the decision needs about one running, assigned domain (MiB)."""

    domain: str
    boot_mib: int
    actual_mib: int  # balloon actual: the domain's demand
    entitlement_mib: int  # capacity, reservations, limits and shares
    limited_mib: int  # limits (and shares within them) alone
    reservation_mib: int  # the part of the reservations that reaches it (demand.reserved_entitlements)


@dataclass(frozen=True)
class Memtune:
    """Memtune values in KiB; :data:`UNLIMITED_KIB` for none."""

    hard_limit_kib: int = UNLIMITED_KIB
    soft_limit_kib: int = UNLIMITED_KIB

    def to_params(self) -> dict[str, int]:
        """libvirt's typed-parameter names (``virDomainSetMemoryParameters``)."""
        return {"hard_limit": self.hard_limit_kib, "soft_limit": self.soft_limit_kib}


@dataclass(frozen=True)
class Binding:
    """The decision for one domain: its memtune and, when the balloon must shrink, its target."""

    domain: str
    memtune: Memtune
    balloon_target_mib: int | None  # None: leave the balloon alone
    overhead_mib: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(item: BindInput, *, overhead: int | None = None) -> Binding:
    """The memtune and balloon target *item*'s pool entitlement means (module doc); *overhead* in MiB."""
    for name in ("boot_mib", "actual_mib", "entitlement_mib", "limited_mib", "reservation_mib"):
        value = getattr(item, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{item.domain}: {name} must be a non-negative whole number of MiB, not {value!r}")
    margin = overhead_mib(item.boot_mib) if overhead is None else overhead
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"overhead must be a non-negative whole number of MiB, not {margin!r}")
    guaranteed = min(item.reservation_mib, item.entitlement_mib)
    memtune = Memtune(hard_limit_kib=(item.entitlement_mib + margin) << 10,
                      soft_limit_kib=(guaranteed + margin) << 10)
    target = None
    reason = (f"entitled to {item.entitlement_mib} MiB of a demand of {item.actual_mib} MiB, "
              f"{guaranteed} MiB of it reserved; +{margin} MiB for QEMU")
    limited = max(item.limited_mib, MIN_BALLOON_MIB)
    if limited < item.actual_mib and limited < item.boot_mib:
        target = limited
        reason += f"; the pool limits leave it {item.limited_mib} MiB: balloon to {limited} MiB"
    return Binding(item.domain, memtune, target, margin, reason)


def memtune_changes(wanted: Memtune, current: Memtune) -> dict[str, int]:
    """The libvirt parameters of *wanted* that differ from *current* (empty: nothing to do).

    libvirt rounds limits to whole pages; values within 4 KiB count as equal.
    """
    now = current.to_params()
    return {key: value for key, value in wanted.to_params().items() if abs(now[key] - value) > 4}
