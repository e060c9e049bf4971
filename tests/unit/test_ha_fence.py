"""hvextd's HA loop (hvext.daemon.ha_loop) against a REAL etcd member (temporary dir, free ports) and a real
libvirt domain on the test driver: the lease is held while etcd answers; when etcd stops answering
(SIGSTOP) the owned domain is paused and destroyed before the lease's TTL could have run out; when etcd
answers again the old lease (and with it the owner key) is revoked and a new lease is held.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext.daemon import ha_loop
from hvext.daemon.config import HAConfig
from hvext.errors import ClusterUnavailable
from hvext.ha import cluster, etcd, policy
from hvext.ha.client import Client
from hvext.ha.etcd import Layout
from hvext.host import RunState
from tests.unit import test_ha_cluster
from tests.unit.test_ha_cluster import free_ports, layout
from tests.unit.test_daemon import ROOT, _wait_for
from tests.unit.testdriver import PLAIN_XML, running_domain

pytestmark = test_ha_cluster.pytestmark  # the same requirements: root, etcd, openssl

XML = PLAIN_XML
TTL = 2
MARGIN = 0.5


@pytest.fixture
def member(tmp_path: Path) -> Iterator[Layout]:
    lay = layout(tmp_path, "a")
    client_port, peer_port = free_ports(2)
    try:
        cluster.init(lay, "a", "test", "127.0.0.1", client_port, peer_port)
        yield lay
    finally:
        pid = etcd.running_pid(lay)
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        etcd.stop(lay)


async def _until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def test_holds_its_lease_then_fences_its_domain_when_etcd_stops_answering(member: Layout) -> None:
    saved = Layout.credentials(member)
    url = cluster.require_member(member).client_url
    config = HAConfig(cluster="test", etcd_endpoints=(url,), host="h-fence", lease_ttl=TTL, fence_margin=MARGIN,
                      credentials=member.pki_dir)
    fenced_at: list[float] = []

    def fence(uri: str | None, names: list[str]) -> dict[str, str]:
        fenced_at.append(time.monotonic())
        return ha_loop.fence_domains(uri, names)

    with running_domain(XML, "fence") as dom:
        keeper = ha_loop.Keeper(config, "h-fence", "test:///default", fence=fence)
        other = Client([url], saved)

        async def scenario() -> None:
            stopping = asyncio.Event()
            task = asyncio.ensure_future(keeper.run(stopping))
            try:
                await _until(lambda: keeper.lease_id is not None, 10, "a lease")
                first_lease = keeper.lease_id
                assert "h-fence" in await asyncio.to_thread(other.hosts)
                assert await asyncio.to_thread(other.claim, dom.name, "h-fence", first_lease)
                await _until(lambda: keeper.owned == [dom.name], 5, "the keeper sees what it owns")
                await asyncio.sleep(TTL * 1.5)  # etcd answers: renewed past its TTL, no fence
                assert keeper.fenced is None and keeper.lease_id == first_lease
                assert dom.state is RunState.RUNNING

                pid = etcd.running_pid(member)
                assert pid is not None
                os.kill(pid, signal.SIGSTOP)
                try:
                    await _until(lambda: keeper.fenced is not None, TTL + 3, "a fence")
                    assert keeper.last_renewal is not None
                    since = fenced_at[0] - keeper.last_renewal
                    margin = keeper.guard()[2]  # MARGIN, widened by the fence path's measured latency
                    assert MARGIN <= margin <= TTL / 2, margin
                    # before the lease could end, not before needed
                    assert TTL - margin <= since < TTL, (since, margin)
                    assert keeper.fenced == {dom.name: "fenced"}
                    assert dom.state is RunState.SHUTOFF
                finally:
                    os.kill(pid, signal.SIGCONT)
                # etcd answers again: the old lease is revoked (its owner key with it), a new one held.
                await _until(lambda: keeper.lease_id not in (None, first_lease) and not keeper.stale_leases, 15,
                             "a new lease, the old one revoked")
                owners = await asyncio.to_thread(other.owners)
                assert dom.name not in owners and keeper.owned == []
                assert "h-fence" in await asyncio.to_thread(other.hosts)
            finally:
                stopping.set()
                await asyncio.wait_for(task, 10)

        try:
            asyncio.run(scenario())
        finally:
            other.close()
    # The keeper stopped owning nothing: its lease was revoked at once, so the host key is gone.
    check = Client([url], saved)
    try:
        assert "h-fence" not in check.hosts()
    finally:
        check.close()


def test_fence_of_a_missing_domain_is_reported_and_others_still_fenced(tmp_path: Path) -> None:
    with running_domain(XML, "fence2") as dom:
        result = ha_loop.fence_domains("test:///default", [f"hvext-unit-{os.getpid()}-absent", dom.name])
        assert result[dom.name] == "fenced" and dom.state is RunState.SHUTOFF
        assert result[f"hvext-unit-{os.getpid()}-absent"].startswith("error: ")


def test_hvextd_with_ha_fences_the_domain_it_owns_when_etcd_stops(member: Layout, tmp_path: Path) -> None:
    """The real daemon process (``-c test:///default``, whose built-in domain ``test`` runs): with ``[ha]`` it
    registers this host; given ownership of ``test``, it fences it when its etcd member is SIGSTOPped."""
    url = cluster.require_member(member).client_url
    config = tmp_path / "hvextd.toml"
    config.write_text(f'[ha]\ncluster = "test"\netcd_endpoints = ["{url}"]\nhost = "h-daemon"\n'
                      f'lease_ttl = {TTL}\nfence_margin = {MARGIN}\ncredentials = "{member.pki_dir}"\n')
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "hvextd.log"
    env = dict(os.environ, HVEXT_STATE_DIR=str(state), PYTHONPATH=str(ROOT))
    client = Client([url], member.credentials())
    with open(log, "w") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "hvext.daemon.main", "-c", "test:///default",
                                   "--config", str(config)], stderr=out, env=env)
    pid = etcd.running_pid(member)
    assert pid is not None
    try:
        deadline = time.monotonic() + 20
        while "h-daemon" not in (hosts := client.hosts()):
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert client.claim("test", "h-daemon", hosts["h-daemon"])
        _wait_for(log, "holding lease")
        time.sleep(policy.renew_interval(TTL) * 2)  # a renewal reads the ownership
        os.kill(pid, signal.SIGSTOP)
        try:
            _wait_for(log, "fence test: fenced", timeout=TTL + 5)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert daemon.poll() is None, log.read_text()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        client.close()


def test_a_renewal_counts_when_the_lease_is_renewed_not_when_the_rounds_reads_end(member: Layout) -> None:
    """A round whose keepalive succeeds but whose later reads are slow (each endpoint tried in turn while a
    dead member's times out, as after a host failure in the lab, where this fenced the survivors) must not
    fence: the lease was renewed at the keepalive, and the next round starts one interval after this one
    started, not after it ended. The slow read (1.2 s) ends after the previous round's deadline
    (TTL - margin = 1.5 s after it was sent)."""
    url = cluster.require_member(member).client_url
    config = HAConfig(cluster="test", etcd_endpoints=(url,), host="h-slow", lease_ttl=TTL, fence_margin=MARGIN,
                      credentials=member.pki_dir)
    fenced: list[list[str]] = []

    def fence(uri: str | None, names: list[str]) -> dict[str, str]:
        fenced.append(names)
        return {n: "fenced" for n in names}

    keeper = ha_loop.Keeper(config, "h-slow", "test:///default", fence=fence)
    other = Client([url], member.credentials())
    slow = {"rounds": 0}
    owners = keeper.client.owners

    def slow_owners() -> dict[str, tuple[str, int]]:
        if slow["rounds"] > 0:
            slow["rounds"] -= 1
            time.sleep(1.2)
        return owners()
    keeper.client.owners = slow_owners  # type: ignore[method-assign]

    async def scenario() -> None:
        stopping = asyncio.Event()
        task = asyncio.ensure_future(keeper.run(stopping))
        try:
            await _until(lambda: keeper.lease_id is not None, 10, "a lease")
            assert await asyncio.to_thread(other.claim, "h-slow-domain", "h-slow", keeper.lease_id)
            await _until(lambda: keeper.owned == ["h-slow-domain"], 5, "the keeper sees what it owns")
            slow["rounds"] = 2  # two slow rounds in a row
            await asyncio.sleep(TTL * 2)
            assert fenced == [] and keeper.fenced is None, fenced
            assert keeper.owned == ["h-slow-domain"]
        finally:
            stopping.set()
            await asyncio.wait_for(task, 10)

    try:
        asyncio.run(scenario())
    finally:
        other.close()


def test_a_keepalive_not_confirmed_by_a_quorum_read_does_not_count(member: Layout) -> None:
    """etcd 3.4 lets a leader cut off from its quorum renew leases in its memory until it steps down
    (a lab partition of the leader's host: its hvextd renewed 1.5 s after the cut and paused 5.5 s
    after it, TTL 5 s). Such a member answers the keepalive but not the quorum read that follows; the
    renewal must not move the watchdog's deadline."""
    url = cluster.require_member(member).client_url
    config = HAConfig(cluster="test", etcd_endpoints=(url,), host="h-stale", lease_ttl=TTL, fence_margin=MARGIN,
                      credentials=member.pki_dir)
    now = [100.0]
    keeper = ha_loop.Keeper(config, "h-stale", "test:///default", clock=lambda: now[0])
    try:
        keeper._renew_once()  # a lease granted at 100
        assert keeper.lease_id is not None and keeper.last_renewal == 100.0
        now[0] = 100.5
        keeper._renew_once()  # renewed and confirmed by a real quorum read
        assert keeper.last_renewal == 100.5
        now[0] = 101.0

        def cut_off() -> None:
            raise ClusterUnavailable(f"etcd at {url} does not answer: (a leader without its quorum)")
        keeper.client.confirm = cut_off  # type: ignore[method-assign]
        with pytest.raises(ClusterUnavailable):
            keeper._renew_once()
        assert keeper.last_renewal == 100.5
        keeper.client.revoke(keeper.lease_id)
    finally:
        keeper.client.close()
        keeper.work_client.close()
        keeper.fence_pool.shutdown()


def test_a_slow_fence_path_moves_the_watchdogs_deadline_earlier(tmp_path: Path) -> None:
    """After a renewal the keeper times the fence's path (libvirt looked up as the fence does it) on a
    fake clock: 1.3 s there, as the loaded CI run's late pause, widens the margin of a 5 s lease from
    1 s to 2.5 s, so that the watchdog fences 2.6 s after the last renewal (with the configured margin
    alone it would wait until 4 s, and the pause would land after the lease could have ended)."""
    now = [100.0]
    probed: list[list[str]] = []

    def slow_probe(uri: str | None, names: list[str]) -> None:
        probed.append(names)
        now[0] += 1.3

    config = HAConfig(cluster="t", etcd_endpoints=("https://127.0.0.1:1",), host="h", lease_ttl=5,
                      fence_margin=1.0, credentials=tmp_path)
    keeper = ha_loop.Keeper(config, "h", "test:///default", clock=lambda: now[0], probe=slow_probe)
    try:
        keeper.last_renewal, keeper.lease_ttl, keeper.owned = 100.0, 5, ["vm1"]
        assert keeper.guard() == (100.0, 5.0, 1.0)

        async def renewed() -> None:
            keeper._kick_probe()
            assert keeper.probing is not None
            await keeper.probing
        asyncio.run(renewed())
        assert probed == [["vm1"]] and keeper.changed.is_set()  # the watchdog computes its deadline again
        last, ttl, margin = keeper.guard()
        assert margin == 2.5
        assert policy.fence_decision(last, 102.6, ttl, margin) is policy.Fence.FENCE
        assert policy.fence_decision(last, 102.6, ttl, config.fence_margin) is policy.Fence.RUN
    finally:
        keeper.client.close()
        keeper.work_client.close()
        keeper.fence_pool.shutdown()


def test_the_fence_path_probe_looks_the_domains_up_without_touching_them() -> None:
    with running_domain(XML, "probe") as dom:
        ha_loop.probe_domains("test:///default", [dom.name, "no-such-domain"])
        assert dom.is_active() and dom.state is RunState.RUNNING  # looked up, not paused
