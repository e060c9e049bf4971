"""The resource tree's errors: every one is a :class:`PoolError` (an ``HvextError``)."""

from __future__ import annotations

from collections.abc import Iterable

from hvext.errors import HvextError, UsageError

__all__ = [
    "PoolError",
    "PoolUsageError",
    "InvalidPathError",
    "InvalidValueError",
    "PoolNotFoundError",
    "PoolExistsError",
    "PoolNotEmptyError",
    "AssignmentError",
    "ConsistencyError",
    "PoolLockError",
    "PoolStoreError",
    "StaleStoreError",
]


class PoolError(HvextError):
    """Root of the resource tree's errors."""


class PoolUsageError(PoolError, UsageError):
    """A request the tree refuses because of what was asked (not a host failure)."""


class InvalidPathError(PoolUsageError, ValueError):
    """A pool path that is not absolute, canonical and made of valid names."""


class InvalidValueError(PoolUsageError, ValueError):
    """A reservation, limit, shares, capacity, demand or flag of the wrong type or range."""


class PoolNotFoundError(PoolUsageError, LookupError):
    """No pool (or VM leaf) at that path."""


class PoolExistsError(PoolUsageError):
    """A pool with that path already exists."""


class PoolNotEmptyError(PoolUsageError):
    """Removing a pool that still has children without ``recursive=True``."""


class AssignmentError(PoolUsageError):
    """A domain cannot be assigned to / unassigned from that node."""


class ConsistencyError(PoolUsageError):
    """A modification would break the tree's structural consistency.

    ``rule`` is one of the ``RULE_*`` names and ``nodes`` the paths involved;
    both are also in the message.
    """

    def __init__(self, rule: str, nodes: Iterable[str], detail: str) -> None:
        self.rule = rule
        self.nodes: tuple[str, ...] = tuple(dict.fromkeys(nodes))
        self.detail = detail
        super().__init__(f"{detail} [rule {rule}; nodes {', '.join(self.nodes)}]")


class PoolLockError(PoolError, RuntimeError):
    """The tree was used in a way that would deadlock (from inside ``locked_subtree``)."""


class PoolStoreError(PoolError):
    """The SQLite store failed or holds something unusable; the tree is unchanged."""


class StaleStoreError(PoolStoreError):
    """The store was changed by another tree or process since this tree was loaded."""
