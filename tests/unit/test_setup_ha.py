"""``setup/host.sh ha`` (run after boot): this host's etcd member, if ``hvext cluster init/join`` made one, then
hvextd, if it has a config, each only unless it runs; a REAL etcd member and hvextd (``-c test:///default``) in
temporary directories (hvext's HVEXT_* variables), after a simulated reboot (the member stopped)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hvext.daemon import service
from hvext.ha import cluster, etcd
from hvext.ha.client import Client
from tests.unit import test_ha_cluster
from tests.unit.test_daemon import ROOT
from tests.unit.test_ha_cluster import free_ports, layout

pytestmark = test_ha_cluster.pytestmark  # root, etcd, openssl


def _setup_ha(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "setup" / "host.sh"), "ha"], capture_output=True, text=True,
                          timeout=120, env=env)


def test_setup_starts_the_member_then_hvextd_and_again_changes_nothing(tmp_path: Path) -> None:
    lay = layout(tmp_path, "boot")
    env = dict(os.environ, HVEXT_STATE_DIR=str(lay.state_dir), HVEXT_RUN_DIR=str(lay.run_dir),
               HVEXT_LOG_DIR=str(lay.log_dir), HVEXT_CONFIG=str(tmp_path / "hvextd.toml"),
               HVEXT_VENV=str(Path(sys.executable).parents[1]), HVEXT_DAEMON_URI="test:///default")
    # Nothing of hvext's on this host: nothing to start, and that is fine.
    done = _setup_ha(env)
    assert done.returncode == 0, done.stderr
    assert "no cluster member" in done.stdout and "no hvextd config" in done.stdout

    client_port, peer_port = free_ports(2)
    cluster.init(lay, "boot", "test", "127.0.0.1", client_port, peer_port)
    url = cluster.require_member(lay).client_url
    etcd.stop(lay)  # the reboot: member.json stays, nothing runs
    (tmp_path / "hvextd.toml").write_text(
        f'[ha]\ncluster = "test"\netcd_endpoints = ["{url}"]\nhost = "h-boot"\nlease_ttl = 2\n'
        f'fence_margin = 0.5\ncredentials = "{lay.pki_dir}"\n')
    pid_file = lay.run_dir / "hvextd.pid"
    client = None
    try:
        assert etcd.running_pid(lay) is None
        done = _setup_ha(env)
        assert done.returncode == 0, done.stdout + done.stderr
        lines = done.stdout.splitlines()
        member_line = next(i for i, line in enumerate(lines) if "etcd member boot: started" in line)
        daemon_line = next(i for i, line in enumerate(lines) if "hvextd started" in line)
        assert member_line < daemon_line  # the member first: hvextd renews its lease through it
        member_pid = etcd.running_pid(lay)
        daemon_pid = service.status(pid_file).pid
        assert member_pid is not None and daemon_pid is not None
        client = Client([url], lay.credentials())
        deadline = time.monotonic() + 20
        while "h-boot" not in client.hosts():  # hvextd holds its lease through the member
            assert time.monotonic() < deadline, (lay.log_dir / "hvextd.log").read_text()
            time.sleep(0.1)

        again = _setup_ha(env)  # idempotent: both already run, nothing started
        assert again.returncode == 0, again.stderr
        assert "etcd member boot: already running" in again.stdout and "hvextd is already running" in again.stdout
        assert etcd.running_pid(lay) == member_pid and service.status(pid_file).pid == daemon_pid
    finally:
        if client is not None:
            client.close()
        service.stop(pid_file=pid_file)
        etcd.stop(lay)
