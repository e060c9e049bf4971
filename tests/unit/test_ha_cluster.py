"""The HA cluster's etcd (hvext.ha.etcd, hvext.ha.cluster, hvext.ha.client, ``hvext cluster``) against a
REAL etcd (Debian's etcd-server): members run on 127.0.0.1 with free ports, in temporary directories, so
no test touches a real cluster; every etcd a test starts is stopped, also on failure.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvext.cli.main import main
from hvext.errors import ClusterUnavailable, HAError, UsageError
from hvext.ha import cluster, etcd
from hvext.ha.client import Client
from hvext.ha.etcd import Layout
from hvext.lab import pki

pytestmark = [pytest.mark.requires(os.geteuid() == 0, "the cluster's PKI and etcd's pid file are root's"),
              pytest.mark.requires(os.access(etcd.ETCD, os.X_OK),
                                   f"{etcd.ETCD} missing (setup/host.sh packages installs etcd-server)"),
              pytest.mark.requires(shutil.which("openssl"), "openssl is not installed (setup/host.sh installs it)")]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def layout(root: Path, name: str) -> Layout:
    return Layout(root / name / "state", root / name / "run", root / name / "log")


def paths_args(lay: Layout) -> list[str]:
    return ["--state-dir", str(lay.state_dir), "--run-dir", str(lay.run_dir), "--log-dir", str(lay.log_dir)]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Layout, Layout, list[int]]]:
    """A cluster made by `hvext cluster init`, and a second member on this machine made by `cluster join`."""
    root = tmp_path_factory.mktemp("ha")
    first, second = layout(root, "a"), layout(root, "b")
    ports = free_ports(4)
    try:
        assert main(["cluster", "init", "--name", "a", "--cluster", "test", "--client-port", str(ports[0]),
                     "--peer-port", str(ports[1]), *paths_args(first)]) == 0
        assert main(["cluster", "credentials", "export", str(root / "creds"), *paths_args(first)]) == 0
        assert main(["cluster", "join", f"https://127.0.0.1:{ports[0]}", "--credentials", str(root / "creds"),
                     "--name", "b", "--client-port", str(ports[2]), "--peer-port", str(ports[3]),
                     *paths_args(second)]) == 0
        yield first, second, ports
    finally:
        etcd.stop(first)
        etcd.stop(second)
        shutil.rmtree(root, ignore_errors=True)


def test_init_makes_private_files_and_a_running_member(two: tuple[Layout, Layout, list[int]]) -> None:
    first, _, _ = two
    for directory in (first.ha_dir, first.pki_dir, first.ca_dir, first.data_dir):
        assert mode(directory) == 0o700, directory
    for key in (first.ca_dir / "ca-key.pem", first.pki_dir / "memberkey.pem"):
        assert mode(key) == 0o600, key
    pid = etcd.running_pid(first)
    assert pid is not None and int(first.pid_file.read_text()) == pid


def test_second_init_reports_and_changes_nothing(two: tuple[Layout, Layout, list[int]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    first, _, ports = two
    before = {p: p.stat().st_mtime_ns for p in first.ha_dir.rglob("*")}
    pid = etcd.running_pid(first)
    rc, out, _ = cli(capsys, "cluster", "init", "--name", "other", "--client-port", str(ports[0]),
                     "--peer-port", str(ports[1]), "--json", *paths_args(first))
    assert rc == 0 and json.loads(out)["already"] is True and json.loads(out)["member"] == "a"
    assert {p: p.stat().st_mtime_ns for p in first.ha_dir.rglob("*")} == before
    assert etcd.running_pid(first) == pid


def test_status_shows_two_members_and_one_leader(two: tuple[Layout, Layout, list[int]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for lay in two[:2]:
        rc, out, _ = cli(capsys, "cluster", "status", "--json", *paths_args(lay))
        status = json.loads(out)
        assert rc == 0 and status["cluster"] == "test"
        assert sorted(m["name"] for m in status["members"]) == ["a", "b"]
        assert [m["leader"] for m in status["members"]].count(True) == 1
        assert status["leader"] in ("a", "b")
    rc, out, _ = cli(capsys, "cluster", "status", *paths_args(two[0]))
    assert rc == 0 and "Leader:" in out


def _tls_hello(port: int, context: ssl.SSLContext) -> str:
    """Send a /version request (served on client and peer URLs) over TLS with *context*; what came back (or the error)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"GET /version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return tls.recv(4096).decode(errors="replace")
    except (ssl.SSLError, OSError) as err:
        return f"refused: {err}"


