"""hvext.memory.demand: capacity, demand, usage and entitlements of pooled VMs (pool-list and hvextd).

Figures are read from libvirt's test driver (real domains, no fakes); the
tree computations run on in-memory trees with hand-computed answers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from hvext.daemon import reclaim_loop
from hvext.host import Host
from hvext.memory import demand
from hvext.memory.demand import DomainFigures
from hvext.memory.pools import PoolStore, ResourceTree
from tests.unit.testdriver import running_domain

URI = "test:///default"
XML = ("<domain type='test'><name>{name}</name><memory unit='MiB'>1024</memory>"
       "<currentMemory unit='MiB'>768</currentMemory><os><type>hvm</type></os></domain>")


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "pools.sqlite"
    monkeypatch.setenv("HVEXT_POOLS_DB", str(path))
    return path


@pytest.fixture
def tree() -> ResourceTree:
    """/prod (2048 reserved) holds web-1 (512) and db-1; /dev holds dev-1; /spare has no domain."""
    t = ResourceTree(capacity_mib=4096)
    t.create("/prod", reservation_mib=2048)
    t.create("/prod/web", reservation_mib=512, domain="web-1")
    t.create("/prod/db", domain="db-1")
    t.create("/dev", shares=500)
    t.create("/dev/a", domain="dev-1")
    t.create("/spare")
    return t


def test_host_capacity_is_libvirts_with_a_host_else_memtotal() -> None:
    with open("/proc/meminfo") as handle:
        kib = next(int(line.split()[1]) for line in handle if line.startswith("MemTotal:"))
    assert demand.host_capacity_mib(None) == kib // 1024
    with Host(URI) as host:
        assert demand.host_capacity_mib(host) == host.conn.getInfo()[1] == host.memory_mib()


def test_open_tree_creates_the_store_with_the_capacity_once_and_closes_it(db: Path) -> None:
    with demand.open_tree(3000) as tree:
        tree.create("/prod", reservation_mib=1000)
        store = tree.store
    assert store is not None and store._conn is None  # closed on leaving
    with demand.open_tree(1) as again:  # a stored tree keeps its capacity
        assert again.capacity_mib == 3000 and again.exists("/prod")
    assert PoolStore(db).load().capacity_mib == 3000


def test_domain_figures_of_running_shut_off_and_missing_domains() -> None:
    name = f"hvext-unit-{os.getpid()}-demand-off"
    with running_domain(XML, "demand") as running, Host(URI) as host:
        default = host.conn.lookupByName("test")  # the driver's own domain reports an RSS
        off = host.conn.defineXML(XML.format(name=name))
        try:
            figures = demand.domain_figures(host, [running.name, "test", name, "no-such-domain"])
        finally:
            off.undefine()
        assert figures == {
            running.name: DomainFigures("running", 768, None),  # no RSS in its memory statistics
            "test": DomainFigures("running", default.info()[2] // 1024, default.memoryStats()["rss"] // 1024),
            name: DomainFigures("shut off"),
            "no-such-domain": DomainFigures("missing"),
        }
        assert demand.demand_bytes(running) == 768 << 20


def test_leaf_demands_and_entitlements_only_for_assigned_domains(tree: ResourceTree) -> None:
    wanted = {"web-1": 3000, "db-1": 1000, "dev-1": 1000, "stray": 500}
    assert demand.leaf_demands(tree, wanted) == {"/prod/web": 3000, "/prod/db": 1000, "/dev/a": 1000}
    # /prod is guaranteed 2048 and wants 4000, /dev wants 1000: the 2048 left are shared 2:1 by
    # shares (1000 vs 500): 1365.3 and 682.7, the odd MiB to the larger fraction: /prod 3413, /dev 683.
    # Inside /prod web has its 512 floor, db's 1000 fits in an even split of the 2901 left, web takes the rest.
    assert demand.entitlements(tree, wanted) == {"web-1": 2413, "db-1": 1000, "dev-1": 683}
    assert demand.entitlements(tree, {"stray": 500}) == {}
    assert demand.entitlements(tree, {"web-1": 100}) == {"web-1": 100}


def test_usage_tree_adds_demand_and_usage_up_the_tree(tree: ResourceTree) -> None:
    figures = {"web-1": DomainFigures("running", 3000, 2500), "db-1": DomainFigures("shut off"),
               "dev-1": DomainFigures("running", 100, None)}
    data = demand.usage_tree(tree, figures)
    nodes = {}
    stack = [data]
    while stack:
        node = stack.pop()
        nodes[node["path"]] = node
        stack.extend(node["children"])
    assert nodes["/prod/web"]["domain_state"] == "running" and nodes["/prod/db"]["domain_state"] == "shut off"
    assert [nodes[p]["demand_mib"] for p in ("/", "/prod", "/prod/web", "/prod/db", "/dev", "/spare")] == \
        [3100, 3000, 3000, 0, 100, 0]
    assert [nodes[p]["usage_mib"] for p in ("/", "/prod", "/prod/db", "/dev", "/spare")] == \
        [2500, 2500, None, None, None]
    assert nodes["/prod/web"]["entitlement_mib"] == 3000 and nodes["/dev/a"]["entitlement_mib"] == 100
    assert "domain_state" not in nodes["/spare"]


def test_reclaim_loop_does_not_create_the_store(db: Path) -> None:
    """hvextd used to create the store, with the sum of its VMs' demands as the host's capacity."""
    with Host(URI) as host:
        assert reclaim_loop._pool_entitlements(host, {"vm-a": 100 << 20}) == {}
    assert not db.exists()


def test_reclaim_loop_entitlements_in_bytes_and_unusable_store(
        db: Path, tree: ResourceTree, caplog: pytest.LogCaptureFixture) -> None:
    with PoolStore(db) as store:
        store.save(tree)
    with Host(URI) as host:
        assert reclaim_loop._pool_entitlements(host, {"web-1": 3000 << 20, "dev-1": 1000 << 20, "x": 1}) == \
            {"web-1": 3000 << 20, "dev-1": 1000 << 20}
        for path in db.parent.glob(db.name + "*"):
            path.unlink()
        db.mkdir()  # no database can be opened there
        with caplog.at_level(logging.WARNING, "hvextd.reclaim"):
            assert reclaim_loop._pool_entitlements(host, {"web-1": 3000 << 20}) == {}
    assert "pool entitlements unavailable, ordering VMs by size" in caplog.text
