"""A cluster lab (``hvext lab up --hosts 3 --cluster``) on real namespaces, etcd members and hvextds.

One 3-host cluster lab for the module (the finalizer removes it even when a test fails): the
members form one cluster with a leader, each host's hvextd holds its lease; a failed host leaves a
working 2-member quorum and its lease expires; a revived host rejoins as a new member. With a
protected domain: a partitioned owner fences itself and the domain runs exactly once; losing one
etcd member of three stops nothing. An already
running lab is left alone (skipped, or failing under CI=true), since it may belong to someone else.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import libvirt
import pytest

from hvext import lab
from hvext.errors import ClusterUnavailable
from hvext.ha import cluster as ha_cluster
from hvext.ha import etcd
from hvext.ha.client import LEADER_CHANGED, Protection
from hvext.lab import cluster as lab_cluster
from hvext.lab import net, plan, procs
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


def through_election(call: Callable[[], T], timeout: float = 2 * plan.LAB_LEASE_TTL_S) -> T:
    """*call*'s answer, asked again while etcd says "leader changed" (a member that goes or comes back may
    start an election; the client repeats such a read once, an election can outlast that) for *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ClusterUnavailable as err:
            if LEADER_CHANGED not in str(err) or time.monotonic() >= deadline:
                raise
        time.sleep(0.2)


def cluster_status(host: lab.LabHost) -> dict[str, Any]:
    """What `hvext cluster status --json` says through *host*'s member."""
    return ha_cluster.status(lab_cluster.layout(host))


def cluster_paths(host: lab.LabHost) -> list[str]:
    """The CLI's options to reach the cluster through *host*'s member (`hvext cluster/ha ... --state-dir ...`)."""
    lay = lab_cluster.layout(host)
    return ["--state-dir", str(lay.state_dir), "--run-dir", str(lay.run_dir), "--log-dir", str(lay.log_dir)]


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


# -- a partition and the loss of one etcd member, with a protected domain ----------------------------------------
TINY_DOMAIN = ("<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
               "<os><type arch='x86_64'>hvm</type></os></domain>")