@pytest.mark.parametrize("which", ["client", "peer"])
def test_a_peer_without_a_cluster_certificate_is_refused(two: tuple[Layout, Layout, list[int]], tmp_path: Path,
                                                         which: str) -> None:
    first, _, ports = two
    port = ports[0] if which == "client" else ports[1]
    # The same server check, with our certificate: accepted (so the refusals below are about the certificate).
    assert "etcdserver" in _tls_hello(port, first.credentials().ssl_context())
    # No client certificate at all.
    plain = ssl.create_default_context(cafile=str(first.pki_dir / "ca.pem"))
    assert not _tls_hello(port, plain).startswith("HTTP/1.1 200")
    # A client certificate from another CA.
    pki.make_ca(tmp_path / "ca", "another CA")
    cert, key = pki.issue(tmp_path / "ca", tmp_path, "intruder", "intruder")
    foreign = ssl.create_default_context(cafile=str(first.pki_dir / "ca.pem"))
    foreign.load_cert_chain(str(cert), str(key))
    assert not _tls_hello(port, foreign).startswith("HTTP/1.1 200")
    # Plain HTTP.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"etcdserver" not in raw.recv(4096)


def test_concurrent_claims_exactly_one_wins(two: tuple[Layout, Layout, list[int]]) -> None:
    first, second, ports = two
    claimers = 8
    endpoints = [f"https://127.0.0.1:{ports[0]}", f"https://127.0.0.1:{ports[2]}"]
    clients = [Client([endpoints[i % 2]], (first if i % 2 == 0 else second).credentials())
               for i in range(claimers)]
    leases = [c.grant(10) for c in clients]
    try:
        for round_ in range(3):
            domain = f"claim-{os.getpid()}-{round_}"
            barrier = threading.Barrier(claimers)
            won: list[bool] = [False] * claimers

            def claim(i: int) -> None:
                barrier.wait()
                won[i] = clients[i].claim(domain, f"host{i}", leases[i].id)

            threads = [threading.Thread(target=claim, args=(i,)) for i in range(claimers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert won.count(True) == 1, won
            winner = won.index(True)
            assert clients[0].owners()[domain] == (f"host{winner}", leases[winner].id)
    finally:
        for c, lease in zip(clients, leases):
            c.revoke(lease.id)
            c.close()


def _claim_in_process(endpoint: str, creds: etcd.Credentials, domain: str, host: str, lease_id: int,
                      barrier: Any, results: Any) -> None:
    client = Client([endpoint], creds)
    barrier.wait()
    results.put((host, client.claim(domain, host, lease_id)))


def test_concurrent_claims_from_processes_exactly_one_wins(two: tuple[Layout, Layout, list[int]]) -> None:
    first, _, ports = two
    endpoint = f"https://127.0.0.1:{ports[0]}"
    ctx = multiprocessing.get_context("fork")
    owner = Client([endpoint], first.credentials())
    lease = owner.grant(10)
    domain, claimers = f"claim-proc-{os.getpid()}", 4
    barrier, results = ctx.Barrier(claimers), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(endpoint, first.credentials(), domain, f"p{i}", lease.id,
                                                         barrier, results)) for i in range(claimers)]
    try:
        for p in procs:
            p.start()
        outcome = dict(results.get(timeout=30) for _ in procs)
        assert list(outcome.values()).count(True) == 1, outcome
        assert owner.owners()[domain][0] == next(h for h, won in outcome.items() if won)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        owner.revoke(lease.id)
        owner.close()


