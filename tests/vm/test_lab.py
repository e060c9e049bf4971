"""The multi-host lab on real namespaces and libvirtds: up, status, isolation, connectivity, down.

The module shares one 2-host lab (about a second to build); the finalizer
removes it even when a test fails. An already running lab is left alone
(the module is skipped, or fails under CI=true), since it may belong to someone else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from hvext import aio, lab
from hvext.cli.main import main
from hvext.host import Domain, Host, remove_domain_state  # (importing hvext.host keeps libvirt from printing errors)
from hvext.lab import net, plan, procs
from hvext.pmem import power
from hvext.pmem.store import Store
from tests.support import require
from tests.vm.conftest import BOOT_TIMEOUT_S, VMFactory
from tests.vm.helpers import guest_exec

PY = sys.executable
TINY_DOMAIN = ("<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
               "<os><type arch='x86_64'>hvm</type></os></domain>")

pytestmark = [
    pytest.mark.requires(os.geteuid() == 0, "the lab needs root (namespaces, libvirtd)"),
    pytest.mark.requires(shutil.which("libvirtd") or os.path.exists("/usr/sbin/libvirtd"),
                         "libvirtd is not installed (`make libvirtd`)"),
    pytest.mark.timeout(120),
]


def hvext_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a separate process: it must find the lab through the state file."""
    return subprocess.run([PY, "-m", "hvext.cli.main", *argv], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def the_lab() -> Iterator[lab.Lab]:
    require(lab.Lab.load() is None,
            "a lab is already up (maybe someone else's); `hvext lab down` first to run these tests")
    started = time.monotonic()
    try:
        built = lab.Lab.up(2)
        assert built.created and len(built.hosts) == 2
        print(f"lab up: {time.monotonic() - started:.2f} s")
        yield built
    finally:
        lab.down()


def test_both_hosts_answer(the_lab: lab.Lab) -> None:
    statuses = the_lab.status()
    assert [s.host.name for s in statuses] == ["host1", "host2"]
    for s in statuses:
        assert s.netns_present and all(s.daemons.values()), s.to_dict()
        assert s.answering, s.to_dict()
        assert s.unix.hostname == s.tls.hostname == s.host.hostname
    assert statuses[0].host.uuid != statuses[1].host.uuid


def test_virsh_reaches_each_host_from_the_root_namespace(the_lab: lab.Lab) -> None:
    for host in the_lab.hosts:
        for uri in (host.uri_unix, host.uri_tls):
            version = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, text=True, timeout=30)
            assert version.returncode == 0 and "Running hypervisor: QEMU" in version.stdout, version.stderr
            listing = subprocess.run(["virsh", "-c", uri, "list", "--all"], capture_output=True, text=True,
                                     timeout=30)
            assert listing.returncode == 0, listing.stderr
        conn = libvirt.open(host.uri_tls)
        try:
            assert f"<uuid>{host.uuid}</uuid>" in conn.getCapabilities()  # its own host UUID
            assert conn.getHostname() == host.hostname
        finally:
            conn.close()


def test_domains_are_private_to_their_host(the_lab: lab.Lab) -> None:
    host1, host2 = the_lab.hosts
    name = f"hvext-labtest-{os.getpid()}"
    conn1, conn2, machine = libvirt.open(host1.uri_unix), libvirt.open(host2.uri_tls), libvirt.open("qemu:///system")
    try:
        dom = conn1.defineXML(TINY_DOMAIN.format(name=name))
        try:
            assert name in [d.name() for d in conn1.listAllDomains(0)]
            assert name not in [d.name() for d in conn2.listAllDomains(0)]
            assert name not in [d.name() for d in machine.listAllDomains(0)]
            assert (plan.host_data_dir(the_lab.state.data_dir, 1) / "etc" / "qemu" / f"{name}.xml").exists()
            assert not Path(f"/etc/libvirt/qemu/{name}.xml").exists()
        finally:
            dom.undefine()
        assert name not in [d.name() for d in conn1.listAllDomains(0)]
    finally:
        for conn in (conn1, conn2, machine):
            conn.close()


PING = r"""
import os, socket, struct, sys, time
def checksum(data):
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(2)
ident, payload = os.getpid() & 0xFFFF, b"hvext-lab-ping!!"
header = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
s.sendto(struct.pack("!BBHHH", 8, 0, checksum(header + payload), ident, 1) + payload, (sys.argv[1], 0))
deadline = time.monotonic() + 2
while time.monotonic() < deadline:
    packet, (source, _) = s.recvfrom(1500)
    kind, _, _, rid, _ = struct.unpack("!BBHHH", packet[20:28])
    if kind == 0 and rid == ident and source == sys.argv[1]:
        print("reply from", source)
        sys.exit(0)
sys.exit(1)
"""


