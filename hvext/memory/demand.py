"""What the pool tree divides and what its VMs want, read from the host (C3).

``hvext pool-list`` and hvextd's reclaim loop need the same figures: the host
capacity a new pool store starts with, each assigned domain's *demand* (its
balloon actual: libvirt's live currentMemory) and *usage* (the RSS of its
QEMU process), and the entitlement the tree gives each domain for that
demand.  They are read and computed here, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hvext.errors import DomainNotFound, HvextError, UsageError
from hvext.host import Domain, Host
from hvext.memory import ramfile
from hvext.memory.host import meminfo
from hvext.memory.pools import ROOT, PoolStore, ResourceTree, compute_allocations
from hvext.units import KIB, MIB


def host_capacity_mib(host: Host | None) -> int:
    """The memory the pool tree divides: libvirt's for *host*, else this machine's MemTotal."""
    if host is not None:
        return host.memory_mib()
    total = meminfo("MemTotal")
    if not total:
        raise UsageError("cannot read MemTotal from /proc/meminfo")  # pragma: no cover
    return total // MIB


@contextlib.contextmanager
def open_tree(capacity_mib: int) -> Iterator[ResourceTree]:
    """The stored tree (``$HVEXT_POOLS_DB``), created with *capacity_mib* on first use; closed afterwards."""
    store = PoolStore()
    try:
        yield store.load(capacity_mib=capacity_mib)  # the capacity is used only for a new store
    finally:
        store.close()


@contextlib.contextmanager
def stored_tree(store: PoolStore | None = None) -> Iterator[ResourceTree | None]:
    """The stored tree, read only: None when there is no pool store (a reader never creates it, that is
    ``hvext pool-*``'s to do); the store is closed afterwards."""
    store = store or PoolStore()
    if not store.path.exists():
        yield None
        return
    try:
        yield store.load()
    finally:
        store.close()


def demand_bytes(domain: Domain) -> int:
    """A running domain's demand: its balloon actual (live currentMemory), in bytes."""
    return domain.memory_kib()[1] * KIB


@dataclass(frozen=True)
class DomainFigures:
    """What the host says about an assigned domain right now (MiB)."""

    state: str
    demand_mib: int = 0  # balloon actual of a running domain
    usage_mib: int | None = None  # RSS of its QEMU process; a RAM-file domain's RAM file counted once (running or not)


def domain_figures(host: Host, names: Iterable[str]) -> dict[str, DomainFigures]:
    """Current figures of the domains *names*; one that is gone or unreadable says so in its state."""
    figures: dict[str, DomainFigures] = {}
    for name in names:
        try:
            dom = host.lookup(name)
            if not dom.is_active():
                used = ramfile.usage(dom)  # saved to RAM: its RAM file still holds host memory
                figures[name] = DomainFigures(used.state, 0, used.total // MIB if used.file else None)
                continue
            demand = demand_bytes(dom)
            if ramfile.of(dom) is not None:  # QEMU's RSS includes the RAM file's pages: count them once
                figures[name] = DomainFigures("running", demand // MIB, ramfile.usage(dom).total // MIB)
                continue
            rss = dom.balloon_stats().get("rss")
            figures[name] = DomainFigures("running", demand // MIB, rss // KIB if rss is not None else None)
        except DomainNotFound:
            figures[name] = DomainFigures("missing")
        except HvextError as err:
            figures[name] = DomainFigures(f"unknown ({err})")
    return figures


def leaf_demands(tree: ResourceTree, demand_mib: Mapping[str, int]) -> dict[str, int]:
    """Domain demands (MiB by domain name) as the tree's demands: MiB by leaf path, assigned domains only."""
    return {path: demand_mib[domain] for domain, path in tree.assignments().items() if domain in demand_mib}


def entitlements(tree: ResourceTree, demand_mib: Mapping[str, int]) -> dict[str, int]:
    """Entitlement (MiB) of each domain of *demand_mib* that is assigned to a leaf; others are absent."""
    by_leaf = {path: domain for domain, path in tree.assignments().items() if domain in demand_mib}
    if not by_leaf:
        return {}
    shares = tree.entitlements({leaf: demand_mib[domain] for leaf, domain in by_leaf.items()})
    return {by_leaf[leaf]: mib for leaf, mib in shares.items() if leaf in by_leaf}


def limited_entitlements(tree: ResourceTree, demand_mib: Mapping[str, int]) -> dict[str, int]:
    """Like :func:`entitlements` with the pool limits alone binding (the host capacity taken away).

    What the limits (and, within a limited pool, reservations and shares)
    leave each domain whatever the host has: the balloon follows this, so a
    pool limit that shrinks shrinks its VMs' balloons, while contention for
    the host's capacity does not.
    """
    by_leaf = {path: domain for domain, path in tree.assignments().items() if domain in demand_mib}
    if not by_leaf:
        return {}
    nodes = tree.snapshot()
    nodes[ROOT] = dataclasses.replace(nodes[ROOT], limit_mib=None)
    shares = compute_allocations(nodes, _checked(nodes, by_leaf, demand_mib))
    return {domain: shares[leaf] for leaf, domain in by_leaf.items() if leaf in shares}


def reserved_entitlements(tree: ResourceTree, demand_mib: Mapping[str, int]) -> dict[str, int]:
    """The part of the reservations that reaches each assigned domain of *demand_mib* (MiB).

    A pool's reservation is its children's to share: the same top-down division
    as :func:`entitlements` with every top-level node and every pool capped at
    its effective reservation, so a pool reserving 384 MiB guarantees that much
    to its VMs together (by floors, then shares, as far as they want it), and a
    VM under no reservation gets 0.
    """
    by_leaf = {path: domain for domain, path in tree.assignments().items() if domain in demand_mib}
    if not by_leaf:
        return {}
    nodes = tree.snapshot()
    for path, node in list(nodes.items()):
        if node.is_root:
            nodes[path] = dataclasses.replace(node, limit_mib=None)
        elif node.children or node.depth == 1:
            cap = node.effective_reservation_mib
            nodes[path] = dataclasses.replace(node, limit_mib=cap if node.limit_mib is None else min(cap, node.limit_mib))
    shares = compute_allocations(nodes, _checked(nodes, by_leaf, demand_mib))
    return {domain: shares[leaf] for leaf, domain in by_leaf.items() if leaf in shares}


def _checked(nodes: Mapping[str, Any], by_leaf: Mapping[str, str], demand_mib: Mapping[str, int]) -> dict[str, int]:
    wanted = {leaf: demand_mib[domain] for leaf, domain in by_leaf.items() if leaf in nodes}
    for leaf, mib in wanted.items():
        if isinstance(mib, bool) or not isinstance(mib, int) or mib < 0 or nodes[leaf].children:
            raise UsageError(f"invalid demand {mib!r} for {leaf!r}")
    return wanted


def usage_tree(tree: ResourceTree, figures: Mapping[str, DomainFigures]) -> dict[str, Any]:
    """The tree as nested data (``ResourceTree.to_dict``) with demand, entitlement and usage per node.

    A node's ``demand_mib`` and ``usage_mib`` add up its subtree (usage is None
    where no domain below it reported one); a VM leaf whose domain has figures
    also gets ``domain_state``.
    """
    data = tree.to_dict(leaf_demands(tree, {name: fig.demand_mib for name, fig in figures.items()}))

    def annotate(node: dict[str, Any]) -> tuple[int, int | None]:
        demand: int = 0
        usage: int | None = None
        if node["domain"] is not None and node["domain"] in figures:
            fig = figures[node["domain"]]
            node["domain_state"] = fig.state
            demand, usage = fig.demand_mib, fig.usage_mib
        for child in node["children"]:
            child_demand, child_usage = annotate(child)
            demand += child_demand
            if child_usage is not None:
                usage = (usage or 0) + child_usage
        node["demand_mib"], node["usage_mib"] = demand, usage
        return demand, usage

    annotate(data)
    return data
