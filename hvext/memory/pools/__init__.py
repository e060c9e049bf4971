"""Hierarchical resource tree (C3): memory pools and VM leaves (``docs/pools.md``).

The package's parts:

* :mod:`~hvext.memory.pools.errors`: the errors, all :class:`PoolError`;
* :mod:`~hvext.memory.pools.validate`: checks of sizes, shares, flags, domain names and paths;
* :mod:`~hvext.memory.pools.node`: a node's values and the immutable :class:`PoolNode` view;
* :mod:`~hvext.memory.pools.lock`: the readers-writer lock and the per-operation lock set;
* :mod:`~hvext.memory.pools.tree`: :class:`ResourceTree`, its rules and locking protocol;
* :mod:`~hvext.memory.pools.entitlement`: the pure top-down division of the capacity;
* :mod:`~hvext.memory.pools.store`: :class:`PoolStore`, SQLite persistence.

This module re-exports the public API, so ``from hvext.memory.pools import ResourceTree, PoolStore`` works.
"""

from __future__ import annotations

from hvext.memory.pools.entitlement import compute_allocations, share_out
from hvext.memory.pools.errors import (
    AssignmentError,
    ConsistencyError,
    InvalidPathError,
    InvalidValueError,
    PoolError,
    PoolExistsError,
    PoolLockError,
    PoolNotEmptyError,
    PoolNotFoundError,
    PoolStoreError,
    PoolUsageError,
    StaleStoreError,
)
from hvext.memory.pools.node import PoolNode
from hvext.memory.pools.store import DEFAULT_DB_PATH, ENV_DB_PATH, PoolStore, default_db_path
from hvext.memory.pools.tree import (
    RULE_CACHE,
    RULE_CHILDREN,
    RULE_LIMIT,
    RULE_PARENT_LIMIT,
    UNSET,
    ResourceTree,
    check_consistency,
)
from hvext.memory.pools.validate import DEFAULT_SHARES, ROOT, check_domain_name, normalize_path

__all__ = [
    "ROOT",
    "DEFAULT_SHARES",
    "RULE_LIMIT",
    "RULE_PARENT_LIMIT",
    "RULE_CHILDREN",
    "RULE_CACHE",
    "UNSET",
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
    "PoolNode",
    "ResourceTree",
    "PoolStore",
    "DEFAULT_DB_PATH",
    "ENV_DB_PATH",
    "default_db_path",
    "check_consistency",
    "check_domain_name",
    "normalize_path",
    "compute_allocations",
    "share_out",
]
