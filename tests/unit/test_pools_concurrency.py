"""Concurrency: no interleaving commits an inconsistent tree; disjoint subtrees do not block each other."""

from __future__ import annotations

import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hvext.memory.pools import (
    AssignmentError,
    ConsistencyError,
    PoolExistsError,
    PoolNotEmptyError,
    PoolNotFoundError,
    PoolStore,
    ResourceTree,
    check_consistency,
)

EXPECTED = (
    ConsistencyError,
    PoolNotFoundError,
    PoolExistsError,
    PoolNotEmptyError,
    AssignmentError,
)


@pytest.fixture(autouse=True)
def fast_switching() -> Iterator[None]:
    """Switch threads often so that interleavings are many."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def run_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    """Start *fn* in a daemon thread; the list receives its result or exception."""
    out: list[object] = []

    def body() -> None:
        try:
            out.append(fn())
        except BaseException as err:  # noqa: BLE001 - reported to the test
            out.append(err)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def two_pools() -> ResourceTree:
    tree = ResourceTree(capacity_mib=10_000)
    for top in ("/a", "/b"):
        tree.create(top, reservation_mib=3000, limit_mib=6000)
        tree.create(f"{top}/x", reservation_mib=100)
        tree.create(f"{top}/y", reservation_mib=100)
    return tree


# ------------------------------------------------------------------ disjoint subtrees


def test_holding_one_subtree_does_not_block_another() -> None:
    tree = two_pools()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with tree.locked_subtree("/a"):
            held.set()
            release.wait(10)

    holder, _ = run_in_thread(hold)
    assert held.wait(5)
    try:
        # Everything in /b, including a reservation change accounted at the root, commits.
        def work_on_b() -> str:
            tree.modify("/b/x", reservation_mib=500, shares=7)
            tree.modify("/b", reservation_mib=3500)
            tree.create("/b/z", reservation_mib=10)
            tree.assign("vm-b", "/b/z")
            tree.remove("/b/y")
            return tree.get("/b").children[0]

        worker, out = run_in_thread(work_on_b)
        worker.join(5)
        assert not worker.is_alive(), "a modification of /b waited for the lock held on /a"
        assert out == ["/b/x"]
        # While a modification inside /a waits.
        blocked, blocked_out = run_in_thread(lambda: tree.modify("/a/x", reservation_mib=200))
        blocked.join(0.3)
        assert blocked.is_alive() and not blocked_out, "a modification inside a held subtree went ahead"
        reader, reader_out = run_in_thread(lambda: tree.get("/a/y"))
        reader.join(0.1)
        assert reader.is_alive()
    finally:
        release.set()
    holder.join(5)
    blocked.join(5)
    reader.join(5)
    assert not blocked.is_alive() and blocked_out[0].reservation_mib == 200  # type: ignore[attr-defined]
    assert reader_out[0].path == "/a/y"  # type: ignore[attr-defined]
    tree.validate()


def test_disjoint_modifications_are_inside_their_critical_sections_together() -> None:
    """Both threads reach the post-lock hook at once: neither waited for the other."""
    tree = two_pools()
    barrier = threading.Barrier(2, timeout=5)

    def hook(operation: str, path: str) -> None:
        if path in ("/a/x", "/b/x"):
            barrier.wait()  # after the check, before the commit

    tree._after_lock = hook
    t1, out1 = run_in_thread(lambda: tree.modify("/a/x", reservation_mib=2000))
    t2, out2 = run_in_thread(lambda: tree.modify("/b/x", reservation_mib=2000))
    t1.join(10)
    t2.join(10)
    assert [type(o).__name__ for o in out1 + out2] == ["PoolNode", "PoolNode"]
    tree.validate()


def test_conflicting_modifications_are_serialised() -> None:
    """Two reservations that each fit but not together: exactly one commits."""
    tree = two_pools()  # /a holds 3000, its children 200
    inside = 0
    overlap = 0
    lock = threading.Lock()

    def hook(operation: str, path: str) -> None:
        nonlocal inside, overlap
        with lock:
            inside += 1
            overlap = max(overlap, inside)
        time.sleep(0.05)  # sits between the check and the commit
        with lock:
            inside -= 1

    tree._after_lock = hook
    t1, out1 = run_in_thread(lambda: tree.modify("/a/x", reservation_mib=1600))
    t2, out2 = run_in_thread(lambda: tree.modify("/a/y", reservation_mib=1600))
    t1.join(10)
    t2.join(10)
    results = out1 + out2
    assert sorted(type(r).__name__ for r in results) == ["ConsistencyError", "PoolNode"]
    assert overlap == 1
    tree.validate()
    assert tree.get("/a/x").reservation_mib + tree.get("/a/y").reservation_mib == 1700


def test_conflicts_through_an_expandable_chain_are_serialised() -> None:
    """Siblings deep under expandable pools compete for the same non-expandable ancestor."""
    tree = ResourceTree(capacity_mib=10_000)
    tree.create("/a", reservation_mib=1000)
    tree.create("/a/e1", expandable=True)
    tree.create("/a/e2", expandable=True)
    tree.create("/a/e1/x")
    tree.create("/a/e2/y")
    tree._after_lock = lambda op, path: time.sleep(0.05)
    t1, out1 = run_in_thread(lambda: tree.modify("/a/e1/x", reservation_mib=600))
    t2, out2 = run_in_thread(lambda: tree.create("/a/e2/y/z", reservation_mib=600))
    t1.join(10)
    t2.join(10)
    assert sorted(type(r).__name__ for r in out1 + out2) == ["ConsistencyError", "PoolNode"]
    tree.validate()


# ------------------------------------------------------------------ storm


def build_storm_tree(capacity: int = 20_000) -> ResourceTree:
    tree = ResourceTree(capacity_mib=capacity)
    for top, exp in (("/p0", False), ("/p1", True), ("/p2", False), ("/p3", True)):
        tree.create(top, reservation_mib=2000, expandable=exp, limit_mib=9000)
        for sub, sexp in (("s0", True), ("s1", False)):
            tree.create(f"{top}/{sub}", reservation_mib=500, expandable=sexp)
    return tree


def storm_op(tree: ResourceTree, rng: random.Random, names: list[str], tid: int, step: int) -> None:
    """One random operation; refusals are fine, anything else is a failure."""
    nodes = tree.snapshot()
    paths = [p for p in nodes if p != "/"]
    path = rng.choice(paths) if paths else "/p0"
    kind = rng.random()
    if kind < 0.40:
        tree.modify(path, reservation_mib=rng.choice([0, rng.randint(0, 3000), rng.randint(0, 300)]))
    elif kind < 0.50:
        tree.modify(path, limit_mib=rng.choice([None, rng.randint(0, 10_000)]))
    elif kind < 0.58:
        tree.modify(path, expandable=rng.random() < 0.5, shares=rng.randint(1, 4000))
    elif kind < 0.75:
        parent = rng.choice([*paths, "/"])
        if parent.count("/") < 4:
            tree.create(
                f"{parent.rstrip('/')}/t{tid}_{step}",
                reservation_mib=rng.randint(0, 800),
                expandable=rng.random() < 0.5,
            )
    elif kind < 0.85:
        tree.remove(path, recursive=rng.random() < 0.3)
    elif kind < 0.93:
        tree.assign(rng.choice(names), path)
    else:
        tree.unassign(rng.choice(names))


def run_storm(tree: ResourceTree, threads: int, ops: int, seed: int) -> dict[str, int]:
    stop = threading.Event()
    failures: list[BaseException] = []
    counts = {"ok": 0, "refused": 0, "checks": 0}
    count_lock = threading.Lock()
    names = [f"vm{i}" for i in range(6)]

    def writer(tid: int) -> None:
        rng = random.Random(seed * 1000 + tid)
        for step in range(ops):
            try:
                storm_op(tree, rng, names, tid, step)
                outcome = "ok"
            except EXPECTED:
                outcome = "refused"
            except BaseException as err:  # noqa: BLE001
                failures.append(err)
                return
            with count_lock:
                counts[outcome] += 1

    def reader() -> None:
        while not stop.is_set():
            try:
                nodes = tree.snapshot()
                check_consistency(nodes, check_cache=True)
                domains = {n.domain: p for p, n in nodes.items() if n.domain is not None}
                assert all(not nodes[p].children for p in domains.values()), "a VM node has children"
            except BaseException as err:  # noqa: BLE001
                failures.append(err)
                return
            with count_lock:
                counts["checks"] += 1

    # Between taking the locks and committing, sometimes let other threads run:
    # without correct locking, that is where a concurrent commit slips in.
    tree._after_lock = lambda operation, path: time.sleep(0.0002) if random.random() < 0.5 else None
    workers = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(threads)]
    watcher = threading.Thread(target=reader, daemon=True)
    watcher.start()
    for w in workers:
        w.start()
    deadline = time.monotonic() + 30
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    watcher.join(5)
    assert not any(w.is_alive() for w in workers), "deadlock: a writer never finished"
    tree._after_lock = None
    assert not failures, failures[0]
    tree.validate()
    assert tree.assignments() == {n.domain: p for p, n in tree.snapshot().items() if n.domain is not None}
    return counts


def test_storm_never_commits_an_inconsistent_tree() -> None:
    tree = build_storm_tree()
    counts = run_storm(tree, threads=8, ops=250, seed=1)
    # The storm did exercise both outcomes and the reader checked during it.
    assert counts["ok"] > 300 and counts["refused"] > 100 and counts["checks"] > 5, counts


def test_storm_with_store_matches_the_database(tmp_path: Path) -> None:
    store = PoolStore(tmp_path / "pools.sqlite")
    tree = store.load(capacity_mib=20_000)
    source = build_storm_tree()
    for node in list(source.walk())[1:]:
        tree.create(node.path, reservation_mib=node.reservation_mib, limit_mib=node.limit_mib,
                    expandable=node.expandable, shares=node.shares)
    counts = run_storm(tree, threads=4, ops=60, seed=2)
    assert counts["ok"] > 20, counts
    reloaded = PoolStore(tmp_path / "pools.sqlite").load()
    assert reloaded.snapshot() == tree.snapshot()
    assert reloaded.assignments() == tree.assignments()