def in_netns(host: lab.LabHost, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", host.netns, *argv], capture_output=True, text=True, timeout=30)


def test_hosts_reach_each_other_over_the_bridge(the_lab: lab.Lab) -> None:
    host1, host2 = the_lab.hosts
    ping = in_netns(host1, PY, "-c", PING, host2.address)  # ICMP echo, as ping does (no ping binary needed)
    assert ping.returncode == 0 and f"reply from {host2.address}" in ping.stdout, ping.stderr
    # What peer-to-peer migration does: host1 talks to host2's libvirtd over TLS.
    remote = in_netns(host1, "virsh", "-c", host2.uri_tls, "hostname")
    assert remote.returncode == 0 and remote.stdout.strip() == host2.hostname, remote.stderr
    # The hosts see only their own interface and loopback; the lab has no way off the machine.
    routes = in_netns(host1, "ip", "-4", "route")
    assert routes.stdout.strip().splitlines() == [f"198.18.0.0/24 dev eth0 proto kernel scope link src {host1.address}"]


def _tls_confirmation(address: str, certfile: Path | None, keyfile: Path | None, ca: Path) -> bytes:
    """Connect to libvirtd's TLS port as a TLS client (with or without a client certificate) and
    read libvirt's one-byte confirmation: b"\\x01" only when libvirtd accepted the client."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    if certfile is not None:
        context.load_cert_chain(str(certfile), str(keyfile))
    try:
        with socket.create_connection((address, plan.LIBVIRT_TLS_PORT), timeout=10) as raw:
            with context.wrap_socket(raw) as tls:
                return tls.recv(1)
    except (ssl.SSLError, ConnectionError, socket.timeout):
        return b""


def test_no_libvirt_without_roots_certificate(the_lab: lab.Lab) -> None:
    """Any local user reaches the lab addresses from the root namespace: nothing there may grant
    libvirt (root) without authentication."""
    data = the_lab.state.data_dir
    ca = plan.client_pki_dir(data) / "cacert.pem"
    for host in the_lab.hosts:
        with pytest.raises(ConnectionRefusedError):  # no plain TCP listener at all
            socket_connect(host.address, 16509)
        with pytest.raises(libvirt.libvirtError):
            libvirt.open(f"qemu+tcp://{host.address}/system").close()
        # The raw protocol: libvirtd confirms a client only when it shows root's certificate ...
        client = plan.client_pki_dir(data)
        assert _tls_confirmation(host.address, client / "clientcert.pem", client / "clientkey.pem", ca) == b"\x01"
        assert _tls_confirmation(host.address, None, None, ca) != b"\x01"
        # The unix sockets are root's only.
        for sock in (host.socket, host.socket.with_name("libvirt-sock-ro")):
            assert os.stat(sock).st_mode & 0o077 == 0, sock
        as_nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "virsh", "-c",
                                    host.uri_unix, "hostname"], capture_output=True, text=True, timeout=30)
        assert as_nobody.returncode != 0 and host.hostname not in as_nobody.stdout
        conn = libvirt.open(host.uri_tls)  # the authenticated one works
        try:
            assert conn.getHostname() == host.hostname
        finally:
            conn.close()


LISTEN = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
print("listening", flush=True)
s.settimeout(60)
while True:
    c, _ = s.accept()
    c.sendall(b"hello")
    c.close()
"""

CONNECT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        print(c.recv(5).decode())
except OSError as err:
    print(type(err).__name__)
"""


def test_migration_ports_answer_lab_hosts_only(the_lab: lab.Lab) -> None:
    """QEMU's incoming migration port takes a plain stream: from the root namespace (any local user)
    a host's ports other than libvirt's TLS port are closed, from another lab host they are open."""
    host1, host2 = the_lab.hosts
    port = 49152  # the first port of libvirt's migration range
    server = subprocess.Popen(["ip", "netns", "exec", host2.netns, PY, "-c", LISTEN, host2.address, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        from_host1 = in_netns(host1, PY, "-c", CONNECT, host2.address, str(port))
        assert from_host1.stdout.strip() == "hello", from_host1
        from_root = subprocess.run([PY, "-c", CONNECT, host2.address, str(port)], capture_output=True, text=True,
                                   timeout=30)
        assert from_root.stdout.strip() == "ConnectionRefusedError", from_root
        as_user = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PY, "-c", CONNECT,
                                  host2.address, str(port)], capture_output=True, text=True, timeout=30)
        assert as_user.stdout.strip() == "ConnectionRefusedError", as_user
    finally:
        server.kill()
        server.wait()


def socket_connect(address: str, port: int) -> None:
    import socket

    with socket.create_connection((address, port), timeout=5):
        pass


def test_domain_runs_inside_its_host(the_lab: lab.Lab) -> None:
    host2 = the_lab.hosts[1]
    name = f"hvext-labtest-run-{os.getpid()}"
    conn = libvirt.open(host2.uri_unix)
    try:
        dom = conn.createXML(TINY_DOMAIN.format(name=name), 0)  # transient: gone once destroyed
        try:
            pid = procs.read_pid_file(the_lab.state.run_dir / "host2" / "libvirt" / "qemu" / f"{name}.pid")
            assert pid is not None and procs.netns_inode(pid) == net.netns_inode(host2.netns)
        finally:
            dom.destroy()
    finally:
        conn.close()


def test_up_again_is_a_no_op(the_lab: lab.Lab) -> None:
    again = lab.Lab.up(2)
    assert not again.created
    assert [h.processes for h in again.hosts] == [h.processes for h in the_lab.hosts]
    result = hvext_cli("lab", "up", "--hosts", "2")
    assert result.returncode == 0 and "already up, nothing to do" in result.stdout, result.stderr
    with pytest.raises(lab.LabUsageError, match="2-host lab is already up"):
        lab.Lab.up(3)
    refused = hvext_cli("lab", "up", "--hosts", "3")
    assert refused.returncode == 1 and "--force" in refused.stderr


def test_status_from_another_process(the_lab: lab.Lab) -> None:
    import json

    result = hvext_cli("lab", "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["up"] and [h["name"] for h in data["hosts"]] == ["host1", "host2"]
    assert all(h["answering"] for h in data["hosts"])
    assert data["hosts"][0]["uri_tls"] == f"qemu+tls://198.18.0.11/system?pkipath={plan.DATA_DIR}/pki/client"


def _host_refs(state: plan.LabState, index: int) -> list[procs.ProcessRef]:
    """Everything that runs in lab host *index* now (its daemons, QEMUs, anything else)."""
    inode = net.netns_inode(plan.netns_name(index))
    assert inode is not None
    return procs.in_netns(inode)


def _protected_guest(factory: VMFactory, uri: str, store: Path) -> tuple[Domain, Path]:
    """A 512 MiB guest with a 64 MiB volatile NVDIMM protected by *store*, defined (not started) on *uri*."""
    domain = factory.define(memory_mib=512)
    assert main(["-c", uri, "pmem-attach", domain.name, "--size", "64M", "--type", "nvdimm",
                 "--volatile-backing", "--store", str(store)]) == 0
    (reg,) = [r for r in power.registrations() if r.domain == domain.name]
    return domain, Path(reg.backing)


@pytest.mark.timeout(900)  # two guest boots under TCG
def test_power_loss_fail_saves_pmem_in_the_battery_window_then_kills_the_host(
        the_lab: lab.Lab, guest_image: object, tmp_path: Path) -> None:
    """host2 loses power: its hvextd saves the protected guest's PMEM within the battery window, then
    everything of host2 dies and its link is cut; host1 and its guest run on."""
    import json

    host1, host2 = the_lab.hosts
    conn1, conn2 = Host(host1.uri_unix), Host(host2.uri_unix)
    keep, lost = VMFactory(conn1), VMFactory(conn2)
    failed = False
    protected: tuple[Domain, Path] | None = None
    try:
        survivor = keep.boot(keep.define(memory_mib=512), wait_agent=False)  # boots while host2's guest does
        protected = _protected_guest(lost, host2.uri_unix, tmp_path / "store")
        domain, backing = protected
        lost.boot(domain)
        aio.run(survivor.wait_agent(BOOT_TIMEOUT_S))
        guest_exec(domain, "python3", "-c", "import os, random\n"
                   "fd = os.open('/dev/pmem0', os.O_RDWR)\n"
                   "os.pwrite(fd, random.Random(7).randbytes(1 << 20), 4 << 20)\n"
                   "os.fsync(fd)\n")
        before = _host_refs(the_lab.state, 2)
        assert {"virtlogd", "libvirtd", "hvextd"} <= {r.comm for r in before}
        assert any(r.comm.startswith("qemu") for r in before), before

        result = hvext_cli("lab", "fail", "host2", "--power-loss", "--battery", "8", "--json")
        failed = True
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["power_loss"] and report["battery_seconds"] == 8 and report["sigpwr_at"] < 1, report
        assert 8 <= report["kill_at"] < 9, report
        killed = {item.split()[0] for item in report["killed"]}
        assert {"virtlogd", "libvirtd", "hvextd"} <= killed and any(c.startswith("qemu") for c in killed), report

        # Everything of host2 is dead; the save finished before the kill: the store holds the guest's write.
        assert not any(procs.is_alive(r) for r in before) and _host_refs(the_lab.state, 2) == []
        log = (plan.host_run_dir(the_lab.state.run_dir, 2) / "hvextd.log").read_text()
        assert "SIGPWR: power is failing" in log and f"power loss: {domain.name} {backing}: 1048576 bytes" in log, log
        (reg,) = [r for r in power.registrations() if r.domain == domain.name]
        assert reg.pending == "resume", reg
        assert not Store.open(Path(reg.store)).differs(backing)  # the shm file outlived QEMU, as a host's RAM won't

        # host2 is failed and unreachable; host1 and its guest run on.
        status = json.loads(hvext_cli("lab", "status", "--json").stdout)
        h1, h2 = status["hosts"]
        assert h2["phase"] == "failed" and not h2["link_up"] and not h2["answering"], h2
        assert not any(h2["daemons"].values()), h2
        assert h1["phase"] == "up" and h1["link_up"] and h1["answering"] and all(h1["daemons"].values()), h1
        assert in_netns(host1, PY, "-c", PING, host2.address).returncode != 0  # the peer sees it gone
        assert aio.run(survivor.wait_agent(30))  # the guest on host1 still answers its agent
    finally:
        if protected is not None:
            power.unprotect(protected[0].name, protected[1], remove_store=True, missing_ok=True)
            protected[1].unlink(missing_ok=True)
        keep.cleanup()
        conn1.close()
        if failed:  # host2's guest went with its host; hvext's shared state of it stays
            for domain in lost.domains:
                remove_domain_state(domain.name)
            lost.domains.clear()
        else:
            lost.cleanup()
        conn2.close()
        the_lab.state = lab.Lab.load().state  # type: ignore[union-attr]


def test_revive_brings_back_an_empty_working_host_and_an_abrupt_fail_kills_it_again(
        the_lab: lab.Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    host1 = the_lab.hosts[0]
    if the_lab.state.hosts[1].phase is not lab.HostPhase.FAILED:
        the_lab.fail("host2")
    # A revive that fails half-way leaves the host failed, with nothing running in it.
    real_wait = lab.daemons.wait_ready

    def started_then_broke(*args: object, **kwargs: object) -> dict[str, procs.ProcessRef]:
        real_wait(*args, **kwargs)  # type: ignore[arg-type]
        raise lab.LabError("injected failure")

    monkeypatch.setattr(lab.daemons, "wait_ready", started_then_broke)
    with pytest.raises(lab.LabError, match="injected failure"):
        the_lab.revive("host2")
    monkeypatch.undo()
    assert lab.Lab.load().state.hosts[1].phase is lab.HostPhase.FAILED  # type: ignore[union-attr]
    assert _host_refs(the_lab.state, 2) == [] and not net.link_up(2)

    result = hvext_cli("lab", "revive", "host2")
    assert result.returncode == 0 and "host2 is up again (empty)" in result.stdout, result.stderr
    the_lab.state = lab.Lab.load().state  # type: ignore[union-attr]
    host2 = the_lab.hosts[1]
    assert host2.phase is lab.HostPhase.UP and net.link_up(2)
    assert all(s.answering for s in the_lab.status())
    assert in_netns(host1, PY, "-c", PING, host2.address).returncode == 0  # the link is back
    rules = in_netns(host2, "iptables", "-w", "-S", "INPUT").stdout.splitlines()
    assert len(rules) == 1 + len(plan.firewall_rules()), rules  # the policy line, then each rule once
    name = f"hvext-labtest-revived-{os.getpid()}"
    conn = libvirt.open(host2.uri_tls)
    try:
        assert conn.listAllDomains(0) == []  # empty: host2's earlier definitions are gone
        dom = conn.defineXML(TINY_DOMAIN.format(name=name))
        dom.create()
        qemu = procs.identify(procs.read_pid_file(plan.host_run_dir(the_lab.state.run_dir, 2) / "libvirt" / "qemu"
                                                  / f"{name}.pid") or 0)
        assert qemu is not None and procs.netns_inode(qemu.pid) == net.netns_inode(host2.netns)
    finally:
        conn.close()

    # An abrupt fail (no battery) takes the QEMU with it at once; revive again for the tests that follow.
    daemon_refs = list(host2.processes.values())
    report = the_lab.fail("host2")
    assert not report.power_loss and report.sigpwr_at is None and report.kill_at < 1 and report.link_was_up
    assert not procs.is_alive(qemu) and not any(procs.is_alive(r) for r in daemon_refs)
    assert _host_refs(the_lab.state, 2) == []
    with pytest.raises(lab.LabUsageError, match="already failed"):
        the_lab.fail("host2")
    the_lab.revive("host2")
    the_lab.state = lab.Lab.load().state  # type: ignore[union-attr]
    assert all(s.answering for s in the_lab.status())


def test_up_rebuilds_a_host_whose_libvirtd_died(the_lab: lab.Lab) -> None:
    victim = the_lab.hosts[1].processes["libvirtd"]
    procs.kill_all([victim])
    assert not lab.Lab.load().status()[1].answering  # type: ignore[union-attr]
    rebuilt = lab.Lab.up(2)
    assert rebuilt.created and "host2's libvirtd is not running" in rebuilt.replaced
    assert all(s.answering for s in rebuilt.status())
    the_lab.state = rebuilt.state  # later tests use the new processes


def test_down_removes_everything(the_lab: lab.Lab) -> None:
    state = lab.Lab.load().state  # type: ignore[union-attr]
    refs = [ref for h in state.hosts for ref in h.processes.values()]
    conn = libvirt.open(state.hosts[0].uri_unix)
    try:
        conn.createXML(TINY_DOMAIN.format(name=f"hvext-labtest-down-{os.getpid()}"), 0)
        qemu_pid = procs.read_pid_file(state.run_dir / "host1" / "libvirt" / "qemu"
                                       / f"hvext-labtest-down-{os.getpid()}.pid")
    finally:
        conn.close()
    qemu = procs.identify(qemu_pid) if qemu_pid else None
    assert qemu is not None and len(refs) == 6 and all(procs.is_alive(r) for r in refs)
    stray = subprocess.Popen(["ip", "netns", "exec", state.hosts[1].netns, "sleep", "600"])  # nobody records it
    deadline = time.monotonic() + 10
    while (procs.identify(stray.pid) or qemu).comm != "sleep" \
            or procs.netns_inode(stray.pid) != net.netns_inode(state.hosts[1].netns):
        assert time.monotonic() < deadline, "the stray process never ran in host2"
        time.sleep(0.02)

    started = time.monotonic()
    result = hvext_cli("lab", "down")
    print(f"lab down: {time.monotonic() - started:.2f} s")
    assert result.returncode == 0, result.stderr
    assert not any(procs.is_alive(r) for r in refs + [qemu])
    assert stray.wait(timeout=10) == -9  # killed with its host's namespace, not left in a deleted one
    assert net.present() == {"netns": [], "links": []}
    for host in state.hosts:
        assert not net.netns_exists(host.netns)
        assert not plan.host_run_dir(state.run_dir, host.index).exists()
        assert not plan.host_data_dir(state.data_dir, host.index).exists()
    assert not lab.state_file(state.run_dir).exists() and lab.Lab.load() is None
    assert not plan.pki_dir(state.data_dir).exists()  # the lab's CA keys go with it
    assert subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True,
                          timeout=30).returncode == 0  # the machine's own libvirtd is untouched

    again = hvext_cli("lab", "down")
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_failed_up_leaves_nothing(the_lab: lab.Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs after the down test: an `up` that fails half-way removes what it made and keeps the cause."""
    assert lab.Lab.load() is None
    real_wait = lab.daemons.wait_ready

    def wait_then_fail(host: lab.LabHost, *args: object, **kwargs: object) -> dict[str, procs.ProcessRef]:
        refs = real_wait(host, *args, **kwargs)  # type: ignore[arg-type]
        if host.index == 2:
            raise lab.LabError("injected failure")
        return refs

    monkeypatch.setattr(lab.daemons, "wait_ready", wait_then_fail)
    with pytest.raises(lab.LabError, match="injected failure"):
        lab.Lab.up(2)
    assert lab.Lab.load() is None
    assert net.present() == {"netns": [], "links": []}
    assert not (plan.RUN_DIR / "host1").exists() and not (plan.DATA_DIR / "host2").exists()