def test_owner_key_goes_with_the_owners_lease(two: tuple[Layout, Layout, list[int]]) -> None:
    first, _, ports = two
    c = Client([f"https://127.0.0.1:{ports[0]}"], first.credentials())
    try:
        domain = f"lease-{os.getpid()}"
        lease = c.grant(2)
        c.register_host("h-lease", lease.id)
        assert c.claim(domain, "h-lease", lease.id)
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:  # kept alive past its TTL
            assert c.keepalive(lease.id) > 0
            time.sleep(0.5)
        assert c.owners()[domain][0] == "h-lease" and "h-lease" in c.hosts()
        deadline = time.monotonic() + 10
        while domain in c.owners() and time.monotonic() < deadline:  # not renewed: expires
            time.sleep(0.2)
        assert domain not in c.owners() and "h-lease" not in c.hosts()
        assert c.keepalive(lease.id) == -1
        other = c.grant(5)
        assert c.claim(domain, "h-other", other.id)
        c.revoke(other.id)
        assert domain not in c.owners()
    finally:
        c.close()


def test_a_leading_member_hands_leadership_to_another_and_a_follower_does_nothing(
        two: tuple[Layout, Layout, list[int]]) -> None:
    """What a host on battery does with its member (the leader dying would stall every renewal until a
    new election): the leader moves leadership away; asked for a follower, nothing happens."""
    first, _, ports = two
    c = Client([f"https://127.0.0.1:{ports[0]}", f"https://127.0.0.1:{ports[2]}"], first.credentials())
    try:
        def leader() -> str:
            lead = str(c.status()["leader"])
            return next(m["name"] for m in c.members() if str(m["ID"]) == lead)
        before = leader()
        other = "b" if before == "a" else "a"
        assert c.move_leader_off(other) is None and leader() == before  # a follower: nothing to move
        assert c.move_leader_off(before, prefer=["nobody", other]) == other
        deadline = time.monotonic() + 10
        while leader() != other and time.monotonic() < deadline:
            time.sleep(0.1)
        assert leader() == other
        # A leader whose client URL this client does not have cannot be asked.
        only = Client([f"https://127.0.0.1:{ports[0] if other == 'b' else ports[2]}"], first.credentials())
        try:
            with pytest.raises(HAError, match="none of this client's endpoints"):
                only.move_leader_off(other)
        finally:
            only.close()
    finally:
        c.close()


def test_confirm_is_a_quorum_read_through_the_endpoint_that_answered_last_only(
        two: tuple[Layout, Layout, list[int]]) -> None:
    first, _, ports = two
    (dead,) = free_ports(1)
    c = Client([f"https://127.0.0.1:{dead}", f"https://127.0.0.1:{ports[0]}"], first.credentials())
    try:
        with pytest.raises(ClusterUnavailable, match=f":{dead}"):
            c.confirm()  # the first endpoint is asked, and no other
        lease = c.grant(5)
        assert c.keepalive(lease.id) > 0  # answered by the live one, which is now asked first
        c.confirm()
        c.revoke(lease.id)
    finally:
        c.close()


def test_unreachable_cluster_is_cluster_unavailable(two: tuple[Layout, Layout, list[int]]) -> None:
    (port,) = free_ports(1)
    c = Client([f"https://127.0.0.1:{port}"], two[0].credentials())
    with pytest.raises(ClusterUnavailable, match=f"127.0.0.1:{port}"):
        c.members()
    # A second endpoint that answers is used instead.
    c = Client([f"https://127.0.0.1:{port}", f"https://127.0.0.1:{two[2][0]}"], two[0].credentials())
    assert len(c.members()) == 2


def test_init_that_cannot_start_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lay = layout(tmp_path, "busy")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (peer,) = free_ports(1)
        rc, _, err = cli(capsys, "cluster", "init", "--name", "x", "--client-port", str(port),
                         "--peer-port", str(peer), *paths_args(lay))
    assert rc == 1 and err.startswith("error: ") and "etcd" in err
    assert etcd.running_pid(lay) is None and not lay.pid_file.exists()
    assert not lay.ha_dir.exists() and not lay.data_dir.exists()


