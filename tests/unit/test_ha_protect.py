"""``hvext ha protect|unprotect|status`` and hvextd claiming and restarting protected domains, against a REAL
etcd member (temporary dir, free ports) and libvirt's test driver: the CLI stores the record, hvextd claims it
with its lease; when that hvextd is SIGKILLed its lease ends and another hvextd defines and starts the domain
from the stored XML; when two survivors race for the same orphans, each is claimed exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hvext.daemon import ha_loop
from hvext.daemon.config import HAConfig
from hvext.ha import cluster, protection
from hvext.ha.client import PROTECTED_PREFIX, Client, Protection, _b64
from hvext.ha.etcd import Layout
from hvext.host import RunState
from tests.unit import test_ha_cluster
from tests.unit.test_daemon import ROOT, _wait_for
from tests.unit.test_ha_cluster import cli, paths_args
from tests.unit import test_ha_fence
from tests.unit.test_ha_fence import MARGIN, TTL, XML
from tests.unit.testdriver import running_domain

member = test_ha_fence.member  # the etcd fixture (one member, torn down after the test)

pytestmark = test_ha_cluster.pytestmark  # the same requirements: root, etcd, openssl


def _status(capsys: pytest.CaptureFixture[str], lay: Layout, *domain: str) -> object:
    rc, out, err = cli(capsys, "ha", "status", *domain, "--json", *paths_args(lay))
    assert rc == 0, err
    return json.loads(out)


def _until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_protect_status_unprotect_and_the_keeper_claims_with_its_lease(member: Layout,  # noqa: F811
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    url = cluster.require_member(member).client_url
    config = HAConfig(cluster="test", etcd_endpoints=(url,), host="h-prot", lease_ttl=TTL, fence_margin=MARGIN,
                      credentials=member.pki_dir)
    paths = paths_args(member)
    with running_domain(XML, "prot") as dom:
        rc, out, err = cli(capsys, "-c", "test:///default", "ha", "protect", dom.name, "--host", "h-prot", *paths)
        assert rc == 0 and "protected" in out, err
        [row] = _status(capsys, member)  # type: ignore[misc]
        assert row["domain"] == dom.name and row["owner"] is None and row["home"] == "h-prot"
        assert row["state"] == "waiting for a claim" and abs(row["since"] - time.time()) < 30
        # refused, with `error: ...` and exit 1: twice, a missing domain, a status of an unprotected one
        rc, _, err = cli(capsys, "-c", "test:///default", "ha", "protect", dom.name, *paths)
        assert rc == 1 and err.startswith("error: ") and "already protected" in err
        rc, _, err = cli(capsys, "-c", "test:///default", "ha", "protect", f"{dom.name}-absent", *paths)
        assert rc == 1 and err.startswith("error: ")
        rc, _, err = cli(capsys, "ha", "status", f"{dom.name}-absent", *paths)
        assert rc == 1 and "not protected" in err

        keeper = ha_loop.Keeper(config, "h-prot", "test:///default")

        async def hold() -> None:
            stopping = asyncio.Event()
            task = asyncio.ensure_future(keeper.run(stopping))
            try:
                deadline = time.monotonic() + 10
                while keeper.owned != [dom.name] or dom.name not in keeper.restarted:
                    assert time.monotonic() < deadline, "the keeper never claimed the protected domain"
                    await asyncio.sleep(0.05)
                assert keeper.restarted[dom.name] == "already running"  # home host: it runs here already
                row = await asyncio.to_thread(_status, capsys, member, dom.name)
                assert row["owner"] == "h-prot" and row["state"] == "owned"  # type: ignore[index]
                assert 0 < row["lease_ttl"] <= TTL  # type: ignore[index]
                rc, out, _ = cli(capsys, "ha", "status", *paths)
                assert rc == 0 and "h-prot" in out and "owned" in out  # (the table may wrap long names)
                # `cluster status` fills the host's Owns column from the same owner key
                rc, out, _ = cli(capsys, "cluster", "status", "--json", *paths)
                host = next(h for h in json.loads(out)["hosts"] if h["name"] == "h-prot")
                assert host["owns"] == [dom.name]
                # `ha status --watch`: one JSON object per sample, each with the owner
                rc, out, err = await asyncio.to_thread(cli, capsys, "ha", "status", dom.name, "--watch", "0.2",
                                                       "--count", "2", "--json", *paths)
                samples = [json.loads(line) for line in out.splitlines()]
                assert rc == 0 and len(samples) == 2, err
                assert all(s["domains"][0]["owner"] == "h-prot" for s in samples)
                rc, _, err = cli(capsys, "ha", "status", "--count", "2", *paths)
                assert rc == 1 and "--count needs --watch" in err

                rc, out, err = cli(capsys, "ha", "unprotect", dom.name, *paths)
                assert rc == 0 and "no longer protected" in out, err
                assert _status(capsys, member) == []
                check = Client([url], member.credentials())
                try:
                    assert dom.name not in check.owners()
                finally:
                    check.close()
                rc, _, err = cli(capsys, "ha", "unprotect", dom.name, *paths)
                assert rc == 1 and err.startswith("error: ") and "not protected" in err
            finally:
                stopping.set()
                await asyncio.wait_for(task, 10)

        asyncio.run(hold())
        assert dom.state is RunState.RUNNING  # unprotect leaves it running


def policy_slack() -> float:
    """Beyond the TTL: a renewal interval for the survivor to notice, plus start-up and scheduling slack."""
    return TTL / 3 + 3.0


def _hvextd(tmp_path: Path, lay: Layout, host: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A real hvextd on its own ``test:///default`` (the test driver's domains are per process)."""
    url = cluster.require_member(lay).client_url
    config = tmp_path / f"{host}.toml"
    config.write_text(f'[ha]\ncluster = "test"\netcd_endpoints = ["{url}"]\nhost = "{host}"\n'
                      f'lease_ttl = {TTL}\nfence_margin = {MARGIN}\ncredentials = "{lay.pki_dir}"\n')
    state = tmp_path / f"{host}-state"
    state.mkdir()
    log = tmp_path / f"{host}.log"
    env = dict(os.environ, HVEXT_STATE_DIR=str(state), PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hvext.daemon.main", "-c", "test:///default",
                                 "--config", str(config)], stderr=out, env=env)
    return proc, log


