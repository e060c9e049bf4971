"""hvext.memory.bind on libvirt's test driver (real domains, real memtune calls): applied, idempotent,
dry runs change nothing, leaving a pool removes the limits, and hvextd's loop applies them each round."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvext import aio
from hvext.daemon import reclaim_loop
from hvext.host import Host
from hvext.memory import bind
from hvext.memory.memtune import UNLIMITED_KIB, overhead_mib
from hvext.memory.pools import PoolStore, ResourceTree
from tests.unit.testdriver import running_domain

URI = "test:///default"
XML = ("<domain type='test'><name>{name}</name><memory unit='MiB'>1024</memory>"
       "<currentMemory unit='MiB'>768</currentMemory><os><type>hvm</type></os></domain>")
MARGIN = overhead_mib(1024)


def tree_for(name: str) -> ResourceTree:
    tree = ResourceTree(capacity_mib=4096)
    tree.create("/p", reservation_mib=300, limit_mib=2000)
    tree.create("/p/vm", domain=name)
    return tree


def test_apply_sets_the_limits_once_and_a_dry_run_changes_nothing() -> None:
    with running_domain(XML, "bind") as dom, Host(URI) as host:
        tree = tree_for(dom.name)
        [dry] = aio.run(bind.apply(host, tree, dry_run=True))
        assert dry.memtune_changes == {"hard_limit": (768 + MARGIN) << 10, "soft_limit": (300 + MARGIN) << 10}
        assert dom.memory_parameters()["hard_limit"] == UNLIMITED_KIB  # a dry run
        [done] = aio.run(bind.apply(host, tree))
        assert done.error is None and done.balloon_target_mib is None
        params = dom.memory_parameters()
        assert (params["hard_limit"], params["soft_limit"]) == ((768 + MARGIN) << 10, (300 + MARGIN) << 10)
        [again] = aio.run(bind.apply(host, tree))
        assert again.memtune_changes == {}  # idempotent
        tree.modify("/p", limit_mib=600)
        [shrunk] = aio.run(bind.apply(host, tree, dry_run=True))
        assert shrunk.memtune_changes == {"hard_limit": (600 + MARGIN) << 10}
        assert shrunk.balloon_target_mib == 600  # the balloon follows a shrinking limit
        bind.release(dom)
        assert dom.memory_parameters()["hard_limit"] == UNLIMITED_KIB


def test_a_missing_domain_is_reported_and_stops_no_other() -> None:
    with running_domain(XML, "bind-ok") as dom, Host(URI) as host:
        tree = tree_for(dom.name)
        tree.create("/gone", domain="hvext-unit-no-such-domain")
        done = {d.domain: d for d in aio.run(bind.apply(host, tree))}
        gone = done["hvext-unit-no-such-domain"]
        assert (gone.state, gone.binding, gone.error) == ("missing", None, None)
        assert done[dom.name].error is None and dom.memory_parameters()["hard_limit"] == (768 + MARGIN) << 10
        bind.release(dom)


def test_hvextds_loop_applies_the_bindings_each_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "pools.sqlite"
    monkeypatch.setenv("HVEXT_POOLS_DB", str(db))
    with running_domain(XML, "bind-loop") as dom, Host(URI) as host:
        store = PoolStore(db)
        store.save(tree_for(dom.name))
        store.close()
        config = reclaim_loop.ReclaimConfig(host_available_min_mib=0, domains=(dom.name,))
        assert aio.run(reclaim_loop.one_round(host, config)) == []  # nothing to reclaim, but bound
        assert dom.memory_parameters()["hard_limit"] == (768 + MARGIN) << 10
        [again] = aio.run(reclaim_loop.bind_pools(host, config))
        assert again.memtune_changes == {}
        bind.release(dom)


def test_pool_apply_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from hvext.cli.main import main

    monkeypatch.setenv("HVEXT_POOLS_DB", str(tmp_path / "pools.sqlite"))
    with running_domain(XML, "bind-cli") as dom:
        assert main(["-c", URI, "pool-create", "/p", "--limit", "1000M"]) == 0
        assert main(["-c", URI, "pool-assign", dom.name, "/p/vm", "--create"]) == 0  # applied on assignment
        capsys.readouterr()
        assert dom.memory_parameters()["hard_limit"] == (768 + MARGIN) << 10
        assert main(["-c", URI, "pool-apply", "--dry-run", "--json"]) == 0
        [item] = json.loads(capsys.readouterr().out)["domains"]
        assert item["memtune_changes"] == {} and item["binding"]["memtune"]["hard_limit_kib"] == (768 + MARGIN) << 10
        # a limit below the balloon: the test driver has no QMP to move it, the hard limit binds anyway
        assert main(["-c", URI, "pool-set", "/p", "--limit", "400M"]) == 0  # applied on a change
        assert "balloon not moved" in capsys.readouterr().err
        assert dom.memory_parameters()["hard_limit"] == (400 + MARGIN) << 10
        assert main(["-c", URI, "pool-apply"]) == 1
        assert "error: " in capsys.readouterr().err
        assert main(["-c", URI, "pool-unassign", dom.name]) == 0
        assert dom.memory_parameters()["hard_limit"] == UNLIMITED_KIB
        assert main(["-c", URI, "pool-apply"]) == 0
        assert "No domain is assigned" in capsys.readouterr().out
