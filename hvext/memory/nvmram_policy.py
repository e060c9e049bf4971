"""When to grow and shrink VMs' NVM-backed RAM (C8), pure: a function of host and tier figures.

* The host's available memory below its floor: give VMs memory from the NVM
  tier (their virtio-mem grows; the reclaim loop takes DRAM back by the
  balloon or host swap in the same round), at most ``step`` per VM per round,
  only while the tier keeps ``nvm_free_high`` free after the growth.
* The tier's free space below ``nvm_free_min``: take NVM RAM back (largest
  first, ``step`` per VM) until the tier would have ``nvm_free_high`` free.
* Between the two watermarks nothing moves either way (hysteresis): a tier
  that was just relieved is not filled again at once, and a host that just
  recovered does not make VMs give the memory back (only the tier's
  shortage does).
* A VM whose guest has not yet plugged what was last requested is left
  alone: its previous change is still under way (or the guest refuses it).

Nothing here performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from hvext.errors import UsageError
from hvext.units import MIB


@dataclass(frozen=True)
class Thresholds:
    """The watermarks and the step, in bytes."""

    host_available_min: int
    nvm_free_min: int
    nvm_free_high: int
    step: int

    def __post_init__(self) -> None:
        if not 0 <= self.nvm_free_min <= self.nvm_free_high:
            raise UsageError("the NVM tier's high watermark must not lie below its minimum")
        if self.step <= 0:
            raise UsageError("the NVM RAM step must be positive")


@dataclass(frozen=True)
class VMNvmRam:
    """One running VM's NVM RAM device."""

    name: str
    size: int  # the most the device can plug
    requested: int
    current: int | None  # what the guest has plugged (None: not known)
    block_size: int


@dataclass(frozen=True)
class Change:
    """A new requested size for one VM, and why."""

    vm: str
    requested_before: int
    requested: int
    reason: str

    @property
    def delta(self) -> int:
        return self.requested - self.requested_before


@dataclass(frozen=True)
class Plan:
    """What to change this round, and why (also when nothing changes)."""

    changes: tuple[Change, ...]
    reason: str


def _down(value: int, block: int) -> int:
    return value // block * block


def _up(value: int, block: int) -> int:
    return -(-value // block) * block


def _settled(vm: VMNvmRam) -> bool:
    return vm.current is not None and vm.current == vm.requested


def decide(host_available: int, nvm_free: int, vms: list[VMNvmRam], limits: Thresholds) -> Plan:
    """The plan for one round (VMs in the caller's order of preference for growing)."""
    mib = f"host available {host_available // MIB} MiB (floor {limits.host_available_min // MIB}), NVM tier free " \
          f"{nvm_free // MIB} MiB (min {limits.nvm_free_min // MIB}, high {limits.nvm_free_high // MIB})"
    if nvm_free < limits.nvm_free_min:
        need = limits.nvm_free_high - nvm_free
        changes = []
        for vm in sorted(vms, key=lambda v: v.requested, reverse=True):
            if need <= 0:
                break
            if not _settled(vm):
                continue
            take = min(vm.requested, _up(min(need, limits.step), vm.block_size))
            if take <= 0:
                continue
            changes.append(Change(vm.name, vm.requested, vm.requested - take,
                                  f"NVM tier short: {mib}; giving back {take // MIB} MiB"))
            need -= take
        if not changes:
            return Plan((), f"NVM tier short but no VM has settled NVM RAM to give back: {mib}")
        return Plan(tuple(changes), f"NVM tier short: {mib}")
    if host_available < limits.host_available_min:
        room = nvm_free - limits.nvm_free_high
        if room <= 0:
            return Plan((), f"host short but the NVM tier is at or below its high watermark, not growing: {mib}")
        need = limits.host_available_min - host_available
        changes = []
        for vm in vms:
            if need <= 0 or room <= 0:
                break
            if not _settled(vm):
                continue
            give = _down(min(_up(need, vm.block_size), limits.step, vm.size - vm.requested, room), vm.block_size)
            if give <= 0:
                continue
            changes.append(Change(vm.name, vm.requested, vm.requested + give,
                                  f"host short: {mib}; adding {give // MIB} MiB of NVM RAM"))
            need -= give
            room -= give
        if not changes:
            return Plan((), f"host short but no VM can take more NVM RAM now: {mib}")
        return Plan(tuple(changes), f"host short: {mib}")
    return Plan((), f"nothing to do: {mib}")


__all__ = ["Change", "Plan", "Thresholds", "VMNvmRam", "decide"]
