"""``[ha]`` on SIGHUP: a real hvextd (``-c test:///default``) against a REAL etcd member changes its lease TTL
and fence margin without a restart (its host key and owner keys move to a new lease of the new TTL in one
transaction, the old lease is revoked, the protected domain keeps running), and says which keys need a
restart (``host``: the running value stays). Also the keeper's guard while a lease move's outcome is unknown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


from hvext.daemon import ha_loop
from hvext.daemon.config import HAConfig
from hvext.ha import cluster
from hvext.ha.client import Client, Protection
from hvext.ha.etcd import Layout
from tests.unit import test_ha_cluster, test_ha_fence
from tests.unit.test_daemon import ROOT, _wait_for
from tests.unit.test_ha_fence import MARGIN, TTL, XML

member = test_ha_fence.member  # the etcd fixture (one member, torn down after the test)

pytestmark = test_ha_cluster.pytestmark  # the same requirements: root, etcd, openssl


def _config(lay: Layout, host: str, ttl: int, margin: float) -> str:
    url = cluster.require_member(lay).client_url
    return (f'[ha]\ncluster = "test"\netcd_endpoints = ["{url}"]\nhost = "{host}"\n'
            f'lease_ttl = {ttl}\nfence_margin = {margin}\ncredentials = "{lay.pki_dir}"\n')


def _until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def test_sighup_changes_the_lease_ttl_without_a_restart_and_names_keys_that_need_one(
        member: Layout, tmp_path: Path) -> None:  # noqa: F811
    url = cluster.require_member(member).client_url
    client = Client([url], member.credentials())
    name = f"hvext-unit-{os.getpid()}-hup"
    config = tmp_path / "hvextd.toml"
    config.write_text(_config(member, "h-hup", TTL, MARGIN))
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "hvextd.log"
    assert client.protect(Protection(name, XML.format(name=name), "h-hup", time.time()))
    with open(log, "w") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "hvext.daemon.main", "-c", "test:///default",
                                   "--config", str(config)], stderr=out,
                                  env=dict(os.environ, HVEXT_STATE_DIR=str(state), PYTHONPATH=str(ROOT)))
    try:
        _wait_for(log, f"protected domain {name}: defined and started on this host")
        old = client.hosts()["h-hup"]
        assert client.lease(old).granted_ttl == TTL and client.owners()[name] == ("h-hup", old)

        new_ttl = 7
        config.write_text(_config(member, "h-renamed", new_ttl, 2.5))
        daemon.send_signal(signal.SIGHUP)
        text = _wait_for(log, "(a new lease at the next renewal)")
        assert f"lease_ttl {TTL} -> {new_ttl}, fence_margin {MARGIN} -> 2.5 in effect now" in text
        assert "[ha] host changed: this needs an hvextd restart" in text

        def moved() -> bool:
            lease = client.hosts().get("h-hup")  # the running host name stays
            return lease is not None and lease != old and client.lease(lease).granted_ttl == new_ttl
        _until(moved, 10, "the host key on a lease of the new TTL")
        new = client.hosts()["h-hup"]
        assert client.owners()[name] == ("h-hup", new)  # the owner key moved with it: never unowned
        _until(lambda: client.lease(old).ttl == -1, 0.5, "the old lease revoked")  # not just expiring
        assert "h-renamed" not in client.hosts()
        # Held with the new TTL: renewed (TTL/3 = 2.3 s) for longer than the old TTL, nothing fenced.
        time.sleep(2 * TTL + 1)
        assert client.hosts()["h-hup"] == new and client.owners()[name] == ("h-hup", new)
        assert "fencing" not in log.read_text() and daemon.poll() is None, log.read_text()
        text = _wait_for(log, f"holding lease {new:x} (TTL {new_ttl} s) instead of {old:x} (TTL {TTL} s)")

        # A bad [ha] value: the reload is refused and the lease stays as it is.
        config.write_text(_config(member, "h-hup", 1, 0.5))
        daemon.send_signal(signal.SIGHUP)
        _wait_for(log, "lease_ttl: must be a whole number of seconds from 2 to 300")
        assert client.hosts()["h-hup"] == new

        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        client.unprotect(name)
        client.close()


def test_while_a_lease_move_is_unknown_the_watchdog_guards_the_earlier_expiry(tmp_path: Path) -> None:
    config = HAConfig(cluster="t", etcd_endpoints=("https://127.0.0.1:1",), host="h", lease_ttl=10,
                      fence_margin=1.0, credentials=tmp_path)
    keeper = ha_loop.Keeper(config, "h", "test:///default", clock=lambda: 100.0)
    try:
        keeper.last_renewal, keeper.lease_ttl = 100.0, 10
        assert keeper.guard() == (100.0, 10.0, 1.0)
        keeper.pending = (7, 3, 101.0)  # a 3 s lease (renewed at 101) may hold the keys: it ends at 104
        last, ttl, margin = keeper.guard()
        assert last + ttl == 104.0 and margin == 1.0
        keeper.pending = (7, 30, 101.0)  # a longer one: the held lease's end (110) comes first
        assert keeper.guard() == (100.0, 10.0, 1.0)
        # A margin raised by a reload beyond the held lease's TTL is kept below it.
        keeper.pending = None
        assert keeper.reconfigure(HAConfig(cluster="t", etcd_endpoints=config.etcd_endpoints, host="h",
                                           lease_ttl=40, fence_margin=20.0, credentials=tmp_path)) == []
        assert keeper.guard() == (100.0, 10.0, 5.0)
        assert keeper.reconfigure(HAConfig(cluster="t", etcd_endpoints=("https://127.0.0.2:1",), host="x",
                                           lease_ttl=40, fence_margin=1.0, credentials=tmp_path)) \
            == ["host", "etcd_endpoints"]
        assert keeper.config.host == "h" and keeper.config.etcd_endpoints == config.etcd_endpoints
    finally:
        keeper.client.close()
