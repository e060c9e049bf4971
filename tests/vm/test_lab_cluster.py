"""A cluster lab (``hvext lab up --hosts 3 --cluster``) on real namespaces, etcd members and hvextds.

One 3-host cluster lab for the module (the finalizer removes it even when a test fails): the
members form one cluster with a leader, each host's hvextd holds its lease; a failed host leaves a
working 2-member quorum and its lease expires; a revived host rejoins as a new member. An already
running lab is left alone (skipped, or failing under CI=true), since it may belong to someone else.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from hvext import lab
from hvext.ha import cluster as ha_cluster
from hvext.ha import etcd
from hvext.lab import cluster as lab_cluster
from hvext.lab import net, plan
from tests.support import require

T = TypeVar("T")

pytestmark = [
    pytest.mark.requires(os.geteuid() == 0, "the lab needs root (namespaces, libvirtd)"),
    pytest.mark.requires(shutil.which("libvirtd") or os.path.exists("/usr/sbin/libvirtd"),
                         "libvirtd is not installed (`make libvirtd`)"),
    pytest.mark.requires(os.access(etcd.ETCD, os.X_OK),
                         f"{etcd.ETCD} missing (setup/host.sh packages installs etcd-server)"),
    pytest.mark.timeout(180),
]


@pytest.fixture(scope="module")
def the_lab() -> Iterator[lab.Lab]:
    require(lab.Lab.load() is None,
            "a lab is already up (maybe someone else's); `hvext lab down` first to run these tests")
    started = time.monotonic()
    try:
        built = lab.Lab.up(3, cluster=True)
        assert built.created and built.state.cluster and len(built.hosts) == 3
        print(f"cluster lab up: {time.monotonic() - started:.2f} s")
        yield built
    finally:
        lab.down()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float) -> T:
    """Poll *probe* until it returns something truthy (no fixed sleeps); fail naming *what* and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    pytest.fail(f"{what} within {timeout:.0f} s; last: {last!r}")


def cluster_status(host: lab.LabHost) -> dict[str, Any]:
    """What `hvext cluster status --json` says through *host*'s member."""
    return ha_cluster.status(lab_cluster.layout(host))


def with_leases(host: lab.LabHost, names: list[str]) -> Callable[[], dict[str, Any] | None]:
    """A probe: the cluster status through *host*'s member once exactly *names* hold leases, else None."""
    def probe() -> dict[str, Any] | None:
        status = cluster_status(host)
        return status if [h["name"] for h in status["hosts"]] == names else None
    return probe


def test_a_cluster_up_whose_members_cannot_start_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs first, before the module's lab: every member exits at once (etcd replaced by /bin/false);
    `up` fails naming etcd and removes all it made (daemons, namespaces, directories, the cluster CA)."""
    require(lab.Lab.load() is None,
            "a lab is already up (maybe someone else's); `hvext lab down` first to run these tests")
    monkeypatch.setattr(etcd, "ETCD", "/bin/false")
    try:
        with pytest.raises(lab.LabError, match="etcd exited"):
            lab.Lab.up(3, cluster=True)
        assert lab.Lab.load() is None
        assert net.present() == {"netns": [], "links": []}
        assert not plan.RUN_DIR.exists() and not plan.DATA_DIR.exists()
    finally:
        lab.down()


def test_three_members_a_leader_and_three_host_leases(the_lab: lab.Lab) -> None:
    hosts = ["host1", "host2", "host3"]
    status = wait_for("3 host leases", with_leases(the_lab.host(1), hosts), timeout=3 * plan.LAB_LEASE_TTL_S)
    assert sorted(m["name"] for m in status["members"]) == hosts and all(m["started"] for m in status["members"])
    assert status["leader"] in hosts and sum(m["leader"] for m in status["members"]) == 1
    assert status["members"][0]["client_urls"][0].startswith("https://198.18.0.")
    assert all(0 < h["ttl"] <= plan.LAB_LEASE_TTL_S for h in status["hosts"]), status["hosts"]
    # Each member runs inside its host's network namespace.
    for host in the_lab.hosts:
        ref = host.processes["etcd"]
        assert ref.comm == "etcd"
        assert os.stat(f"/proc/{ref.pid}/ns/net").st_ino == os.stat(f"/run/netns/{host.netns}").st_ino
    # `hvext lab status --json` (another process) shows each member: pid, healthy, one leader.
    done = subprocess.run([sys.executable, "-m", "hvext.cli.main", "lab", "status", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["cluster"] is True
    members = {h["name"]: h["etcd"] for h in report["hosts"]}
    assert all(m["healthy"] and m["pid"] == the_lab.host(n).processes["etcd"].pid for n, m in members.items()), members
    assert [n for n, m in members.items() if m["leader"]] == [status["leader"]]


def test_a_failed_host_leaves_a_working_quorum_its_lease_expires_and_revive_rejoins(the_lab: lab.Lab) -> None:
    wait_for("3 host leases", lambda: len(cluster_status(the_lab.host(1))["hosts"]) == 3,
             timeout=3 * plan.LAB_LEASE_TTL_S)
    report = the_lab.fail("host3")
    assert any(k.startswith("etcd pid") for k in report.killed), report.killed
    failed_at = time.monotonic()
    client = the_lab.cluster_client()
    try:
        # A write and a read through the 2-member quorum.
        lease = client.grant(10)
        assert client.claim("quorum-probe", "host1", lease.id)
        assert client.owners()["quorum-probe"] == ("host1", lease.id)
        assert client.revoke(lease.id) and "quorum-probe" not in client.owners()
        # host3's hvextd is dead: its lease ends after its TTL (once more if host3 led: a new leader
        # gives every lease a fresh TTL); the others keep theirs.
        wait_for("host3's lease to expire", lambda: sorted(client.hosts()) == ["host1", "host2"],
                 timeout=2 * plan.LAB_LEASE_TTL_S + 5)
        print(f"host3's lease gone {time.monotonic() - failed_at:.1f} s after the fail")
    finally:
        client.close()
    statuses = {s.host.name: s.etcd for s in the_lab.status()}
    assert statuses["host3"]["pid"] is None and statuses["host1"]["healthy"] and statuses["host2"]["healthy"]

    revived = the_lab.revive("host3")
    assert revived.phase is lab.HostPhase.UP and "etcd" in revived.processes
    status = wait_for("host3 back with a lease", with_leases(the_lab.host(3), ["host1", "host2", "host3"]),
                      timeout=3 * plan.LAB_LEASE_TTL_S)
    assert sorted(m["name"] for m in status["members"]) == ["host1", "host2", "host3"], status["members"]
    assert all(m["started"] for m in status["members"]) and status["leader"]
