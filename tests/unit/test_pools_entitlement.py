"""Entitlements: bounds, proportionality, max-min fairness and work conservation.

Hand-computed cases first, then randomized trees and demands (fixed seeds)
checked against the properties, computed independently of the algorithm.
"""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from hvext.memory.pools import ConsistencyError, PoolNode, ResourceTree, share_out


# ------------------------------------------------------------------ share_out


def test_share_out_proportional_and_exact() -> None:
    assert share_out(100, [1000, 1000], [1, 3]) == [25, 75]
    assert share_out(10, [100, 100, 100], [1, 1, 1]) == [4, 3, 3]  # remainder to the first
    assert share_out(0, [5, 5], [1, 1]) == [0, 0]


def test_share_out_water_fills_capped_claimants() -> None:
    # The small claimant is capped; what it leaves goes to the others by weight.
    assert share_out(100, [10, 1000, 1000], [1, 1, 2]) == [10, 30, 60]
    assert share_out(30, [10, 10, 10], [5, 1, 1]) == [10, 10, 10]
    assert share_out(7, [0, 100], [50, 1]) == [0, 7]


def test_share_out_rejects_impossible() -> None:
    with pytest.raises(ValueError):
        share_out(11, [5, 5], [1, 1])
    with pytest.raises(ValueError):
        share_out(-1, [5], [1])
    with pytest.raises(ValueError):
        share_out(1, [5], [0])


def test_share_out_random_properties() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randint(1, 6)
        caps = [rng.choice([0, rng.randint(0, 50), rng.randint(0, 5000)]) for _ in range(n)]
        weights = [rng.randint(1, 5000) for _ in range(n)]
        total = rng.randint(0, sum(caps))
        got = share_out(total, caps, weights)
        assert sum(got) == total
        assert all(0 <= g <= c for g, c in zip(got, caps, strict=True))
        for i in range(n):
            if got[i] < caps[i]:  # i is not saturated: nobody got more per share (up to rounding)
                for j in range(n):
                    assert (got[j] - 1) * weights[i] <= (got[i] + 1) * weights[j], (total, caps, weights, got)


# ------------------------------------------------------------------ hand-computed cases


@pytest.fixture
def tree() -> ResourceTree:
    t = ResourceTree(capacity_mib=10_000)
    t.create("/prod", reservation_mib=4000, limit_mib=8000, shares=3000)
    t.create("/prod/web", reservation_mib=1000, shares=1000)
    t.create("/prod/db", reservation_mib=2000, shares=1000)
    t.create("/test", reservation_mib=0, shares=1000, expandable=True)
    t.create("/test/a", reservation_mib=500, limit_mib=1500, shares=1000)
    return t


def test_under_commit_gives_every_demand(tree: ResourceTree) -> None:
    demands = {"/prod/web": 700, "/prod/db": 2500, "/test/a": 100}
    assert tree.entitlements(demands) == demands


def test_idle_reservation_is_not_handed_out(tree: ResourceTree) -> None:
    got = tree.entitlements({"/prod/web": 0, "/prod/db": 0, "/test/a": 0}, all_nodes=True)
    assert set(got.values()) == {0}


def test_over_commit_hands_out_all_capacity_by_shares(tree: ResourceTree) -> None:
    demands = {"/prod/web": 20_000, "/prod/db": 20_000, "/test/a": 20_000}
    got = tree.entitlements(demands, all_nodes=True)
    # /test/a is capped by its limit (1500); /prod by its limit (8000): 9500 < 10000.
    assert got["/test/a"] == 1500 and got["/prod"] == 8000 and got["/"] == 9500
    # Inside /prod: floors 1000 and 2000, the 5000 left split 1:1.
    assert (got["/prod/web"], got["/prod/db"]) == (3500, 4500)
    tree.modify("/test/a", limit_mib=None)
    got = tree.entitlements(demands, all_nodes=True)
    assert got["/"] == 10_000  # work-conserving: all capacity handed out
    # Top level: floors /prod 4000, /test 500; 5500 left split 3000:1000, /prod capped at 8000.
    assert got["/prod"] == 8000 and got["/test/a"] == 2000


def test_reservation_beats_shares(tree: ResourceTree) -> None:
    tree.modify("/prod/web", shares=1)
    got = tree.entitlements({"/prod/web": 5000, "/prod/db": 50_000, "/test/a": 0})
    assert got["/prod/web"] >= 1000  # its reservation, although its shares are tiny
    assert got["/prod/web"] + got["/prod/db"] == 8000


def test_leaf_limit_caps_and_spare_goes_to_siblings(tree: ResourceTree) -> None:
    tree.modify("/prod/web", limit_mib=1200)
    got = tree.entitlements({"/prod/web": 9000, "/prod/db": 9000})
    assert got["/prod/web"] == 1200 and got["/prod/db"] == 6800


def test_expandable_pool_floor_uses_effective_reservation() -> None:
    t = ResourceTree(capacity_mib=1000)
    t.create("/e", expandable=True, shares=1)
    t.create("/e/vm", reservation_mib=600, shares=1)
    t.create("/other", shares=100_000)
    got = t.entitlements({"/e/vm": 1000, "/other": 1000})
    assert got["/e/vm"] >= 600 and got["/e/vm"] + got["/other"] == 1000