def test_when_the_owners_hvextd_dies_another_hvextd_claims_defines_and_starts_it(
        member: Layout, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    url = cluster.require_member(member).client_url
    client = Client([url], member.credentials())
    daemons: list[subprocess.Popen[bytes]] = []
    with running_domain(XML, "failover") as dom:
        try:
            # The definition comes from this process's test driver; each hvextd has its own, without it.
            rc, _, err = cli(capsys, "-c", "test:///default", "ha", "protect", dom.name, "--host", "h-a",
                             *paths_args(member))
            assert rc == 0, err
            a, a_log = _hvextd(tmp_path, member, "h-a")
            daemons.append(a)
            # the home host's hvextd claims it with its lease (and, not having it, defines and starts it)
            _wait_for(a_log, f"protected domain {dom.name}: defined and started on this host")
            assert client.owners()[dom.name][0] == "h-a"
            b, b_log = _hvextd(tmp_path, member, "h-b")
            daemons.append(b)
            _until(lambda: "h-b" in client.hosts(), 20, "h-b registered")
            time.sleep(TTL)  # h-b, alive beside a live home, claims nothing
            assert client.owners()[dom.name][0] == "h-a" and "claimed" not in b_log.read_text()

            a.send_signal(signal.SIGKILL)  # abrupt: no revoke; h-a's lease ends TTL s after its last renewal
            a.wait()
            killed = time.monotonic()
            _wait_for(b_log, f"protected domain {dom.name}: defined and started on this host", timeout=TTL + 10)
            took = time.monotonic() - killed
            assert took <= TTL + policy_slack(), took
            assert f"claimed protected domain {dom.name} (home was h-a, whose lease ended)" in b_log.read_text()
            assert client.owners()[dom.name][0] == "h-b"
            records, _ = client.protected()
            assert records[dom.name].home == "h-b"
            rc, out, _ = cli(capsys, "cluster", "status", "--json", *paths_args(member))
            assert next(h for h in json.loads(out)["hosts"] if h["name"] == "h-b")["owns"] == [dom.name]
            assert b.poll() is None, b_log.read_text()
        finally:
            for proc in daemons:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            client.unprotect(dom.name)
            client.close()


def test_two_survivors_racing_for_orphans_claim_each_exactly_once(member: Layout) -> None:  # noqa: F811
    """Both survivors try every orphan (their grace has passed): the adopt transaction lets one win each."""
    url = cluster.require_member(member).client_url
    client = Client([url], member.credentials())
    names = [f"hvext-unit-{os.getpid()}-race{i}" for i in range(8)]
    bad = f"hvext-unit-{os.getpid()}-bad"
    keepers = [ha_loop.Keeper(HAConfig(cluster="test", etcd_endpoints=(url,), host=h, lease_ttl=TTL,
                                       fence_margin=MARGIN, credentials=member.pki_dir), h, "test:///default")
               for h in ("h-b", "h-c")]
    try:
        for name in names:  # protected on a host that is gone (never registered: no live key)
            assert client.protect(Protection(name, XML.format(name=name), "h-dead", time.time()))
        # a record hvext did not write stops nothing (one guest must not stop the protection of another)
        client._post("/kv/put", {"key": _b64(PROTECTED_PREFIX + bad), "value": _b64('{"xml": 5}')})
        for keeper in keepers:
            keeper.orphaned_since = {n: -1e9 for n in names}  # orphaned longer than any grace
            keeper.lease_id = client.grant(30).id
            client.register_host(keeper.host_name, keeper.lease_id)
        start = threading.Barrier(len(keepers))
        errors: list[BaseException] = []

        def race(keeper: ha_loop.Keeper) -> None:
            try:
                owners = keeper.client.owners()
                start.wait()
                keeper._claim(owners)
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        threads = [threading.Thread(target=race, args=(k,)) for k in keepers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not errors, errors
        won = [sorted(d for d, _ in k.claimed) for k in keepers]
        assert sorted(won[0] + won[1]) == sorted(names)  # every orphan claimed, none twice
        assert all(bad in k.bad_records for k in keepers) and bad not in client.owners()
        assert [r["state"] for r in protection.status(client) if r["domain"] == bad][0].startswith("invalid record")
        owners = client.owners()
        for keeper, mine in zip(keepers, won):
            assert all(owners[d] == (keeper.host_name, keeper.lease_id) for d in mine)
    finally:
        for keeper in keepers:
            if keeper.lease_id is not None:
                client.revoke(keeper.lease_id)
            keeper.client.close()
        for name in [*names, bad]:
            client.unprotect(name)
        client.close()


def test_a_stopping_keeper_fences_what_it_owns_and_leaves_at_once(member: Layout,  # noqa: F811
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A normal stop must not leave an owned domain running while another host claims it."""
    url = cluster.require_member(member).client_url
    config = HAConfig(cluster="test", etcd_endpoints=(url,), host="h-stop", lease_ttl=TTL, fence_margin=MARGIN,
                      credentials=member.pki_dir)
    with running_domain(XML, "stop") as dom:
        rc, _, err = cli(capsys, "-c", "test:///default", "ha", "protect", dom.name, "--host", "h-stop",
                         *paths_args(member))
        assert rc == 0, err
        keeper = ha_loop.Keeper(config, "h-stop", "test:///default")

        async def claim_then_stop() -> None:
            stopping = asyncio.Event()
            task = asyncio.ensure_future(keeper.run(stopping))
            deadline = time.monotonic() + 10
            while keeper.owned != [dom.name]:
                assert time.monotonic() < deadline, "the keeper never claimed the protected domain"
                await asyncio.sleep(0.05)
            stopping.set()
            await asyncio.wait_for(task, 10)

        asyncio.run(claim_then_stop())
        assert keeper.fenced == {dom.name: "fenced"}
        assert dom.state is RunState.SHUTOFF
        check = Client([url], member.credentials())
        try:  # the lease was revoked, not left to expire: the host and its owner key are gone now
            assert "h-stop" not in check.hosts() and dom.name not in check.owners()
            assert dom.name in check.protected()[0]  # still protected: a survivor claims and restarts it
        finally:
            check.close()
