"""Hierarchical resource tree (C3): memory pools and VM leaves.

The host ("/") owns ``capacity_mib`` of memory.  Pools and VMs form a tree
below it; each node has a *reservation* (guaranteed MiB), an optional
*limit* (MiB it may never exceed), *shares* (its weight against its siblings)
and an *expandable* flag (vSphere's "expandable reservation": the node may
borrow reservation from its parent for its children).  VMs are leaves with a
libvirt domain name assigned to them.

Structural consistency (checked on every modification; rule names appear in
:class:`ConsistencyError`):

* ``reservation-within-limit``: a node's effective reservation (hence its
  reservation) never exceeds its limit, when it has one.
* ``reservation-within-parent-limit``: a child's reservation never exceeds its
  parent's limit (the root's limit is the capacity).
* ``children-within-reservation``: every non-expandable node, and the root
  (whose reservation is the capacity), holds the sum of its children's
  effective reservations.  An expandable node's effective reservation is
  ``max(reservation, sum of its children's effective reservations)``, so its
  children's needs flow up to the nearest non-expandable ancestor.

A modification follows the memory-scheduler protocol of seed 000: lock the
node, build a *working value*, check the tree's structural consistency with
it, then replace the value (persisting it first when the tree has a store) or
raise :class:`ConsistencyError` and leave no trace.

Locking protocol (see ``docs/pools.md`` for the argument)
----------------------------------------------------------
Every node has two locks: ``lock``, a readers-writer lock guarding its value,
its children set and its domain; and ``budget``, a mutex guarding its cached
``child_sum`` (the sum of its children's effective reservations).

* An operation on node N takes ``lock`` on every node from the root down to N,
  top-down while it resolves the path (lock coupling: a child is looked up only
  while its parent's lock is held, so the answer is definitive).  N is taken
  exclusively; so is N's parent when the operation adds or removes a child;
  every other ancestor is taken shared.  Since any operation inside a subtree
  holds at least a shared lock on the subtree's root, an exclusive lock on a
  node excludes everything inside its subtree and nothing else.
* Then, if the operation can change N's effective reservation, it takes the
  ``budget`` mutex of each ancestor on N's *accounting chain*, top-down: N's
  parent and further ancestors while they are expandable, up to and including
  the first non-expandable one (or the root).  Those are exactly the nodes whose
  ``child_sum`` the change touches and whose rules it must re-check.
* Innermost come the domain-index mutex and the store's mutex.

All locks are taken in one global order (kind: node locks, budgets, domain
index, store; then depth; then path) and held until the operation ends, so
there is no deadlock and the schedule is serialisable (conservative two-phase
locking).  Modifications in different subtrees share only shared locks on
their common ancestors, plus a budget mutex when both change reservations that
are accounted against the same non-expandable ancestor, where serialising is
necessary.  Readers that need the whole tree (``snapshot``, ``walk``,
``entitlements``, ``to_dict``, ``validate``) take every node lock shared,
breadth-first in path order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from hvext.memory.pools.entitlement import compute_allocations
from hvext.memory.pools.errors import (
    AssignmentError,
    ConsistencyError,
    InvalidPathError,
    InvalidValueError,
    PoolExistsError,
    PoolLockError,
    PoolNotEmptyError,
    PoolNotFoundError,
)
from hvext.memory.pools.lock import Held, RWLock
from hvext.memory.pools.node import NodeValue, PoolNode
from hvext.memory.pools.validate import (
    DEFAULT_SHARES,
    ROOT,
    check_domain_name,
    check_flag,
    check_limit,
    check_mib,
    check_shares,
    normalize_path,
    path_depth,
    split_path,
)

if TYPE_CHECKING:
    from hvext.memory.pools.store import Binding, PoolStore

__all__ = [
    "RULE_LIMIT",
    "RULE_PARENT_LIMIT",
    "RULE_CHILDREN",
    "RULE_CACHE",
    "UNSET",
    "ResourceTree",
    "check_consistency",
]

RULE_LIMIT: Final = "reservation-within-limit"
RULE_PARENT_LIMIT: Final = "reservation-within-parent-limit"
RULE_CHILDREN: Final = "children-within-reservation"
RULE_CACHE: Final = "effective-reservation-cache"


class _Node:
    """A live node; its fields are read and written only under the protocol's locks."""

    __slots__ = ("path", "depth", "parent", "children", "value", "domain", "child_sum", "lock", "budget")

    def __init__(self, path: str, parent: _Node | None, value: NodeValue, domain: str | None = None) -> None:
        self.path = path
        self.depth = path_depth(path)
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.value = value
        self.domain = domain
        self.child_sum = 0  # sum of the children's effective reservations (cache)
        self.lock = RWLock()
        self.budget = threading.Lock()

    @property
    def effective(self) -> int:
        return _effective(self.value, self.child_sum)

    def is_accounting(self) -> bool:
        """True where children's reservations stop flowing up (non-expandable or root)."""
        return self.parent is None or not self.value.expandable


