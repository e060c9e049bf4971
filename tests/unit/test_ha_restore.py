"""PMEM restore on the claimer (hvext/ha/restore.py, hvext/ha/shared_store.py): the mode dispatch, the
shared-store restore and its refusals, the power-loss hand-off and hvextd's keeper restoring before it starts
a claimed domain -- against a REAL etcd member and libvirt's test driver; stores are real hvext stores."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from hvext import paths
from hvext.daemon import ha_loop
from hvext.daemon.config import HAConfig
from hvext.errors import DomainNotFound, HAError, UsageError
from hvext.ha import cluster, restore, shared_store
from hvext.ha.client import FAILOVER_PREFIX, FINAL_PREFIX, Client, Protection
from hvext.ha.etcd import Layout
from hvext.host import Host, RunState
from hvext.pmem.store import Store
from tests.unit import test_ha_cluster, test_ha_fence
from tests.unit.test_ha_fence import MARGIN, TTL
from tests.unit.testdriver import PLAIN_XML, running_domain

member = test_ha_fence.member  # the etcd fixture (one member, torn down after the test)

SIZE = 1 << 20
T = TypeVar("T")


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """(shared store DIR, volatile dir) in tmp_path; hvext's state (power registry) moved there too."""
    monkeypatch.setattr(paths, "STATE_DIR", tmp_path / "state")
    monkeypatch.setattr(paths, "VOLATILE_DIR", tmp_path / "shm" / "hvext")
    (tmp_path / "shm").mkdir()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    yield shared, tmp_path / "shm" / "hvext"


def saved_store(shared: Path, domain: str, content: bytes, saves: int = 1) -> tuple[Path, Path, int]:
    """A store in ``shared/<domain>/nvdimm0`` holding *content* (saved *saves* times): (store, backing, gen)."""
    (shared / domain).mkdir(mode=0o700)
    store_dir = shared / domain / "nvdimm0"
    store = Store.create(store_dir, SIZE)
    source = shared.parent / f"{domain}.src"
    for i in range(saves):
        source.write_bytes(content[:-1] + bytes([i]))
        store.save(source)
    source.write_bytes(content)
    result = store.save(source)
    source.unlink()
    return store_dir, paths.VOLATILE_DIR / domain / "nvdimm0.img", result.generation


def record_for(domain: str, shared: Path, store: Path, backing: Path, home: str = "h-gone") -> Protection:
    pmem = {"mode": "shared-store", "dir": str(shared),
            "devices": [{"alias": "nvdimm0", "model": "nvdimm", "size": SIZE, "backing": str(backing),
                         "store": str(store)}]}
    return Protection(domain, PLAIN_XML.format(name=domain), home, time.time(), pmem=pmem)


# -- dispatch ----------------------------------------------------------------------------------------
def test_a_domain_without_pmem_protection_restores_nothing() -> None:
    report = restore.restore_pmem(Protection("d", "<domain/>", "h", 1.0), "h2")
    assert (report.ok, report.performed, report.mode) == (True, False, None)


def test_an_unknown_or_missing_mode_fails_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    report = restore.restore_pmem(Protection("d", "<domain/>", "h", 1.0, pmem={"mode": "teleport"}), "h2",
                                  uri="test:///default")
    assert not report.ok and "unknown pmem protection mode 'teleport'" in str(report.error)
    monkeypatch.setitem(restore.MODES, "elsewhere", ("hvext.ha.no_such_module", "restore"))
    report = restore.restore_pmem(Protection("d", "<domain/>", "h", 1.0, pmem={"mode": "elsewhere"}), "h2",
                                  uri="test:///default")
    assert not report.ok and "not available" in str(report.error)
    assert report.failover_record(at=5.0) == {"host": "h2", "mode": "elsewhere", "at": 5.0, "error": report.error,
                                              "complete": None, "final_host": None, "seconds": report.seconds}