# ------------------------------------------------------------------ randomized properties


def random_tree(rng: random.Random, size: int) -> ResourceTree:
    """A random consistent tree, grown through the API (refused steps are skipped)."""
    tree = ResourceTree(capacity_mib=rng.randint(0, 20_000))
    paths = ["/"]
    for i in range(size):
        parent = rng.choice(paths)
        if parent.count("/") >= 4:
            continue
        path = f"{parent.rstrip('/')}/n{i}"
        reservation = rng.choice([0, 0, rng.randint(0, 3000)])
        limit = rng.choice([None, None, reservation + rng.randint(0, 4000), reservation])
        try:
            tree.create(
                path,
                reservation_mib=reservation,
                limit_mib=limit,
                shares=rng.choice([1, 500, 1000, 2000, rng.randint(1, 10_000)]),
                expandable=rng.random() < 0.5,
            )
        except ConsistencyError:
            continue
        paths.append(path)
    tree.validate()
    return tree


def _wants(nodes: dict[str, PoolNode], demands: dict[str, int]) -> dict[str, int]:
    """Demand capped by limits, summed up the tree (an independent restatement)."""
    want: dict[str, int] = {}

    def visit(path: str) -> int:
        node = nodes[path]
        total = sum(visit(c) for c in node.children) if node.children else demands.get(path, 0)
        if node.limit_mib is not None:
            total = min(total, node.limit_mib)
        want[path] = total
        return total

    visit("/")
    return want


def check_properties(tree: ResourceTree, demands: dict[str, int]) -> None:
    nodes = tree.snapshot()
    leaves = {p for p, n in nodes.items() if n.is_leaf}
    got_leaves = tree.entitlements(demands)
    alloc = tree.entitlements(demands, all_nodes=True)
    assert set(got_leaves) == leaves
    assert all(got_leaves[p] == alloc[p] for p in leaves)
    want = _wants(nodes, demands)
    for path, node in nodes.items():
        a = alloc[path]
        assert a >= 0
        if node.limit_mib is not None:
            assert a <= node.limit_mib, path
        if node.children:
            assert a == sum(alloc[c] for c in node.children), path
    assert alloc["/"] <= tree.capacity_mib
    for leaf in leaves:
        node, demand, a = nodes[leaf], demands.get(leaf, 0), alloc[leaf]
        # Bounds from the contract.
        assert a >= min(demand, node.reservation_mib), leaf
        assert a <= max(demand, node.reservation_mib), leaf
        assert a <= demand  # demand-capped
        # Work conservation: a leaf short of its demand is stopped by a saturated limit on its path.
        if a < min(demand, node.limit_mib if node.limit_mib is not None else demand):
            path, saturated = leaf, False
            while True:
                anc = nodes[path]
                if anc.limit_mib is not None and alloc[path] == anc.limit_mib:
                    saturated = True
                    break
                if anc.parent is None:
                    break
                path = anc.parent
            assert saturated, f"{leaf} gets {a} of {demand} while no limit on its path is reached"
    # Max-min fairness by shares among siblings, above their floors.
    for node in nodes.values():
        kids = list(node.children)
        floors = {c: min(want[c], nodes[c].effective_reservation_mib) for c in kids}
        for c in kids:
            assert floors[c] <= alloc[c] <= want[c], c
        for i in kids:
            if alloc[i] < want[i]:
                extra_i, s_i = alloc[i] - floors[i], nodes[i].shares
                for j in kids:
                    extra_j, s_j = alloc[j] - floors[j], nodes[j].shares
                    assert Fraction(extra_j - 1, s_j) <= Fraction(extra_i + 1, s_i), (i, j, alloc)


@pytest.mark.parametrize("seed", range(8))
def test_random_trees_satisfy_entitlement_properties(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        tree = random_tree(rng, rng.randint(1, 30))
        leaves = tree.leaves()
        for _ in range(6):
            scale = rng.choice([10, 1000, 10_000, 100_000])
            demands = {leaf: rng.choice([0, rng.randint(0, scale)]) for leaf in leaves if rng.random() < 0.9}
            check_properties(tree, demands)


def test_property_checker_catches_a_wrong_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The property checks are strong enough to reject a plausible but wrong algorithm."""
    import hvext.memory.pools.tree as pools

    def equal_split(nodes: dict[str, PoolNode], demands: dict[str, int]) -> dict[str, int]:
        alloc = {"/": min(nodes["/"].reservation_mib, sum(demands.values()))}
        for path, node in nodes.items():
            for child in node.children:  # ignores shares and reservations
                alloc[child] = alloc[path] // len(node.children)
        return alloc

    tree = ResourceTree(capacity_mib=1000)
    tree.create("/a", reservation_mib=800, shares=1)
    tree.create("/b", shares=1)
    monkeypatch.setattr(pools, "compute_allocations", equal_split)
    with pytest.raises(AssertionError):
        check_properties(tree, {"/a": 900, "/b": 900})