def test_join_of_an_unreachable_endpoint_leaves_nothing(two: tuple[Layout, Layout, list[int]], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    creds = tmp_path / "creds"
    cluster.export_credentials(two[0], creds)
    lay = layout(tmp_path, "c")
    dead, client_port, peer_port = free_ports(3)
    rc, _, err = cli(capsys, "cluster", "join", f"https://127.0.0.1:{dead}", "--credentials", str(creds),
                     "--name", "c", "--client-port", str(client_port), "--peer-port", str(peer_port),
                     *paths_args(lay))
    assert rc == 1 and "does not answer" in err
    assert not lay.ha_dir.exists() and not lay.data_dir.exists() and etcd.running_pid(lay) is None


def test_credentials_export_is_private_and_refuses_an_existing_dir(two: tuple[Layout, Layout, list[int]],
                                                                   tmp_path: Path) -> None:
    cluster.export_credentials(two[0], tmp_path / "out")
    assert mode(tmp_path / "out") == 0o700 and mode(tmp_path / "out" / "ca-key.pem") == 0o600
    with pytest.raises(UsageError, match="exists"):
        cluster.export_credentials(two[0], tmp_path / "out")


def test_commands_without_a_cluster_fail_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lay = layout(tmp_path, "none")
    for action in ("status", "start", "stop", "leave"):
        rc, _, err = cli(capsys, "cluster", action, *paths_args(lay))
        assert rc == 1 and "in no cluster" in err, (action, err)


def test_leave_removes_the_member_and_its_files(two: tuple[Layout, Layout, list[int]], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A third member joins and leaves at once (etcd's 5 s reconfiguration check is waited out). The
    removal goes through another member: the leaving one may stop before it answers ("server stopped")."""
    first, _, ports = two
    asked: list[list[str]] = []
    remove = Client.member_remove
    def spy(self: Client, member_id: str, wait: float = 0.0) -> None:
        asked.append([endpoint for endpoint, _ in self._clients])
        remove(self, member_id, wait)
    monkeypatch.setattr(Client, "member_remove", spy)
    creds = tmp_path / "creds"
    cluster.export_credentials(first, creds)
    lay = layout(tmp_path, "c")
    client_port, peer_port = free_ports(2)
    try:
        rc, _, err = cli(capsys, "cluster", "join", f"https://127.0.0.1:{ports[0]}", "--credentials", str(creds),
                         "--name", "c", "--client-port", str(client_port), "--peer-port", str(peer_port),
                         *paths_args(lay))
        assert rc == 0, err
        assert sorted(m["name"] for m in cluster.status(first)["members"]) == ["a", "b", "c"]
        rc, out, err = cli(capsys, "cluster", "leave", *paths_args(lay))
        assert rc == 0 and "left cluster test" in out, err
        assert len(asked) == 1 and asked[0] and not any(f":{client_port}" in e for e in asked[0]), asked
        assert sorted(m["name"] for m in cluster.status(first)["members"]) == ["a", "b"]
        assert etcd.running_pid(lay) is None and not lay.ha_dir.exists() and not lay.data_dir.exists()
    finally:
        etcd.stop(lay)


def test_status_shows_each_hosts_lease_and_the_domains_it_owns(two: tuple[Layout, Layout, list[int]],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    first, second, ports = two
    c = Client([f"https://127.0.0.1:{ports[2]}"], second.credentials())
    lease = c.grant(30)
    try:
        c.register_host("h-status", lease.id)
        assert c.claim("vm-status", "h-status", lease.id)
        rc, out, _ = cli(capsys, "cluster", "status", "--json", *paths_args(first))
        host = next(h for h in json.loads(out)["hosts"] if h["name"] == "h-status")
        assert rc == 0 and host["lease"] == f"{lease.id:x}" and host["owns"] == ["vm-status"]
        assert 0 < host["ttl"] <= host["granted_ttl"] == 30
        rc, out, _ = cli(capsys, "cluster", "status", *paths_args(first))
        assert rc == 0 and "h-status" in out and "vm-status" in out
    finally:
        c.revoke(lease.id)
        c.close()


def test_a_layout_with_a_network_namespace_runs_etcd_there(tmp_path: Path) -> None:
    member = etcd.Member("m1", "c", "198.18.0.11")
    plain = Layout(state_dir=tmp_path, run_dir=tmp_path, log_dir=tmp_path)
    assert etcd.command(plain, member) == member.argv(plain)
    inside = Layout(state_dir=tmp_path, run_dir=tmp_path, log_dir=tmp_path, netns="hvext-lab-host1")
    assert etcd.command(inside, member) == ["ip", "netns", "exec", "hvext-lab-host1", *member.argv(inside)]