def test_a_mode_that_breaks_is_a_failed_report_not_an_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("hvext_test_broken_mode")

    def restore_broken(record: Protection, host_name: str, **_: object) -> restore.RestoreReport:
        raise RuntimeError("bug")

    def restore_wrong(record: Protection, host_name: str, **_: object) -> object:
        return {"ok": True}

    module.restore_broken = restore_broken  # type: ignore[attr-defined]
    module.restore_wrong = restore_wrong  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(restore.MODES, "broken", (module.__name__, "restore_broken"))
    monkeypatch.setitem(restore.MODES, "wrong", (module.__name__, "restore_wrong"))
    for mode, expected in [("broken", "unexpected RuntimeError: bug"), ("wrong", "not a RestoreReport")]:
        report = restore.restore_pmem(Protection("d", "<domain/>", "h", 1.0, pmem={"mode": mode}), "h2",
                                      uri="test:///default")
        assert not report.ok and expected in str(report.error), report


def test_the_replicas_mode_dispatches_to_replication() -> None:
    assert restore.MODES["replicas"] == ("hvext.ha.replication", "restore_from_replica")
    assert restore.MODES["shared-store"] == ("hvext.ha.shared_store", "restore_from_shared_store")


def replicated_record(domain: str, backing: Path, home: str, replicas: list[str]) -> Protection:
    pmem = {"mode": "replicas", "replicas": replicas,
            "devices": [{"name": "nvdimm0", "size": SIZE, "backing": str(backing)}]}
    return Protection(domain, PLAIN_XML.format(name=domain), home, time.time(), pmem=pmem)


def test_a_domain_running_on_the_claimer_keeps_its_pmem_whatever_the_mode(tmp_path: Path) -> None:
    """Its home adopting it right after ``ha protect`` (it runs there, and the home is no replica): the
    live PMEM is kept, not a failed restore recorded as the domain's failover."""
    with running_domain(PLAIN_XML, "runs-here") as dom:
        record = replicated_record(dom.name, tmp_path / "nvdimm0.img", "h1", ["h2"])
        report = restore.restore_pmem(record, "h1", uri="test:///default")
    assert report.ok and not report.performed and "runs on this host" in report.action, report


def test_a_home_that_re_adopts_keeps_its_own_files_but_not_after_a_power_loss(tmp_path: Path) -> None:
    from hvext.ha import replication
    backing = tmp_path / "nvdimm0.img"
    backing.write_bytes(b"\0" * SIZE)
    record = replicated_record("gone-vm", backing, "h1", ["h2"])
    report = replication.restore_from_replica(record, "h1", uri="test:///default", final=None)
    assert report.ok and not report.performed and "home re-adopted" in report.action, report
    with pytest.raises(HAError, match="not a replica"):  # the owner's final epoch went to the replicas
        replication.restore_from_replica(record, "h1", uri="test:///default", final={"host": "h1", "epoch": 3})
    with pytest.raises(HAError, match="not a replica"):  # not its home
        replication.restore_from_replica(record, "h3", uri="test:///default", final=None)