class Sampler:
    """Reads, every 0.1 s in a thread, whether a domain is active on each lab host (through each host's own
    libvirtd): :attr:`reads` = [(host, read began, read ended, libvirt state or None)], monotonic times. A
    read can block for seconds (libvirt holds the domain's lock while a destroy waits for QEMU), so a state
    is known only to have held at some instant between the two times."""

    def __init__(self, hosts: list[lab.LabHost], name: str) -> None:
        self.name = name
        self.conns = {h.name: libvirt.open(h.uri_unix) for h in hosts}
        self.reads: list[tuple[str, float, float, int | None]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _state(self, conn: libvirt.virConnect) -> int | None:
        try:
            dom = conn.lookupByName(self.name)
            return dom.state()[0] if dom.isActive() else None
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise

    def _run(self) -> None:
        while not self.stop.is_set():
            for host, conn in self.conns.items():
                began = time.monotonic()
                try:
                    state = self._state(conn)
                except libvirt.libvirtError as err:
                    self.errors.append(str(err))
                    continue
                self.reads.append((host, began, time.monotonic(), state))
            self.stop.wait(0.1)

    def where(self) -> list[str]:
        """The hosts on which the domain was active at their last read."""
        last: dict[str, int | None] = {}
        for host, _, _, state in list(self.reads):
            last[host] = state
        return sorted(h for h, s in last.items() if s is not None)

    def overlaps(self, old: str) -> list[tuple[str, float, float]]:
        """Proof that the domain was active on *old* and on another host at once, given that once it runs
        elsewhere it stays there: a read of *old* saying active that began after a read of another host
        saying active had ended. Returns those (other host, its read's end, old's read's start)."""
        reads = list(self.reads)
        first_elsewhere = {h: end for h, _, end, s in reversed(reads) if h != old and s is not None}
        return [(h, end, began) for h, end in first_elsewhere.items()
                for host, began, _, s in reads if host == old and s is not None and began > end]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for conn in self.conns.values():
            conn.close()


def log_times(text: str, pattern: str) -> list[float]:
    """Unix times of the hvextd log lines (``2026-12-03 15:38:02,250 ...``, local time) containing *pattern*."""
    return [datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            for line in text.splitlines() if pattern in line]


@contextmanager
def protected_domain(the_lab: lab.Lab, owner: str, suffix: str) -> Iterator[tuple[str, Any]]:
    """A tiny domain (no disk: QEMU sits in its firmware) defined and running on *owner*, protected with
    *owner* as home; (its name, a cluster client). Unprotected and removed from every host afterwards."""
    name = f"hvext-labtest-{suffix}-{os.getpid()}"
    client = the_lab.cluster_client()
    conn = libvirt.open(the_lab.host(owner).uri_unix)
    try:
        dom = conn.defineXML(TINY_DOMAIN.format(name=name))
        dom.create()
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
        assert client.protect(Protection(name, xml, owner, time.time()))
        wait_for(f"{owner}'s hvextd to claim {name}", lambda: client.owners().get(name, ("",))[0] == owner,
                 timeout=3 * plan.LAB_LEASE_TTL_S)
        yield name, client
    finally:
        try:
            client.unprotect(name)
        finally:
            client.close()
            conn.close()
            for host in the_lab.hosts:
                if host.phase is not lab.HostPhase.UP:
                    continue
                c = libvirt.open(host.uri_unix)
                try:
                    for d in c.listAllDomains():
                        if d.name() == name:
                            if d.isActive():
                                d.destroy()
                            d.undefine()
                finally:
                    c.close()


def hvextd_log(the_lab: lab.Lab, host: str) -> str:
    return (plan.host_run_dir(the_lab.state.run_dir, the_lab.host(host).index) / "hvextd.log").read_text(
        errors="replace")


def test_a_partitioned_owner_fences_itself_and_the_domain_runs_exactly_once(the_lab: lab.Lab) -> None:
    """host2 owns a protected domain; its link is cut, its processes keep running. Its hvextd cannot renew
    (its etcd member lost the quorum), so it pauses and destroys the domain before its lease can end; host1
    or host3 claims and starts it. Sampled every 0.1 s on all three libvirtds: never active on two. After
    the heal, host2 comes back without the domain and does not start it again."""
    ttl = plan.LAB_LEASE_TTL_S
    wait_for("3 host leases", lambda: len(cluster_status(the_lab.host(1))["hosts"]) == 3, timeout=3 * ttl)
    with protected_domain(the_lab, "host2", "partition") as (name, client):
        sampler = Sampler(the_lab.hosts, name)
        try:
            wait_for("the first sample", lambda: sampler.where() == ["host2"], timeout=10)
            cut_at = time.time()
            assert the_lab.partition("host2")
            assert not net.link_up(2) and the_lab.host(2).phase is lab.HostPhase.UP
            # still running: the partition killed nothing
            assert all(procs.is_alive(r) for r in the_lab.host(2).processes.values())
            elsewhere = wait_for("the domain to run on host1 or host3",
                                 lambda: [h for h in sampler.where() if h != "host2"], timeout=ttl + 20)
            new_owner = client.owners()[name][0]
            assert new_owner in ("host1", "host3") and elsewhere == [new_owner]
            # From both hosts' hvextd logs (one clock: one machine): libvirt's events and the fence.
            [started] = wait_for(f"{new_owner}'s hvextd to log the start",
                                 lambda: log_times(hvextd_log(the_lab, new_owner), f"domain {name} started"), 10)
            log2 = hvextd_log(the_lab, "host2")
            [paused] = log_times(log2, f"domain {name} suspended")
            [stopped] = log_times(log2, f"domain {name} stopped")
            print(f"partition: after the cut, host2 paused the domain at {paused - cut_at:.1f} s and its QEMU was "
                  f"gone at {stopped - cut_at:.1f} s; {new_owner} started it at {started - cut_at:.1f} s")
            # The vCPUs stop before host2's lease can end (TTL after its last renewal, which preceded the cut),
            # and host2's QEMU is gone before the domain starts elsewhere.
            assert paused - cut_at <= ttl, f"host2 paused the domain {paused - cut_at:.1f} s after the cut"
            assert stopped < started
            assert f"fence {name}: fenced" in log2 and "fencing" in log2
            assert "host2" not in client.hosts()

            the_lab.heal("host2")
            assert net.link_up(2)
            # host2's member coming back may start an election
            wait_for("host2 holding a lease again", lambda: "host2" in through_election(client.hosts),
                     timeout=4 * ttl)
            time.sleep(2 * ttl)  # host2 renews several times: it must not start the domain again
            assert sampler.where() == [new_owner] and through_election(client.owners)[name][0] == new_owner
        finally:
            if not net.link_up(2):
                the_lab.heal("host2")
            sampler.close()
        assert not sampler.overlaps("host2"), sampler.overlaps("host2")[:5]
        assert not sampler.errors, sampler.errors[:3]
        print(f"partition: {len(sampler.reads)} reads, the domain never seen active on two hosts at once")


def test_losing_one_etcd_member_of_three_stops_nothing(the_lab: lab.Lab) -> None:
    """host3's etcd member is SIGKILLed (host3 and its hvextd stay): host3's hvextd, whose own member was
    its first endpoint, renews through the others; every lease stays, its protected domain keeps running,
    nothing is fenced; `hvext cluster status` and `hvext ha status` work. Runs last: the member stays dead
    (the module's `lab down` removes the lab)."""
    ttl = plan.LAB_LEASE_TTL_S
    wait_for("3 host leases", lambda: len(cluster_status(the_lab.host(1))["hosts"]) == 3, timeout=3 * ttl)
    with protected_domain(the_lab, "host3", "member") as (name, client):
        sampler = Sampler(the_lab.hosts, name)
        try:
            wait_for("the first sample", lambda: sampler.where() == ["host3"], timeout=10)
            leases = client.hosts()
            before = hvextd_log(the_lab, "host3")
            member = the_lab.host(3).processes["etcd"]
            os.kill(member.pid, signal.SIGKILL)
            killed = time.monotonic()
            wait_for("host3's member to exit", lambda: not procs.is_alive(member), timeout=10)
            time.sleep(3 * ttl)  # three lease TTLs without host3's member
            # the same leases, renewed: nothing expired (the survivors may be electing a leader meanwhile)
            assert through_election(client.hosts) == leases
            assert through_election(client.owners)[name] == ("host3", leases["host3"])
            assert all(s == libvirt.VIR_DOMAIN_RUNNING
                       for h, began, _, s in sampler.reads if h == "host3" and began > killed)
            after = hvextd_log(the_lab, "host3")[len(before):]
            assert "fencing" not in after and "fence " not in after, after
            for argv in (["cluster", "status", "--json"], ["ha", "status", name, "--json"]):
                done = subprocess.run([sys.executable, "-m", "hvext.cli.main", *argv,
                                       *cluster_paths(the_lab.host(1))],
                                      capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, (argv, done.stderr)
                report = json.loads(done.stdout)
                if argv[0] == "cluster":
                    assert sorted(h["name"] for h in report["hosts"]) == ["host1", "host2", "host3"]
                    assert {m["name"]: m for m in report["members"]}  # three members, one of them down
                    assert next(h for h in report["hosts"] if h["name"] == "host3")["owns"] == [name]
                else:
                    assert report["owner"] == "host3", report
            # Through host3's own member (the CLI talks to this host's member only): a clear error, not a hang.
            done = subprocess.run([sys.executable, "-m", "hvext.cli.main", "cluster", "status",
                                   *cluster_paths(the_lab.host(3))], capture_output=True, text=True, timeout=60)
            assert done.returncode == 1 and done.stderr.startswith("error: ") and "198.18.0.13" in done.stderr, \
                done.stderr
        finally:
            sampler.close()
        assert not sampler.errors, sampler.errors[:3]