def _effective(value: NodeValue, child_sum: int) -> int:
    return max(value.reservation_mib, child_sum) if value.expandable else value.reservation_mib


class _Unset:
    """Sentinel type for 'parameter not given' (None is a valid limit)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


# --------------------------------------------------------------------------- tree


class ResourceTree:
    """A thread-safe tree of memory pools and VM leaves under a host of ``capacity_mib``.

    Build it empty with ``ResourceTree(capacity_mib=...)`` (in memory only), or
    get a persisted one from :meth:`hvext.memory.pools.store.PoolStore.load`;
    then every committed modification is written to SQLite first, in one
    transaction, and applied in memory only if that succeeded.
    """

    def __init__(self, capacity_mib: int) -> None:
        capacity = check_mib("capacity_mib", capacity_mib)
        self._root = _Node(ROOT, None, NodeValue(capacity, capacity, DEFAULT_SHARES, False))
        self._domains: dict[str, str] = {}  # domain -> leaf path
        self._domains_lock = threading.Lock()
        self._binding: Binding | None = None
        self._local = threading.local()
        # Test hook: called as hook(operation, path) once an operation holds all
        # its locks and has passed its checks, just before it commits.
        self._after_lock: Callable[[str, str], None] | None = None

    # ---------------------------------------------------------------- plumbing

    def __repr__(self) -> str:
        return f"ResourceTree(capacity_mib={self.capacity_mib})"

    @property
    def capacity_mib(self) -> int:
        """The host memory the root divides (its reservation and limit)."""
        return self._root.value.reservation_mib

    @property
    def store(self) -> PoolStore | None:
        """The store this tree persists to, None for an in-memory tree."""
        return self._binding.store if self._binding is not None else None

    def _guard(self) -> None:
        if getattr(self._local, "holding", False):
            raise PoolLockError(
                "this thread holds locked_subtree(); using the tree from inside it would deadlock"
            )

    def _hook(self, operation: str, path: str) -> None:
        if self._after_lock is not None:
            self._after_lock(operation, path)

    def _lock_path(self, held: Held, path: str, *, write_from: int) -> list[_Node]:
        """Lock root..path top-down (exclusive from depth *write_from*, shared above).

        Returns the nodes root first.  Each child is looked up while its parent's
        lock is held, so a missing name is definitive.
        """
        node = self._root
        (held.write if write_from <= 0 else held.read)(node.lock)
        nodes = [node]
        if path == ROOT:
            return nodes
        for depth, name in enumerate(path[1:].split("/"), start=1):
            child = node.children.get(name)
            if child is None:
                raise PoolNotFoundError(f"no pool {path!r}: {node.path!r} has no child {name!r}")
            (held.write if depth >= write_from else held.read)(child.lock)
            nodes.append(child)
            node = child
        return nodes

    @staticmethod
    def _lock_budgets(held: Held, parent: _Node) -> None:
        """Take the budget mutexes of *parent*'s accounting chain, top-down."""
        chain = [parent]
        while not chain[-1].is_accounting():
            assert chain[-1].parent is not None
            chain.append(chain[-1].parent)
        for node in reversed(chain):
            held.mutex(node.budget)

    @staticmethod
    def _view(node: _Node) -> PoolNode:
        """Snapshot one node; caller holds its lock (and its budget, or an exclusive lock)."""
        return PoolNode(
            path=node.path,
            reservation_mib=node.value.reservation_mib,
            limit_mib=node.value.limit_mib,
            shares=node.value.shares,
            expandable=node.value.expandable,
            children=tuple(sorted(c.path for c in node.children.values())),
            effective_reservation_mib=node.effective,
            domain=node.domain,
        )

    # ---------------------------------------------------------------- checks

    @staticmethod
    def _check_node(
        path: str,
        parent: tuple[str, int | None] | None,
        working: NodeValue,
        child_sum: int,
        children: Sequence[tuple[str, int]],
    ) -> int:
        """Check the rules that involve the node itself; return its working effective reservation.

        *parent* is ``(path, limit)`` (None for the root), *children* are
        ``(path, reservation)`` pairs and *child_sum* their effective total.
        """
        eff = _effective(working, child_sum)
        limit = working.limit_mib
        if limit is not None:
            if working.reservation_mib > limit:
                raise ConsistencyError(
                    RULE_LIMIT, [path],
                    f"{path}: reservation {working.reservation_mib} MiB exceeds its limit {limit} MiB",
                )
            if eff > limit:
                raise ConsistencyError(
                    RULE_LIMIT, [path, *(c for c, _ in children)],
                    f"{path}: effective reservation {eff} MiB (expandable; its children reserve "
                    f"{child_sum} MiB) exceeds its limit {limit} MiB",
                )
            for child, reservation in children:
                if reservation > limit:
                    raise ConsistencyError(
                        RULE_PARENT_LIMIT, [path, child],
                        f"{child}: reservation {reservation} MiB exceeds its parent {path}'s limit {limit} MiB",
                    )
        if parent is not None:
            parent_path, parent_limit = parent
            if parent_limit is not None and working.reservation_mib > parent_limit:
                raise ConsistencyError(
                    RULE_PARENT_LIMIT, [parent_path, path],
                    f"{path}: reservation {working.reservation_mib} MiB exceeds its parent "
                    f"{parent_path}'s limit {parent_limit} MiB",
                )
        if not working.expandable and child_sum > working.reservation_mib:
            what = "the host has" if parent is None else "it is not expandable and reserves"
            raise ConsistencyError(
                RULE_CHILDREN, [path, *(c for c, _ in children)],
                f"{path}: its children reserve {child_sum} MiB but {what} only "
                f"{working.reservation_mib} MiB",
            )
        return eff

    @staticmethod
    def _propagate(path: str, parent: _Node, delta: int) -> list[tuple[_Node, int]]:
        """Carry a change of *path*'s effective reservation up its accounting chain.

        Returns the ``(node, new child_sum)`` updates to apply on commit; raises
        ConsistencyError when an ancestor can no longer hold its children.
        Caller holds the chain's budgets.
        """
        updates: list[tuple[_Node, int]] = []
        via = [path]
        node: _Node | None = parent
        while node is not None and delta:
            new_sum = node.child_sum + delta
            updates.append((node, new_sum))
            value = node.value
            if node.is_accounting():
                if delta > 0 and new_sum > value.reservation_mib:
                    what = "the host has" if node.parent is None else "it reserves"
                    raise ConsistencyError(
                        RULE_CHILDREN, [node.path, *reversed(via)],
                        f"{node.path}: its children would reserve {new_sum} MiB "
                        f"(through {' <- '.join(reversed(via))}) but {what} only "
                        f"{value.reservation_mib} MiB",
                    )
                break
            old_eff = _effective(value, node.child_sum)
            new_eff = _effective(value, new_sum)
            if value.limit_mib is not None and new_eff > value.limit_mib:
                raise ConsistencyError(
                    RULE_LIMIT, [node.path, *reversed(via)],
                    f"{node.path}: expandable, its effective reservation would grow to {new_eff} MiB "
                    f"(through {' <- '.join(reversed(via))}) beyond its limit {value.limit_mib} MiB",
                )
            delta = new_eff - old_eff
            via.append(node.path)
            node = node.parent
        return updates

    # ---------------------------------------------------------------- reads

    def get(self, path: str) -> PoolNode:
        """Return a snapshot of the node at *path*."""
        self._guard()
        path = normalize_path(path)
        with Held() as held:
            node = self._lock_path(held, path, write_from=1 << 30)[-1]
            held.mutex(node.budget)
            return self._view(node)

    def exists(self, path: str) -> bool:
        """True when a node exists at *path* (which must be a valid path)."""
        try:
            self.get(path)
        except PoolNotFoundError:
            return False
        return True

    def snapshot(self) -> dict[str, PoolNode]:
        """A consistent view of the whole tree, in pre-order (root first, children by name)."""
        self._guard()
        with Held() as held:
            held.read(self._root.lock)
            level = [self._root]
            while level:
                level = sorted((c for n in level for c in n.children.values()), key=lambda n: n.path)
                for node in level:
                    held.read(node.lock)
            out: dict[str, PoolNode] = {}
            stack = [self._root]
            while stack:
                node = stack.pop()
                out[node.path] = self._view(node)
                stack.extend(node.children[name] for name in sorted(node.children, reverse=True))
            return out

    def walk(self, path: str = ROOT) -> Iterator[PoolNode]:
        """The subtree at *path* in pre-order, from one consistent snapshot (errors raise at once)."""
        path = normalize_path(path)
        nodes = self.snapshot()
        if path not in nodes:
            raise PoolNotFoundError(f"no pool {path!r}")
        prefix = path if path == ROOT else path + "/"
        return iter([n for n in nodes.values() if n.path == path or n.path.startswith(prefix)])

    def leaves(self) -> list[str]:
        """Paths of all leaves (non-root nodes without children), in pre-order."""
        return [n.path for n in self.snapshot().values() if n.is_leaf]

    def validate(self) -> None:
        """Re-check every rule on a consistent snapshot; raise ConsistencyError if broken.

        The tree never commits an inconsistent state, so this is for tests,
        loading and paranoia; it recomputes effective reservations from scratch
        and also verifies the cached ones.
        """
        check_consistency(self.snapshot(), check_cache=True)

    def entitlements(self, demands: Mapping[str, int], *, all_nodes: bool = False) -> dict[str, int]:
        """Divide the capacity top-down by reservation, limit and shares; MiB per leaf.

        *demands* maps leaf paths to the MiB each wants (missing leaves want 0).
        Every leaf gets at least ``min(demand, reservation)``, at most
        ``min(demand, limit)``; what is left at each pool is shared among its
        children in proportion to their shares, max-min fair and capped by their
        (limit-capped) demand, so capacity is handed out as long as some demand
        is unmet and no limit stops it.  With ``all_nodes`` pools (and the root)
        are included.  See :mod:`hvext.memory.pools.entitlement`.
        """
        nodes = self.snapshot()
        wanted = self._check_demands(nodes, demands)
        alloc = compute_allocations(nodes, wanted)
        if all_nodes:
            return alloc
        return {p: a for p, a in alloc.items() if nodes[p].is_leaf}

    @staticmethod
    def _check_demands(nodes: Mapping[str, PoolNode], demands: Mapping[str, int]) -> dict[str, int]:
        if not isinstance(demands, Mapping):
            raise InvalidValueError(f"demands must be a mapping of leaf path to MiB, not {demands!r}")
        wanted: dict[str, int] = {}
        for raw, mib in demands.items():
            path = normalize_path(raw)
            node = nodes.get(path)
            if node is None:
                raise PoolNotFoundError(f"demand for unknown pool {path!r}")
            if not node.is_leaf:
                raise InvalidValueError(f"demand for {path!r}, which is not a leaf (demands belong to leaves)")
            if path in wanted:
                raise InvalidValueError(f"two demands for {path!r}")
            wanted[path] = check_mib(f"demand for {path}", mib)
        return wanted

    def to_dict(self, demands: Mapping[str, int] | None = None) -> dict[str, Any]:
        """The tree as nested plain data (for ``pool-list`` and JSON output).

        Each node is :meth:`PoolNode.to_dict` with ``children`` replaced by the
        nested children; with *demands*, each also has ``entitlement_mib``.
        """
        nodes = self.snapshot()
        alloc = compute_allocations(nodes, self._check_demands(nodes, demands)) if demands is not None else None

        def build(path: str) -> dict[str, Any]:
            node = nodes[path]
            data = node.to_dict()
            if alloc is not None:
                data["entitlement_mib"] = alloc[path]
            data["children"] = [build(c) for c in node.children]
            return data

        return build(ROOT)

    # ---------------------------------------------------------------- modifications

    def create(
        self,
        path: str,
        *,
        reservation_mib: int = 0,
        limit_mib: int | None = None,
        shares: int = DEFAULT_SHARES,
        expandable: bool = False,
        domain: str | None = None,
    ) -> PoolNode:
        """Create a pool (or, with *domain*, a VM leaf) under an existing parent.

        Raises PoolExistsError, PoolNotFoundError (no parent), InvalidValueError,
        AssignmentError (parent is a VM leaf, or *domain* is taken) or
        ConsistencyError; on any error nothing changed.
        """
        self._guard()
        path = normalize_path(path)
        if path == ROOT:
            raise PoolExistsError("the root '/' always exists (it is the host)")
        working = NodeValue(
            reservation_mib=check_mib("reservation_mib", reservation_mib),
            limit_mib=check_limit("limit_mib", limit_mib),
            shares=check_shares(shares),
            expandable=check_flag(expandable),
        )
        if domain is not None:
            domain = check_domain_name(domain)
        parent_path, name = split_path(path)
        with Held() as held:
            parent = self._lock_path(held, parent_path, write_from=path_depth(parent_path))[-1]
            if name in parent.children:
                raise PoolExistsError(f"pool {path!r} already exists")
            if parent.domain is not None:
                raise AssignmentError(
                    f"{parent.path!r} is the leaf of domain {parent.domain!r}; a VM node cannot have children"
                )
            self._lock_budgets(held, parent)
            eff = self._check_node(path, (parent.path, parent.value.limit_mib), working, 0, ())
            updates = self._propagate(path, parent, eff)
            if domain is not None:
                held.mutex(self._domains_lock)
                if domain in self._domains:
                    raise AssignmentError(f"domain {domain!r} is already assigned to {self._domains[domain]!r}")
            self._hook("create", path)
            if self._binding is not None:
                self._binding.insert(path, working, domain)
            node = _Node(path, parent, working, domain)
            parent.children[name] = node
            for anc, new_sum in updates:
                anc.child_sum = new_sum
            if domain is not None:
                self._domains[domain] = path
            return self._view(node)

    def modify(
        self,
        path: str,
        *,
        reservation_mib: int | _Unset = UNSET,
        limit_mib: int | None | _Unset = UNSET,
        shares: int | _Unset = UNSET,
        expandable: bool | _Unset = UNSET,
    ) -> PoolNode:
        """Change some of a node's parameters atomically; return the new snapshot.

        Locks the node, builds the working value, checks consistency with it,
        persists and replaces the value, or raises (ConsistencyError,
        InvalidValueError, PoolNotFoundError, PoolStoreError) leaving no trace.
        ``limit_mib=None`` removes the limit.  The root has no parameters but
        its capacity: use :meth:`set_capacity`.
        """
        self._guard()
        changes: dict[str, Any] = {}
        if not isinstance(reservation_mib, _Unset):
            changes["reservation_mib"] = check_mib("reservation_mib", reservation_mib)
        if not isinstance(limit_mib, _Unset):
            changes["limit_mib"] = check_limit("limit_mib", limit_mib)
        if not isinstance(shares, _Unset):
            changes["shares"] = check_shares(shares)
        if not isinstance(expandable, _Unset):
            changes["expandable"] = check_flag(expandable)
        if not changes:
            raise InvalidValueError("modify: give at least one of reservation_mib, limit_mib, shares, expandable")
        path = normalize_path(path)
        if path == ROOT:
            raise InvalidValueError("the root '/' is the host: change its capacity with set_capacity()")
        with Held() as held:
            nodes = self._lock_path(held, path, write_from=path_depth(path))
            node, parent = nodes[-1], nodes[-2]
            if "reservation_mib" in changes or "expandable" in changes:
                self._lock_budgets(held, parent)
            working = dataclasses.replace(node.value, **changes)
            children = [(c.path, c.value.reservation_mib) for c in node.children.values()]
            eff = self._check_node(path, (parent.path, parent.value.limit_mib), working, node.child_sum, children)
            updates = self._propagate(path, parent, eff - node.effective)
            self._hook("modify", path)
            if working == node.value:
                return self._view(node)
            if self._binding is not None:
                self._binding.update(path, working)
            node.value = working
            for anc, new_sum in updates:
                anc.child_sum = new_sum
            return self._view(node)

    def set_capacity(self, capacity_mib: int) -> PoolNode:
        """Change the host capacity (the root's reservation and limit); it must hold the top level."""
        self._guard()
        capacity = check_mib("capacity_mib", capacity_mib)
        with Held() as held:
            root = self._lock_path(held, ROOT, write_from=0)[0]
            if root.child_sum > capacity:
                raise ConsistencyError(
                    RULE_CHILDREN, [ROOT, *sorted(c.path for c in root.children.values())],
                    f"/: the top-level pools reserve {root.child_sum} MiB, more than a capacity of {capacity} MiB",
                )
            working = NodeValue(capacity, capacity, root.value.shares, False)
            self._hook("set_capacity", ROOT)
            if working != root.value:
                if self._binding is not None:
                    self._binding.set_capacity(capacity)
                root.value = working
            return self._view(root)

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a node (with ``recursive``, its whole subtree).

        Refused while a domain is assigned anywhere in it (unassign first) or,
        without ``recursive``, while it has children.  Removing only loosens
        the rules, so it never raises ConsistencyError.
        """
        self._guard()
        path = normalize_path(path)
        if path == ROOT:
            raise InvalidValueError("the root '/' cannot be removed")
        with Held() as held:
            nodes = self._lock_path(held, path, write_from=path_depth(path) - 1)
            node, parent = nodes[-1], nodes[-2]
            if node.children and not recursive:
                raise PoolNotEmptyError(
                    f"pool {path!r} has children ({', '.join(sorted(node.children))}); "
                    "remove them first or pass recursive=True"
                )
            subtree = [node]
            for item in subtree:  # grows while iterating: breadth-first
                subtree.extend(item.children.values())
            assigned = sorted(f"{n.domain} at {n.path}" for n in subtree if n.domain is not None)
            if assigned:
                raise AssignmentError(
                    f"cannot remove {path!r}: domains are assigned ({'; '.join(assigned)}); unassign them first"
                )
            self._lock_budgets(held, parent)
            updates = self._propagate(path, parent, -node.effective)
            self._hook("remove", path)
            if self._binding is not None:
                self._binding.delete([n.path for n in subtree])
            del parent.children[split_path(path)[1]]
            for anc, new_sum in updates:
                anc.child_sum = new_sum

    # ---------------------------------------------------------------- domains

    def assign(self, domain: str, path: str) -> PoolNode:
        """Make the leaf at *path* the node of VM *domain* (a VM node never has children).

        Idempotent for the same pair; raises AssignmentError when *path* is the
        root or has children, already holds another domain, or *domain* is
        assigned elsewhere.
        """
        self._guard()
        domain = check_domain_name(domain)
        path = normalize_path(path)
        if path == ROOT:
            raise AssignmentError("a domain cannot be assigned to the root '/': VMs are leaves under a pool")
        with Held() as held:
            node = self._lock_path(held, path, write_from=path_depth(path))[-1]
            if node.domain == domain:
                return self._view(node)
            if node.children:
                raise AssignmentError(f"{path!r} has children; a domain can only be assigned to a leaf")
            if node.domain is not None:
                raise AssignmentError(f"{path!r} already holds domain {node.domain!r}")
            held.mutex(self._domains_lock)
            other = self._domains.get(domain)
            if other is not None:
                raise AssignmentError(f"domain {domain!r} is already assigned to {other!r}")
            self._hook("assign", path)
            if self._binding is not None:
                self._binding.set_domain(path, domain)
            node.domain = domain
            self._domains[domain] = path
            return self._view(node)

    def unassign(self, domain: str) -> str:
        """Detach *domain* from its leaf (the node stays); return the leaf's path."""
        self._guard()
        domain = check_domain_name(domain)
        while True:
            path = self.lookup(domain)
            if path is None:
                raise AssignmentError(f"domain {domain!r} is not assigned to any pool")
            with Held() as held:
                try:
                    node = self._lock_path(held, path, write_from=path_depth(path))[-1]
                except PoolNotFoundError:
                    continue  # reassigned and removed meanwhile: look again
                if node.domain != domain:
                    continue  # unassigned (and maybe reassigned) meanwhile
                self._hook("unassign", path)
                held.mutex(self._domains_lock)
                if self._binding is not None:
                    self._binding.set_domain(path, None)
                node.domain = None
                del self._domains[domain]
                return path

    def lookup(self, domain: str) -> str | None:
        """The path of the leaf *domain* is assigned to, or None."""
        self._guard()
        with self._domains_lock:
            return self._domains.get(domain)

    def assignments(self) -> dict[str, str]:
        """All assignments, domain -> leaf path."""
        self._guard()
        with self._domains_lock:
            return dict(self._domains)

    # ---------------------------------------------------------------- exclusive hold

    @contextlib.contextmanager
    def locked_subtree(self, path: str) -> Iterator[PoolNode]:
        """Hold the subtree at *path* exclusively: nothing inside it can change or be read.

        Operations elsewhere proceed (they wait only if they need this subtree's
        root lock, e.g. reservation changes accounted through it). The holding
        thread must not use the tree until it leaves the block (PoolLockError).
        """
        self._guard()
        path = normalize_path(path)
        with Held() as held:
            node = self._lock_path(held, path, write_from=path_depth(path))[-1]
            self._local.holding = True
            try:
                yield self._view(node)
            finally:
                self._local.holding = False

    # ---------------------------------------------------------------- persistence

    @classmethod
    def restore(
        cls,
        capacity_mib: int,
        rows: Iterable[tuple[str, int, int | None, int, bool, str | None]],
        binding: Binding | None,
    ) -> ResourceTree:
        """Build a tree from stored rows (path, reservation, limit, shares, expandable, domain).

        How :meth:`PoolStore.load` makes a tree; with a *binding*, every later
        commit is written to its store first.  Validates every value and rule;
        raises PoolUsageError subclasses on bad data.
        """
        tree = cls(capacity_mib)
        ordered = sorted(rows, key=lambda r: (path_depth(normalize_path(r[0])), r[0]))
        for path, reservation, limit, shares, expandable, domain in ordered:
            if normalize_path(path) != path or path == ROOT:
                raise InvalidPathError(f"stored path {path!r} is not a canonical pool path")
            value = NodeValue(
                check_mib(f"{path} reservation_mib", reservation),
                check_limit(f"{path} limit_mib", limit),
                check_shares(shares),
                check_flag(expandable),
            )
            parent_path, name = split_path(path)
            parent = tree._find_unlocked(parent_path)
            if parent is None:
                raise PoolNotFoundError(f"stored pool {path!r} has no parent {parent_path!r}")
            if parent.domain is not None:
                raise AssignmentError(f"stored pool {path!r} is under the VM leaf of {parent.domain!r}")
            if domain is not None:
                domain = check_domain_name(domain)
                if domain in tree._domains:
                    raise AssignmentError(f"stored domain {domain!r} is assigned twice")
                tree._domains[domain] = path
            parent.children[name] = _Node(path, parent, value, domain)

        def settle(node: _Node) -> int:
            node.child_sum = sum(settle(c) for c in node.children.values())
            return node.effective

        settle(tree._root)
        check_consistency(tree.snapshot(), check_cache=True)
        tree._binding = binding
        return tree

    def _find_unlocked(self, path: str) -> _Node | None:
        """Find a node without locking; only for a tree no other thread can see yet."""
        node = self._root
        if path != ROOT:
            for name in path[1:].split("/"):
                found = node.children.get(name)
                if found is None:
                    return None
                node = found
        return node


# --------------------------------------------------------------------------- full check


def check_consistency(nodes: Mapping[str, PoolNode], *, check_cache: bool = False) -> None:
    """Check every rule on a snapshot (``ResourceTree.snapshot()``), recomputing effective reservations.

    Raises ConsistencyError naming the first violated rule and its nodes.  With
    *check_cache*, also compare the snapshot's cached effective reservations.
    """
    effective: dict[str, int] = {}
    for path in reversed(list(nodes)):  # pre-order reversed: children before parents
        node = nodes[path]
        child_sum = sum(effective[c] for c in node.children)
        value = NodeValue(node.reservation_mib, node.limit_mib, node.shares, node.expandable and not node.is_root)
        effective[path] = _effective(value, child_sum)
        if check_cache and effective[path] != node.effective_reservation_mib:
            raise ConsistencyError(
                RULE_CACHE, [path],
                f"{path}: cached effective reservation {node.effective_reservation_mib} MiB, "
                f"recomputed {effective[path]} MiB",
            )
        parent = nodes[node.parent] if node.parent is not None else None
        ResourceTree._check_node(
            path,
            (parent.path, parent.limit_mib) if parent is not None else None,
            value,
            child_sum,
            [(c, nodes[c].reservation_mib) for c in node.children],
        )

