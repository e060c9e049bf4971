"""C16 replication end to end in one process: a real etcd member, libvirt's test driver for the domain,
a real PMEM backing file, the owner's Replicator and two replica listeners over real TLS."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hvext.errors import HAError
from hvext.ha import peer, replication
from hvext.ha.client import Client, Protection
from hvext.ha.etcd import Layout
from hvext.ha import cluster
from hvext.host import RunState
from hvext.pmem import devices
from tests.unit import test_ha_fence
from tests.unit.test_ha_cluster import free_ports
from tests.unit.testdriver import running_domain

member = test_ha_fence.member  # the etcd fixture (one member, torn down after the test)

SIZE = 2 << 20
BS = replication.BLOCK_SIZE
NV_XML = ("<domain type='test'><name>{{name}}</name><maxMemory slots='4' unit='MiB'>4096</maxMemory>"
          "<memory unit='MiB'>256</memory><os><type>hvm</type></os>"
          "<cpu><numa><cell id='0' cpus='0' memory='256' unit='MiB'/></numa></cpu>"
          "<devices>{device}</devices></domain>")


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def _write(path: Path, rng: random.Random, blocks: int = 3) -> None:
    with open(path, "r+b") as f:
        for block in rng.sample(range(SIZE // BS), blocks):
            f.seek(block * BS + rng.randrange(BS - 100))
            f.write(rng.randbytes(100))


@pytest.fixture
def setup(member: Layout, tmp_path: Path) -> Iterator[dict]:  # noqa: F811
    url = cluster.require_member(member).client_url
    creds = member.credentials()

    def factory() -> Client:
        return Client([url], creds)
    client = factory()
    lease = client.grant(60)
    ports = free_ports(2)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    client.register_host("r-own", lease.id)
    managers = {}
    for name, port in zip(("r-a", "r-b"), ports):
        client.register_host(name, lease.id, peer=f"127.0.0.1:{port}")
        managers[name] = replication.Manager(name, "test:///default", creds, factory, 0.2, port, "127.0.0.1", state)
        managers[name].start_server()
    try:
        yield {"client": client, "creds": creds, "factory": factory, "lease": lease, "ports": ports,
               "state": state, "managers": managers}
    finally:
        for m in managers.values():
            m.close()
        client.revoke(lease.id)
        client.close()


def test_replicas_follow_whole_epochs_one_dies_the_battery_drains_and_a_replica_restores(
        setup: dict, tmp_path: Path) -> None:
    client, creds, state = setup["client"], setup["creds"], setup["state"]
    rng = random.Random(7)
    backing = tmp_path / "pmem0.img"
    backing.write_bytes(rng.randbytes(SIZE // 2) + bytes(SIZE // 2))
    backing.chmod(0o600)
    xml = NV_XML.format(device=devices.device_xml(backing, SIZE))
    with running_domain(xml, "repl") as dom:
        pmem = {"mode": "replicas", "replicas": ["r-a", "r-b"],
                "devices": [{"name": "pmem0", "size": SIZE, "backing": str(backing), "model": "nvdimm"}]}
        record = Protection(dom.name, "<domain/>", "r-own", time.time(), pmem=pmem)
        assert client.claim(dom.name, "r-own", setup["lease"].id)
        rep = replication.Replicator(record, "r-own", "test:///default", creds, setup["factory"], 0.2, 0, state)
        images = {h: replication.replica_dir(h, dom.name, state, create=False) / "pmem0.img" for h in ("r-a", "r-b")}
        rep.start()
        try:
            def synced(hosts: tuple[str, ...]) -> bool:
                with rep.lock:
                    epoch, content = rep.epoch, backing.read_bytes()
                    return epoch > 0 and all(rep.acks[h].get("epoch") == epoch for h in hosts) and all(
                        images[h].read_bytes() == content for h in hosts)
            _until(lambda: synced(("r-a", "r-b")), 20, "both replicas hold the first (full) epoch")
            first = rep.epoch
            assert rep.logs[0].epochs == [] or rep.logs[0].epochs[0].epoch > first - 1
            for _ in range(3):  # the guest writes; each change reaches both replicas as whole epochs
                _write(backing, rng)
                _until(lambda: rep.epoch > first and synced(("r-a", "r-b")), 20, "both replicas follow")
                first = rep.epoch
            assert (state / "ha" / "log" / "r-own" / dom.name).stat().st_mode & 0o777 == 0o700
            assert images["r-a"].stat().st_mode & 0o777 == 0o600
            # A host that is not the owner in etcd (a stale, fenced owner) is refused by the replicas.
            with peer.Connection(creds, "127.0.0.1", setup["ports"][0]) as conn:
                with pytest.raises(peer.PeerError, match="not the owner"):
                    conn.request({"op": "hello", "domain": dom.name, "owner": "r-stale", "stream": "x",
                                  "devices": [{"name": "pmem0", "size": SIZE}]})
            # One replica dies: protection goes on with the other, and the status says so.
            setup["managers"]["r-b"].close()
            _write(backing, rng)
            _until(lambda: rep.epoch > first and synced(("r-a",)), 20, "the live replica follows")
            _until(lambda: "error" in rep.acks["r-b"], 10, "the dead replica's error")
            rep.publish()
            progress = client.records(replication.REPLICATION_PREFIX)[dom.name]
            fields = replication.status_fields(record, progress, None, list(client.hosts()))
            rows = {r["host"]: r for r in fields["replicas"]}
            assert rows["r-a"]["acked_epoch"] == progress["epoch"] or rows["r-a"]["state"] == "behind"
            assert rows["r-b"]["state"].startswith("unreachable") and rows["r-b"]["lag_epochs"] > 0
            assert rows["r-b"]["lag_bytes"] > 0 and fields["epoch_local"] == progress["epoch"]
            # The battery path: the guest stays paused, the final epoch reaches the live replica.
            _write(backing, rng)
            report = rep.battery(time.monotonic() + 10)
            assert "error" not in report, report
            assert report["epoch"] == rep.epoch and report["acked"]["r-a"] == report["epoch"]
            assert dom.state is RunState.PAUSED
            final = client.record(replication.FINAL_PREFIX, dom.name)
            assert final is not None and final["epoch"] == report["epoch"] and final["host"] == "r-own"
            expected = backing.read_bytes()
            assert images["r-a"].read_bytes() == expected
        finally:
            rep.stop()
    # The survivor restores the backing from its replica: every byte of the final epoch.
    backing.unlink()
    with pytest.raises(HAError, match="not a replica"):
        replication.restore_from_replica(record, "r-own", uri="test:///default", final=final, state_dir=state)
    restored = replication.restore_from_replica(record, "r-a", uri="test:///default", final=final, state_dir=state)
    assert restored.ok and restored.epoch == final["epoch"] and restored.complete is True
    assert backing.read_bytes() == expected
    assert not [p for p in backing.parent.iterdir() if ".replica-" in p.name]  # no temp file left
    os.unlink(backing)


def test_protect_with_replicas_records_devices_and_live_hosts_and_status_shows_them(
        setup: dict, member: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    from tests.unit.test_ha_cluster import cli, paths_args
    import json
    backing = tmp_path / "pmem0.img"
    backing.write_bytes(bytes(SIZE))
    xml = NV_XML.format(device=devices.device_xml(backing, SIZE))
    paths = paths_args(member)
    with running_domain(xml, "prot") as dom:
        # three live hosts besides none here: r-own, r-a, r-b; r-own protects: 3 replicas cannot be found
        rc, _, err = cli(capsys, "-c", "test:///default", "ha", "protect", dom.name, "--host", "r-own",
                         "--replicas", "3", *paths)
        assert rc == 1 and err.startswith("error: ") and "only 2 other live host(s)" in err
        rc, _, err = cli(capsys, "-c", "test:///default", "ha", "protect", dom.name, "--replicas", "1",
                         "--via-shared-store", str(tmp_path), *paths)
        assert rc == 1 and "exclude each other" in err
        rc, out, err = cli(capsys, "-c", "test:///default", "ha", "protect", dom.name, "--host", "r-own",
                           "--replicas", "2", "--json", *paths)
        assert rc == 0, err
        result = json.loads(out)
        assert result["pmem"]["mode"] == "replicas" and sorted(result["pmem"]["replicas"]) == ["r-a", "r-b"]
        assert result["pmem"]["devices"] == [{"name": "pmem0", "size": SIZE, "backing": str(backing),
                                              "model": "nvdimm"}]
        record = setup["client"].protected()[0][dom.name]
        assert record.pmem == result["pmem"]
        rc, out, err = cli(capsys, "ha", "status", dom.name, "--json", *paths)
        row = json.loads(out)
        assert rc == 0 and row["pmem"] == "replicas", err
        assert [r["host"] for r in row["replication"]["replicas"]] == ["r-a", "r-b"]
        assert all(r["acked_epoch"] == 0 and r["state"] == "waiting for the first epoch"
                   for r in row["replication"]["replicas"])
        rc, out, _ = cli(capsys, "ha", "status", *paths)
        assert rc == 0 and "r-a" in out and "r-b" in out
        setup["client"].put_record(replication.REPLICATION_PREFIX, dom.name, {"owner": "r-own", "epoch": 3})
        assert cli(capsys, "ha", "unprotect", dom.name, *paths)[0] == 0
        assert setup["client"].record(replication.REPLICATION_PREFIX, dom.name) is None  # gone with it
    # a domain with more pmem than one full epoch message takes is refused, not replicated badly
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        f.truncate(replication.MAX_DOMAIN_PMEM + (2 << 20))
    with running_domain(NV_XML.format(device=devices.device_xml(big, replication.MAX_DOMAIN_PMEM + (2 << 20))),
                        "big") as dom:
        rc, _, err = cli(capsys, "-c", "test:///default", "ha", "protect", dom.name, "--host", "r-own",
                         "--replicas", "1", *paths)
        assert rc == 1 and "at most" in err and setup["client"].protected()[0].get(dom.name) is None
    # a domain without pmem cannot be replicated
    from tests.unit.testdriver import PLAIN_XML
    with running_domain(PLAIN_XML, "plain") as dom:
        rc, _, err = cli(capsys, "-c", "test:///default", "ha", "protect", dom.name, "--host", "r-own",
                         "--replicas", "1", *paths)
        assert rc == 1 and "no pmem device" in err


def test_the_battery_path_takes_the_default_budget_and_never_raises(member: Layout) -> None:  # noqa: F811
    """hvextd's SIGPWR handler calls it with ``[power] budget`` unset (None); it must not raise (hvextd's
    main loop runs the C12/C13 saves after it, and an exception there ended hvextd)."""
    from hvext.daemon import ha_loop
    from hvext.daemon.config import HAConfig
    url = cluster.require_member(member).client_url
    config = HAConfig(cluster="test", etcd_endpoints=(url,), host="r-bat", credentials=member.pki_dir,
                      peer_port=free_ports(1)[0])
    keeper = ha_loop.Keeper(config, "r-bat", "test:///default")
    try:
        assert keeper.replication_battery(None) == []

        def broken(budget: float) -> list[dict]:
            raise RuntimeError("a bug")
        keeper.replication.battery = broken  # type: ignore[method-assign]
        assert keeper.replication_battery(5.0) == []
    finally:
        keeper.client.close()


def test_a_cut_pauses_the_guest_only_to_copy_blocks_hashing_and_encoding_run_after_it(
        setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pause is what the guest pays for replication: it must hold only the dirty-list query and the
    copy of the candidate blocks; hashing them and building the log entries happen with the guest running
    again (each block is hashed once per cut: a hash call observes the run state at that moment)."""
    from hvext.host import Host
    rng = random.Random(11)
    backing = tmp_path / "pmem0.img"
    backing.write_bytes(rng.randbytes(SIZE // 2) + bytes(SIZE // 2))
    backing.chmod(0o600)
    xml = NV_XML.format(device=devices.device_xml(backing, SIZE))
    with running_domain(xml, "pause") as dom, Host("test:///default") as host:
        pmem = {"mode": "replicas", "replicas": ["r-a"],
                "devices": [{"name": "pmem0", "size": SIZE, "backing": str(backing), "model": "nvdimm"}]}
        record = Protection(dom.name, "<domain/>", "r-own", time.time(), pmem=pmem)
        rep = replication.Replicator(record, "r-own", "test:///default", setup["creds"], setup["factory"], 60, 0,
                                     setup["state"])  # not started: this test cuts by hand
        seen: list[RunState] = []
        real = replication.hashlib.blake2b

        def observed(*args: object, **kwargs: object) -> object:
            seen.append(host.lookup(dom.name).state)
            return real(*args, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setattr(replication.hashlib, "blake2b", observed)
        try:
            first = rep.cut()
            assert first is not None and first.full and rep.epoch == 1
            assert len(seen) == SIZE // BS and set(seen) == {RunState.RUNNING}, set(seen)
            assert rep.last_cut["copied"] == SIZE // BS and rep.last_cut["changed"] == SIZE // BS
            assert 0 < rep.last_cut["paused_s"] <= rep.last_cut["total_s"]
            seen.clear()
            _write(backing, rng, blocks=2)
            second = rep.cut()  # the test driver has no dirty list: every block is compared by hash
            assert second is not None and not second.full and second.entries == 2
            assert rep.last_cut["changed"] == 2 and set(seen) == {RunState.RUNNING}
            assert rep.cut() is None and rep.last_cut["changed"] == 0  # nothing changed: no epoch
            assert host.lookup(dom.name).state is RunState.RUNNING
        finally:
            for lg in rep.logs:
                lg.close()
            rep.client.close()


def test_each_hvextd_removes_its_replicas_and_logs_of_a_domain_once_it_is_unprotected(setup: dict) -> None:
    """After ``ha unprotect`` every replica host's hvextd deletes its own image and log of the domain (lab
    hosts share STATE_DIR: another host's files are that host's to delete); a domain still protected in etcd
    keeps its files even when the caller's snapshot of the records is stale, and so does one replicated here."""
    client, state = setup["client"], setup["state"]
    gone, kept = f"hvext-unit-{os.getpid()}-unprotected", f"hvext-unit-{os.getpid()}-protected"
    files = []
    for host in ("r-a", "r-b"):
        for domain in (gone, kept):
            for directory in (replication.replica_dir(host, domain, state), replication.log_dir(host, domain, state)):
                (directory / "pmem0.img").write_bytes(b"guest data")
                files.append(directory)
    pmem = {"mode": "replicas", "replicas": ["r-a", "r-b"],
            "devices": [{"name": "pmem0", "size": SIZE, "backing": "/dev/shm/x", "model": "nvdimm"}]}
    assert client.protect(Protection(kept, "<domain/>", "r-own", time.time(), pmem=pmem))
    try:
        # r-a, called with a stale (empty) snapshot of the records: etcd is asked again.
        removed = setup["managers"]["r-a"].collect(set())
        assert sorted(removed) == sorted(str(d) for d in files[:2]), removed
        assert [d for d in files if d.exists()] == files[2:]
        # r-b's hvextd finds its own leftovers by itself (its sync loop), after the record is deleted too.
        setup["managers"].pop("r-b").close()
        port = free_ports(1)[0]
        r_b = setup["managers"]["r-b"] = replication.Manager("r-b", "test:///default", setup["creds"],
                                                             setup["factory"], 0.2, port, "127.0.0.1", state)
        r_b.collect_every = 0.0
        r_b.start(lambda: ({d: r for d, r in client.protected()[0].items()}, []))
        _until(lambda: not any(d.exists() for d in files[4:6]), 10, "r-b removes its unprotected domain's files")
        assert all(d.exists() for d in (files[2], files[3], files[6], files[7]))  # still protected
        assert client.unprotect(kept)
        _until(lambda: not any(d.exists() for d in files[6:]), 10, "r-b removes the files once it is unprotected")
        assert files[2].exists() and files[3].exists()  # r-a's: r-a's hvextd deletes them, not r-b's
        assert sorted(setup["managers"]["r-a"].collect(set())) == sorted(str(d) for d in files[2:4])
    finally:
        client.unprotect(kept)
        for domain in (gone, kept):
            replication.remove_state(domain, state)
