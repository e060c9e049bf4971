"""The swap reservation's accounting (C6): how many blocks the host's thick reservation file should hold.

Pure: :mod:`hvext.memory.swapfile` reads the allocations and makes the
moves. One thick reservation file per host (its apparent size is the
*total*) and the thin per-VM files that hold guest RAM share a file system.
As a VM's file grows (the host writes reclaimed guest pages to it), the
reservation gives back as many blocks (``FALLOC_FL_PUNCH_HOLE``); when a
VM's file goes away (the domain stopped, libvirt removed it) the reservation
takes them again (``fallocate``). So, after each rebalance::

    reservation allocated + sum(VM files allocated) == total

as long as the VMs hold less than the total; beyond it the reservation is
empty and the excess is a *shortfall* (reported, never hidden). The rest of
the file system sees a constant use: the VMs' swap space was set aside when
the reservation was made, not taken from whoever needs disk later.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Balance", "Move", "balance", "plan", "align_down"]


def align_down(value: int, block: int) -> int:
    """*value* rounded down to a multiple of *block*."""
    return value - value % block


def _bytes(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative whole number of bytes, not {value!r}")
    return value


@dataclass(frozen=True)
class Balance:
    """The reservation and the VM files' allocations, in bytes, at one moment."""

    total: int  # the reservation file's apparent size: what the host set aside
    reservation: int  # blocks the reservation file holds now
    vms: Mapping[str, int] = field(default_factory=dict)  # each VM file's allocated bytes

    @property
    def vm_sum(self) -> int:
        return sum(self.vms.values())

    @property
    def held(self) -> int:
        """Reservation plus VM files: equals *total* when conserved."""
        return self.reservation + self.vm_sum

    @property
    def drift(self) -> int:
        """``held - total``: 0 when conserved; positive while VMs grew since the last rebalance."""
        return self.held - self.total

    @property
    def shortfall(self) -> int:
        """What the VMs hold beyond the total (the reservation cannot cover it)."""
        return max(0, self.vm_sum - self.total)

    @property
    def conserved(self) -> bool:
        """The sum is the total (or the reservation is empty and the VMs hold more: a shortfall)."""
        return self.drift == 0 or (self.reservation == 0 and self.shortfall > 0)

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total, "reservation_bytes": self.reservation, "vm_bytes": dict(self.vms),
                "vm_sum_bytes": self.vm_sum, "held_bytes": self.held, "drift_bytes": self.drift,
                "shortfall_bytes": self.shortfall, "conserved": self.conserved}


def balance(total: int, reservation: int, vms: Mapping[str, int]) -> Balance:
    """A validated :class:`Balance` (ValueError on negative or non-integer figures)."""
    checked = {str(name): _bytes(f"allocation of {name}", size) for name, size in vms.items()}
    return Balance(_bytes("total", total), _bytes("reservation", reservation), checked)


@dataclass(frozen=True)
class Move:
    """What a rebalance does to the reservation file: punch or refill, never both."""

    punch: int  # bytes to release (the VMs grew)
    refill: int  # bytes to allocate again (VM files shrank or went away)
    target: int  # the reservation's allocation afterwards
    shortfall: int  # what the VMs hold beyond the total

    @property
    def idle(self) -> bool:
        return self.punch == 0 and self.refill == 0


def plan(now: Balance, block: int) -> Move:
    """The move that makes ``reservation + sum(VMs) == total`` again (whole *block*s; the reservation >= 0).

    VM allocations are whole blocks of the same file system, so the target
    is exact; a total that is not a multiple of *block* is rounded down.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive number of bytes, not {block!r}")
    target = align_down(max(0, now.total - now.vm_sum), block)
    target = min(target, align_down(now.total, block))
    delta = target - now.reservation
    return Move(punch=max(0, -delta), refill=max(0, delta), target=target, shortfall=now.shortfall)