# -- the shared directory (root: the volatile directory's group is QEMU's) ----------------------------------------------------------------------------
def test_the_shared_directory_is_checked(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    assert shared_store.check_dir(str(good) + "/") == good
    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(good)
    shm = Path("/dev/shm") / f"hvext-unit-{os.getpid()}"
    shm.mkdir(mode=0o700)
    try:
        for bad, why in [("relative/dir", "absolute"), (str(tmp_path / "missing"), "create it"),
                         (str(tmp_path / "open"), "must be private"), (str(tmp_path / "link"), "not a directory"),
                         (str(shm), "volatile memory")]:
            with pytest.raises(UsageError, match=why):
                shared_store.check_dir(bad)
    finally:
        shm.rmdir()


# -- restore from the shared store -------------------------------------------------------------------
def test_a_restore_writes_the_final_generation_and_refuses_an_older_store(places: tuple[Path, Path]) -> None:
    shared, _ = places
    content = os.urandom(4096) * (SIZE // 4096)
    store, backing, gen = saved_store(shared, "dom-a", content, saves=2)
    record = record_for("dom-a", shared, store, backing)
    final = {"host": "h-old", "generation": {str(backing): gen}, "at": 1.0}
    report = shared_store.restore_from_shared_store(record, "h-new", uri="test:///default", final=final)
    assert report.ok and report.performed and report.complete and report.final_host == "h-old"
    assert report.generation == {str(backing): gen}
    assert backing.read_bytes() == content and backing.stat().st_mode & 0o777 == 0o660
    assert report.failover_record(at=2.0)["restored_generation"] == {str(backing): gen}

    # the owner saved a newer generation than this host sees: not restored, not started
    backing.write_bytes(b"left alone")
    newer = {"host": "h-old", "generation": {str(backing): gen + 1}, "at": 1.0}
    with pytest.raises(shared_store.SharedStoreError, match="does not see the final save"):
        shared_store.restore_from_shared_store(record, "h-new", uri="test:///default", final=newer)
    assert backing.read_bytes() == b"left alone"

    # no final record (the owner died abruptly): the last save, said to be incomplete
    report = shared_store.restore_from_shared_store(record, "h-new", uri="test:///default", final=None)
    assert report.ok and report.complete is False and backing.read_bytes() == content
    # its home re-adopting it (after its own fence) keeps its own, newer files
    backing.write_bytes(b"newer than the store")
    home = record_for("dom-a", shared, store, backing, home="h-new")
    report = shared_store.restore_from_shared_store(home, "h-new", uri="test:///default", final=None)
    assert report.ok and not report.performed and backing.read_bytes() == b"newer than the store"


def test_a_record_naming_other_paths_is_refused_before_anything_is_written(places: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    shared, volatile = places
    store, backing, _ = saved_store(shared, "dom-b", bytes(SIZE))
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    for field, value in [("backing", str(victim)), ("backing", str(volatile / "dom-b" / ".." / "x")),
                         ("backing", str(volatile / "other-domain" / "x.img")),
                         ("store", str(tmp_path / "elsewhere")), ("store", str(shared / "dom-b" / ".." / "x")),
                         ("size", 0)]:
        record = record_for("dom-b", shared, store, backing)
        assert record.pmem is not None
        record.pmem["devices"][0][field] = value
        report = restore.restore_pmem(record, "h-new", uri="test:///default")
        assert not report.ok and "protection record of 'dom-b'" in str(report.error), (field, value)
    assert victim.read_bytes() == b"keep" and not backing.exists()


# -- etcd: hand-off and the keeper -------------------------------------------------------------------
def needs_etcd(test: T) -> T:
    """The cluster tests' requirements (root, etcd, openssl) on one test."""
    for mark in test_ha_cluster.pytestmark:
        test = mark(test)
    return test


@needs_etcd
def test_the_hand_off_after_a_power_loss_stops_records_and_moves(member: Layout,  # noqa: F811
                                                                 places: tuple[Path, Path]) -> None:
    shared, _ = places
    url = cluster.require_member(member).client_url
    client = Client([url], member.credentials())
    with running_domain(PLAIN_XML, "handoff") as dom:
        store, backing, gen = saved_store(shared, dom.name, bytes(SIZE))
        assert client.protect(record_for(dom.name, shared, store, backing, home="h-a"))
        lease_a, lease_b = client.grant(30), client.grant(30)
        saved = {"devices": [{"domain": dom.name, "backing": str(backing), "generation": gen, "paused": True}]}
        try:
            client.register_host("h-a", lease_a.id)
            # alone in the cluster: stopped and released (no host to hand it to), the final save recorded
            assert client.claim(dom.name, "h-a", lease_a.id)
            outcome = shared_store.hand_off_after_power_loss(client, "h-a", "test:///default", saved, [dom.name])
            assert "released" in outcome[dom.name] and dom.state is RunState.SHUTOFF, outcome
            assert dom.name not in client.owners() and client.protected()[0][dom.name].home == "h-a"
            assert client.record(FINAL_PREFIX, dom.name)["generation"] == {str(backing): gen}  # type: ignore[index]
            dom.start()
            client.delete_record(FINAL_PREFIX, dom.name)
            client.register_host("h-b", lease_b.id)
            assert client.claim(dom.name, "h-a", lease_a.id)
            # a save that failed: nothing is handed off, the guest is left as it is
            failed = {"devices": [{"domain": dom.name, "backing": str(backing), "error": "disk full"}]}
            outcome = shared_store.hand_off_after_power_loss(client, "h-a", "test:///default", failed, [dom.name])
            assert outcome[dom.name].startswith("error:") and "disk full" in outcome[dom.name]
            assert dom.is_active() and client.owners()[dom.name][0] == "h-a"
            assert client.record(FINAL_PREFIX, dom.name) is None

            outcome = shared_store.hand_off_after_power_loss(client, "h-a", "test:///default", saved, [dom.name])
            assert "handed off to h-b" in outcome[dom.name], outcome
            assert dom.state is RunState.SHUTOFF  # stopped before anything else
            final = client.record(FINAL_PREFIX, dom.name)
            assert final is not None and final["host"] == "h-a" and final["generation"] == {str(backing): gen}
            assert dom.name not in client.owners()
            (record,) = [r for d, r in client.protected()[0].items() if d == dom.name]
            assert record.home == "h-b" and record.pmem is not None and record.pmem["mode"] == "shared-store"
            # adopt keeps the pmem field; a hand-off of a record read before is refused
            assert client.adopt(record, "h-b", lease_b.id)
            assert client.protected()[0][dom.name].pmem == record.pmem
            assert not client.hand_off(record, "h-b", "h-a")
        finally:
            client.revoke(lease_a.id)
            client.revoke(lease_b.id)
            client.unprotect(dom.name)
            assert client.record(FINAL_PREFIX, dom.name) is None  # unprotect drops it too
            client.close()


@needs_etcd
def test_a_replicated_domain_goes_to_a_live_replica_that_holds_its_final_epoch(member: Layout,  # noqa: F811
                                                                             tmp_path: Path) -> None:
    """After the battery path (final epoch acknowledged) the owner stops the guest and hands the domain to
    a live replica that has that epoch, so it claims now rather than after the owner's lease ends."""
    from hvext.ha import replication
    url = cluster.require_member(member).client_url
    client = Client([url], member.credentials())
    with running_domain(PLAIN_XML, "rhandoff") as dom:
        record = replicated_record(dom.name, tmp_path / "nvdimm0.img", "h-a", ["h-b", "h-c"])
        assert client.protect(record)
        leases = {h: client.grant(30) for h in ("h-a", "h-b", "h-c")}
        try:
            for host, lease in leases.items():
                client.register_host(host, lease.id)
            assert client.claim(dom.name, "h-a", leases["h-a"].id)
            # nobody live has the final epoch (h-c is behind, h-b answered nothing): kept, still running
            behind = [{"domain": dom.name, "epoch": 9, "acked": {"h-b": 0, "h-c": 8}}]
            outcome = replication.hand_off_after_power_loss(client, "h-a", "test:///default", behind, [dom.name])
            assert outcome[dom.name].startswith("kept") and dom.is_active(), outcome
            assert client.owners()[dom.name][0] == "h-a"
            # a failed battery report, or a domain this host does not own: nothing happens
            failed = [{"domain": dom.name, "error": "no epoch was ever cut"}]
            assert replication.hand_off_after_power_loss(client, "h-a", "test:///default", failed, [dom.name]) == {}
            done = [{"domain": dom.name, "epoch": 9, "acked": {"h-b": 9, "h-c": 8}}]
            assert replication.hand_off_after_power_loss(client, "h-a", "test:///default", done, []) == {}
            outcome = replication.hand_off_after_power_loss(client, "h-a", "test:///default", done, [dom.name])
            assert outcome[dom.name] == "final epoch 9 on h-b: stopped and handed off", outcome
            assert dom.state is RunState.SHUTOFF and dom.name not in client.owners()
            assert client.protected()[0][dom.name].home == "h-b"
        finally:
            for lease in leases.values():
                client.revoke(lease.id)
            client.unprotect(dom.name)
            client.close()


@needs_etcd
def test_the_keeper_restores_before_it_starts_and_never_starts_what_it_cannot_restore(
        member: Layout, places: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    shared, _ = places
    url = cluster.require_member(member).client_url
    client = Client([url], member.credentials())
    pid = os.getpid()
    good, bad = f"hvext-unit-{pid}-restored", f"hvext-unit-{pid}-unrestorable"
    content = os.urandom(SIZE)
    store, backing, gen = saved_store(shared, good, content)
    bad_store, bad_backing, bad_gen = saved_store(shared, bad, content)
    config = HAConfig(cluster="test", etcd_endpoints=(url,), host="h-new", lease_ttl=TTL, fence_margin=MARGIN,
                      credentials=member.pki_dir)
    keeper = ha_loop.Keeper(config, "h-new", "test:///default")
    held = Host("test:///default")  # the test driver's domains live while a connection is open
    try:
        assert client.protect(record_for(good, shared, store, backing))
        assert client.protect(record_for(bad, shared, bad_store, bad_backing))
        client.put_record(FINAL_PREFIX, good, {"host": "h-gone", "generation": {str(backing): gen}, "at": 1.0})
        client.put_record(FINAL_PREFIX, bad, {"host": "h-gone", "generation": {str(bad_backing): bad_gen + 1},
                                              "at": 1.0})

        async def hold() -> None:
            stopping = asyncio.Event()
            task = asyncio.ensure_future(keeper.run(stopping))
            try:
                deadline = time.monotonic() + 15
                while not {good, bad} <= set(keeper.restarted):
                    assert time.monotonic() < deadline, f"not restarted: {keeper.restarted}"
                    await asyncio.sleep(0.05)
            finally:
                stopping.set()
                await asyncio.wait_for(task, 30)

        asyncio.run(hold())
        assert keeper.restarted[good] == "defined and started", keeper.restarted
        assert backing.read_bytes() == content
        failover = client.record(FAILOVER_PREFIX, good)
        assert failover is not None and failover["host"] == "h-new" and failover["complete"] is True
        assert failover["restored_generation"] == {str(backing): gen} and failover["final_host"] == "h-gone"
        assert client.record(FINAL_PREFIX, good) is None  # consumed by the start

        assert keeper.restarted[bad].startswith("error: pmem not restored"), keeper.restarted
        failover = client.record(FAILOVER_PREFIX, bad)
        assert failover is not None and "does not see the final save" in failover["error"]
        assert not bad_backing.exists()
        assert held.lookup(good).state is not RunState.RUNNING  # fenced when the keeper stopped
        with pytest.raises(DomainNotFound):  # never defined, never started
            held.lookup(bad)
        # `ha status` shows both failover records
        rc, out, err = test_ha_cluster.cli(capsys, "ha", "status", "--json", *test_ha_cluster.paths_args(member))
        assert rc == 0, err
        rows = {r["domain"]: r for r in json.loads(out)}
        assert rows[good]["pmem"] == "shared-store" and rows[good]["failover"]["complete"] is True
        assert "error" in rows[bad]["failover"]
        rc, out, err = test_ha_cluster.cli(capsys, "ha", "status", *test_ha_cluster.paths_args(member))
        assert rc == 0 and "started:" in out and "complete" in out, out  # (the table wraps narrow columns)
    finally:
        keeper.client.close()
        keeper.work_client.close()
        for name in (good, bad):
            client.unprotect(name)
        client.close()
        try:
            dom = held.lookup(good)
            if dom.is_active():
                dom.destroy()
            held.conn.lookupByName(good).undefine()  # the test driver knows no undefine flags
        except DomainNotFound:
            pass
        held.close()
