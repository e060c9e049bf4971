"""The pure parts of the lab: names, addresses, URIs, config files and the state file.

Nothing here touches the machine, so all of it is unit-tested without root.
The lab uses 198.18.0.0/24, a slice of the benchmarking range 198.18.0.0/15
(RFC 2544) that no real network routes: the bridge has .1, host *i* has
.(10+i). The bridge has no uplink, so lab traffic never leaves the machine.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import os
import re
import shlex
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvext import paths
from hvext.errors import HostError, UsageError


class LabError(HostError):
    """The multi-host lab could not be created, inspected or removed."""


class LabUsageError(UsageError):
    """A bad lab request (host count out of range, a different lab already up)."""


MIN_HOSTS = 1
MAX_HOSTS = 8
#: 2: each host records its phase (:class:`HostPhase`) and its hvextd.
STATE_VERSION = 2

#: The lab's subnet: inside 198.18.0.0/15, the range reserved for benchmarks.
LAB_NETWORK = ipaddress.IPv4Network("198.18.0.0/24")
BENCHMARK_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
BRIDGE_ADDRESS = LAB_NETWORK.network_address + 1
HOST_OFFSET = 10
#: The Linux bridge in the root namespace (names are at most 15 characters).
BRIDGE_NAME = "hvextlab0"
NETNS_PREFIX = "hvext-lab-"
VETH_PREFIX = "hvlab"
#: The interface name each host sees inside its namespace.
HOST_IFNAME = "eth0"
HOSTNAME_DOMAIN = "hvext-lab"
#: libvirtd's TLS port on each host's lab address (libvirt's default); plain TCP (16509) is off.
LIBVIRT_TLS_PORT = 16514
#: The subject of root's client certificate, the only one a lab libvirtd accepts.
ROOT_CLIENT_CN = "root@hvext-lab"
#: That subject as libvirt reads it (certificate order, see virt-pki-query-dn), for ``tls_allowed_dn_list``.
ROOT_CLIENT_DN = f"O=hvext lab,CN={ROOT_CLIENT_CN}"

#: Runtime files (state file, lock, per-host sockets and pid files).
RUN_DIR = Path(os.environ.get("HVEXT_LAB_RUN_DIR", "/run/hvext-lab"))
#: Per-host private libvirt trees (config, lib, log, cache); under hvext's state dir.
DATA_DIR = paths.STATE_DIR / "lab"

#: Directories private to each host: the path libvirtd sees -> subdirectory of the host's data dir.
PRIVATE_DIRS = {
    "/etc/libvirt": "etc",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}
#: The daemons each host runs, in start order (stopped in reverse).
DAEMONS = ("virtlogd", "libvirtd", "hvextd")
#: What each host of a cluster lab (``hvext lab up --cluster``) runs besides: its etcd member.
CLUSTER_DAEMONS = ("etcd",)
#: The cluster lab's etcd: its name and the ports each member listens on at its host's lab address
#: (etcd's own defaults, as hvext.ha.etcd has them).
CLUSTER_NAME = "hvext-lab"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
#: What hvextd logs once its signal handlers are set and it watches its libvirtd (its readiness).
HVEXTD_READY = "watching qemu:///system"
#: The battery window of `hvext lab fail HOST --power-loss`: SIGPWR, then this long until the kill.
DEFAULT_BATTERY_S = 10.0
MAX_BATTERY_S = 600.0

_HOST_NAME = re.compile(r"host([1-9][0-9]*)")


def validate_count(count: object) -> int:
    """The number of hosts, checked: an int from MIN_HOSTS to MAX_HOSTS."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise LabUsageError(f"the host count must be a whole number, not {count!r}")
    if not MIN_HOSTS <= count <= MAX_HOSTS:
        raise LabUsageError(f"host count {count} out of range: use {MIN_HOSTS} to {MAX_HOSTS}")
    return count


def _check_index(index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not MIN_HOSTS <= index <= MAX_HOSTS:
        raise LabUsageError(f"host index {index!r} out of range: use {MIN_HOSTS} to {MAX_HOSTS}")
    return index


def host_name(index: int) -> str:
    return f"host{_check_index(index)}"


def host_index(name: str) -> int:
    """The index of ``hostN``; the inverse of :func:`host_name`."""
    match = _HOST_NAME.fullmatch(name)
    if not match:
        raise LabUsageError(f"not a lab host name: {name!r} (expected host1 to host{MAX_HOSTS})")
    return _check_index(int(match.group(1)))


def host_address(index: int) -> str:
    address = LAB_NETWORK.network_address + HOST_OFFSET + _check_index(index)
    assert address in LAB_NETWORK and address in BENCHMARK_RANGE
    return str(address)


def netns_name(index: int) -> str:
    return f"{NETNS_PREFIX}{host_name(index)}"


def veth_name(index: int) -> str:
    """The root-namespace end of host *index*'s veth pair (the bridge port)."""
    return f"{VETH_PREFIX}{_check_index(index)}"


def veth_peer_name(index: int) -> str:
    """The temporary name of the namespace end before it is moved and renamed to eth0."""
    return f"{VETH_PREFIX}{_check_index(index)}p"


def hostname(index: int) -> str:
    """The host's UTS name; distinct per host because libvirt refuses migrating to "the same host"."""
    return f"{host_name(index)}.{HOSTNAME_DOMAIN}"


def host_run_dir(run_dir: Path, index: int) -> Path:
    return run_dir / host_name(index)


def host_data_dir(data_dir: Path, index: int) -> Path:
    return data_dir / host_name(index)


def libvirt_socket(run_dir: Path, index: int) -> Path:
    """Where host *index*'s read-write socket appears in the root namespace."""
    return host_run_dir(run_dir, index) / "libvirt" / "libvirt-sock"


def uri_unix(run_dir: Path, index: int) -> str:
    return f"qemu+unix:///system?socket={libvirt_socket(run_dir, index)}"


def pki_dir(data_dir: Path) -> Path:
    """The lab's CAs (keys private to root) and root's client certificate."""
    return data_dir / "pki"


def client_pki_dir(data_dir: Path) -> Path:
    """root's libvirt client credentials (cacert.pem, clientcert.pem, clientkey.pem): the URIs' pkipath."""
    return pki_dir(data_dir) / "client"


def host_tls_dir(data_dir: Path, index: int) -> Path:
    """Host *index*'s libvirtd server certificate and key."""
    return host_data_dir(data_dir, index) / "tls"


def uri_tls(index: int, data_dir: Path) -> str:
    """Host *index*'s libvirt over TLS, authenticated by root's client certificate (reachable from
    the root namespace and from every lab host; only root can read the key)."""
    pki = urllib.parse.quote(str(client_pki_dir(data_dir)), safe="/")
    return f"qemu+tls://{host_address(index)}/system?pkipath={pki}"


# -- config files ---------------------------------------------------------

def libvirtd_conf(index: int, host_uuid: str, data_dir: Path) -> str:
    """libvirtd.conf of one host: its own UUID; TLS only, on its lab address only, with a client
    certificate from the lab's CA that must be root's."""
    uuid.UUID(host_uuid)  # raises ValueError on a malformed UUID
    tls = host_tls_dir(data_dir, index)
    return "\n".join([
        f"# hvext lab {host_name(index)}: written by `hvext lab up`, removed by `hvext lab down`.",
        f'host_uuid = "{host_uuid}"',
        "listen_tcp = 0",
        "listen_tls = 1",
        f'listen_addr = "{host_address(index)}"',
        f'tls_port = "{LIBVIRT_TLS_PORT}"',
        # The client certificate is the authentication: signed by the lab's libvirt CA, and root's.
        'auth_tls = "none"',
        "tls_no_verify_certificate = 0",
        "tls_no_sanity_certificate = 0",
        f'tls_allowed_dn_list = ["{ROOT_CLIENT_DN}"]',
        # The sockets (reachable from the root namespace under the run dir) are root's alone, whatever
        # polkit would say: read-only access lists every domain, read-write is root's power.
        'unix_sock_group = "root"',
        'unix_sock_ro_perms = "0700"',
        'unix_sock_rw_perms = "0700"',
        'unix_sock_admin_perms = "0700"',
        f'key_file = "{tls / "serverkey.pem"}"',
        f'cert_file = "{tls / "servercert.pem"}"',
        f'ca_file = "{tls / "cacert.pem"}"',
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"',
        "",
    ])


#: qemu.conf keys the lab sets; lines setting them in the machine's qemu.conf are dropped.
QEMU_CONF_KEYS = ("migration_address", "migration_host", "cgroup_controllers")


def qemu_conf(base: str, index: int) -> str:
    """The machine's qemu.conf with the lab's settings for host *index* appended.

    Migration listens on and advertises the lab address (the hostname is not
    resolvable); the host's firewall keeps those ports from the root
    namespace (:func:`firewall_rules`). Cgroups are off: all lab hosts share the kernel's cgroup tree,
    where two libvirtds would name domain groups alike (``qemu-1-NAME``).
    """
    kept = [line for line in base.splitlines()
            if not any(re.match(rf"\s*{key}\s*=", line) for key in QEMU_CONF_KEYS)]
    return "\n".join(kept + [
        "",
        f"# hvext lab {host_name(index)}",
        f'migration_address = "{host_address(index)}"',
        f'migration_host = "{host_address(index)}"',
        "cgroup_controllers = [ ]",
        "",
    ])


def hosts_file(base: str, count: int) -> str:
    """The machine's /etc/hosts plus a line per lab host, so hosts resolve each other's names."""
    lines = base.rstrip("\n").splitlines()
    lines += ["", "# hvext lab", f"{BRIDGE_ADDRESS} gateway.{HOSTNAME_DOMAIN}"]
    lines += [f"{host_address(i)} {hostname(i)} {host_name(i)}" for i in range(1, validate_count(count) + 1)]
    return "\n".join(lines) + "\n"


def firewall_rules() -> list[list[str]]:
    """iptables arguments for the INPUT chain of every lab host's network namespace.

    The lab addresses are reachable from the root namespace, where every local
    user is: from there only libvirtd's TLS port and etcd's client port (both
    requiring a client certificate) answer. Everything else a host serves (etcd's
    peer port, QEMU's migration ports, NBD, any guest display) accepts only the
    other lab hosts. A user in the root
    namespace cannot take a lab host's source address (no raw sockets, and the
    replies go to that host), so the rules go by source address.
    """
    rules = [["-i", "lo", "-j", "ACCEPT"],
             ["-p", "tcp", "--dport", str(LIBVIRT_TLS_PORT), "-j", "ACCEPT"],
             # etcd's client port (cluster lab): TLS with a client certificate of the lab's cluster CA.
             ["-p", "tcp", "--dport", str(ETCD_CLIENT_PORT), "-j", "ACCEPT"]]
    rules += [["-s", host_address(i), "-j", "ACCEPT"] for i in range(MIN_HOSTS, MAX_HOSTS + 1)]
    rules += [["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"], ["-j", "DROP"]]
    return rules


def check_battery(seconds: object) -> float:
    """The battery window of a power-loss failure, checked: 0 to MAX_BATTERY_S seconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds != seconds \
            or not 0 <= seconds <= MAX_BATTERY_S:
        raise LabUsageError(f"the battery window must be 0 to {MAX_BATTERY_S:.0f} seconds, not {seconds!r}")
    return float(seconds)


def etcd_peer_url(index: int) -> str:
    return f"https://{host_address(index)}:{ETCD_PEER_PORT}"


def etcd_client_url(index: int) -> str:
    return f"https://{host_address(index)}:{ETCD_CLIENT_PORT}"


def etcd_initial_cluster(count: int) -> str:
    """etcd's static ``--initial-cluster`` of a cluster lab: every host a member, by its lab address."""
    return ",".join(f"{host_name(i)}={etcd_peer_url(i)}" for i in range(1, validate_count(count) + 1))


def etcd_endpoints(index: int, count: int) -> list[str]:
    """The client URLs host *index* uses: its own member first, then the others."""
    if not 1 <= _check_index(index) <= validate_count(count):
        raise LabUsageError(f"{host_name(index)} is not in a {count}-host lab")
    others = [i for i in range(1, count + 1) if i != index]
    return [etcd_client_url(i) for i in [index, *others]]


#: The lease TTL and fence margin of a cluster lab's hvextds (hvextd's defaults).
LAB_LEASE_TTL_S = 5
LAB_FENCE_MARGIN_S = 1.0


def hvextd_conf(index: int, count: int, credentials: Path) -> str:
    """hvextd.toml of host *index* in a cluster lab: an ``[ha]`` section holding the host's lease in the
    lab's etcd through its own member first, with the member's certificate in *credentials*."""
    endpoints = ", ".join(f'"{url}"' for url in etcd_endpoints(index, count))
    return "\n".join([
        f"# hvext lab {host_name(index)}: written by `hvext lab up --cluster`.",
        "[ha]",
        f'cluster = "{CLUSTER_NAME}"',
        f"etcd_endpoints = [{endpoints}]",
        f'host = "{host_name(index)}"',
        f"lease_ttl = {LAB_LEASE_TTL_S}",
        f"fence_margin = {LAB_FENCE_MARGIN_S}",
        f'credentials = "{credentials}"',
        "",
    ])


def hvextd_command(hvextd: str, pythonpath: str, run_dir: Path, index: int, config: Path | None = None) -> str:
    """The start script's line that runs the host's hvextd in the background.

    It watches the host's own libvirtd (``qemu:///system`` inside the host's
    mount namespace is the host's socket) and logs to, and leaves its PID in,
    the host's run directory; with *config* (a cluster lab's :func:`hvextd_conf`) it runs that config. ``setsid`` in a non-interactive shell execs
    without forking (a background job is no group leader), so ``$!`` is
    hvextd's PID; its command name is ``hvextd`` (the console script).
    """
    hrun = host_run_dir(run_dir, index)
    conf = f"--config {shlex.quote(str(config))} " if config is not None else ""
    return (f"PYTHONPATH={shlex.quote(pythonpath)} setsid {shlex.quote(hvextd)} -c qemu:///system {conf}"
            f"</dev/null >>{hrun / 'hvextd.log'} 2>&1 &\n"
            f"echo $! > {hrun / 'hvextd.pid'}")


def start_script(index: int, run_dir: Path, data_dir: Path, hvextd: str = "", pythonpath: str = "",
                 hvextd_config: Path | None = None) -> str:
    """The shell script that runs inside host *index*'s new mount and UTS namespaces.

    It makes libvirt's directories private bind mounts of the host's own
    directories, sets the host's firewall (:func:`firewall_rules`; a revived
    host's namespace still has the old rules, so the chain is flushed
    first), then starts virtlogd and libvirtd as daemons and, when *hvextd*
    (the path of the ``hvextd`` script) is given, the host's hvextd
    (:func:`hvextd_command`), and exits; the daemons keep the namespaces
    alive. /run/libvirt is bound from the host's run directory so its
    sockets are reachable from the root namespace.
    """
    hrun = host_run_dir(run_dir, index)
    hdata = host_data_dir(data_dir, index)
    lines = [
        "set -eu",
        f"hostname {hostname(index)}",
        f"mount --bind {hrun / 'libvirt'} /run/libvirt",
        f"mount --bind {hdata / 'hosts'} /etc/hosts",
    ]
    lines += [f"mount --bind {hdata / sub} {target}" for target, sub in PRIVATE_DIRS.items()]
    # No IPv6 (link-local addresses would bypass the rules), then the firewall, before any daemon.
    lines += [f"if [ -w /proc/sys/net/ipv6/conf/{c}/disable_ipv6 ]; then echo 1 > /proc/sys/net/ipv6/conf/{c}/disable_ipv6; fi"
              for c in ("all", "default", HOST_IFNAME)]
    lines += ["iptables -w -F INPUT"]
    lines += ["iptables -w -A INPUT " + " ".join(rule) for rule in firewall_rules()]
    lines += [
        f"/usr/sbin/virtlogd --daemon --config /etc/libvirt/virtlogd.conf --pid-file {hrun / 'virtlogd.pid'}",
        f"/usr/sbin/libvirtd --daemon --listen --config /etc/libvirt/libvirtd.conf "
        f"--pid-file {hrun / 'libvirtd.pid'}",
    ]
    if hvextd:
        lines.append(hvextd_command(hvextd, pythonpath, run_dir, index, hvextd_config))
    return "\n".join(lines + [""])


# -- state ------------------------------------------------------------------

@dataclass(frozen=True)
class ProcessRef:
    """A process the lab started, identified by PID and start time (so a reused PID is not it)."""

    pid: int
    start_ticks: int
    comm: str


class HostPhase(enum.StrEnum):
    """Where one lab host is. UP: its daemons run and its link is up. FAILING: `hvext lab fail` began
    (the battery window of a power loss, then the kill); a fail that stopped half-way leaves it here,
    and `fail` again finishes it. FAILED: every process of the host was killed and its link is cut.
    UP -> FAILING -> FAILED -> UP (`hvext lab revive`, as an empty host); the guards are the
    ``begin_fail``, ``mark_failed`` and ``mark_revived`` methods of :class:`LabHost`."""

    UP = "up"
    FAILING = "failing"
    FAILED = "failed"


@dataclass
class LabHost:
    """One lab host: a network, mount and UTS namespace with its own libvirtd."""

    index: int
    uuid: str
    run_dir: Path = RUN_DIR
    processes: dict[str, ProcessRef] = field(default_factory=dict)
    data_dir: Path = DATA_DIR
    phase: HostPhase = HostPhase.UP

    def __post_init__(self) -> None:
        self.phase = HostPhase(self.phase)  # ValueError for anything that is not a host phase

    def begin_fail(self) -> None:
        """UP (or FAILING: finish a fail that stopped half-way) becomes FAILING; LabUsageError when
        the host already failed."""
        if self.phase is HostPhase.FAILED:
            raise LabUsageError(f"{self.name} has already failed; `hvext lab revive {self.name}` brings it back")
        self.phase = HostPhase.FAILING

    def mark_failed(self) -> None:
        """FAILING becomes FAILED (its processes are dead, its link cut); LabError in any other phase."""
        if self.phase is not HostPhase.FAILING:
            raise LabError(f"{self.name} is {self.phase}, not {HostPhase.FAILING}: only a failing host fails")
        self.phase = HostPhase.FAILED

    def check_revivable(self) -> None:
        """LabUsageError unless the host is FAILED (only a failed host is revived)."""
        if self.phase is not HostPhase.FAILED:
            hint = f"; `hvext lab fail {self.name}` finishes its failure first" \
                if self.phase is HostPhase.FAILING else ""
            raise LabUsageError(f"{self.name} is {self.phase}, not {HostPhase.FAILED}: only a failed host "
                                f"is revived{hint}")

    def mark_revived(self) -> None:
        """FAILED becomes UP (its daemons answer again); LabUsageError in any other phase."""
        self.check_revivable()
        self.phase = HostPhase.UP

    @property
    def name(self) -> str:
        return host_name(self.index)

    @property
    def address(self) -> str:
        return host_address(self.index)

    @property
    def netns(self) -> str:
        return netns_name(self.index)

    @property
    def hostname(self) -> str:
        return hostname(self.index)

    @property
    def uri_tls(self) -> str:
        """The host's libvirt over the network (TLS with root's client certificate)."""
        return uri_tls(self.index, self.data_dir)

    @property
    def uri_unix(self) -> str:
        return uri_unix(self.run_dir, self.index)

    @property
    def socket(self) -> Path:
        return libvirt_socket(self.run_dir, self.index)


class Phase(enum.StrEnum):
    """Where the recorded lab is: CREATING while ``up`` builds it (and after an ``up`` that did not
    finish), UP once every libvirtd answered. It only moves from CREATING to UP
    (:meth:`LabState.mark_up`); ``down`` removes the lab in any phase."""

    CREATING = "creating"
    UP = "up"


@dataclass
class LabState:
    """What lab.json holds: enough for any process to find, use and remove the lab."""

    hosts: list[LabHost]
    phase: Phase
    created: float
    run_dir: Path
    data_dir: Path
    #: A cluster lab: each host also runs an etcd member, and its hvextd holds a lease (``--cluster``).
    cluster: bool = False

    def __post_init__(self) -> None:
        self.phase = Phase(self.phase)  # ValueError for anything that is not a phase

    def mark_up(self) -> None:
        """The build finished: CREATING becomes UP; LabError in any other phase."""
        if self.phase is not Phase.CREATING:
            raise LabError(f"the lab is {self.phase}, not {Phase.CREATING}: only a lab being created comes up")
        self.phase = Phase.UP

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "version": STATE_VERSION,
            "phase": self.phase,
            "created": self.created,
            "run_dir": str(self.run_dir),
            "data_dir": str(self.data_dir),
            "cluster": self.cluster,
            "bridge": {"name": BRIDGE_NAME, "address": f"{BRIDGE_ADDRESS}/{LAB_NETWORK.prefixlen}"},
            "hosts": [{
                "name": h.name, "index": h.index, "uuid": h.uuid, "address": h.address,
                "netns": h.netns, "hostname": h.hostname,
                "uri_unix": h.uri_unix, "uri_tls": h.uri_tls,
                "processes": {k: asdict(v) for k, v in h.processes.items()},
                "phase": h.phase,
            } for h in self.hosts],
        }
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "lab state") -> LabState:
        """Parse and check lab.json; anything unexpected is a :class:`LabError`."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise LabError(f"{source}: not valid JSON ({err}); `hvext lab down` removes the lab") from err
        try:
            if not isinstance(data, dict):
                raise TypeError("top level is not an object")
            if data.get("version") != STATE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {STATE_VERSION}")
            phase = data["phase"]
            if not isinstance(phase, str) or phase not in {p.value for p in Phase}:
                raise ValueError(f"unknown phase {phase!r}")
            run_dir = Path(data["run_dir"])
            hosts = []
            for entry in data["hosts"]:
                processes = {}
                for daemon, ref in entry.get("processes", {}).items():
                    if daemon not in DAEMONS + CLUSTER_DAEMONS:
                        raise ValueError(f"unknown daemon {daemon!r}")
                    values = (ref["pid"], ref["start_ticks"])
                    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                        raise ValueError(f"bad process record {ref!r}")
                    processes[daemon] = ProcessRef(ref["pid"], ref["start_ticks"], str(ref["comm"]))
                index = entry["index"]
                if host_name(index) != entry["name"]:
                    raise ValueError(f"host {entry['name']!r} has index {index!r}")
                host_phase = entry["phase"]
                if not isinstance(host_phase, str) or host_phase not in {p.value for p in HostPhase}:
                    raise ValueError(f"unknown host phase {host_phase!r}")
                hosts.append(LabHost(index=index, uuid=str(uuid.UUID(entry["uuid"])), run_dir=run_dir,
                                     processes=processes, data_dir=Path(data["data_dir"]),
                                     phase=HostPhase(host_phase)))
            if [h.index for h in hosts] != list(range(1, len(hosts) + 1)):
                raise ValueError("hosts are not host1..hostN in order")
            validate_count(len(hosts))
            cluster = data.get("cluster", False)
            if not isinstance(cluster, bool):
                raise ValueError(f"cluster is {cluster!r}, not true or false")
            return cls(hosts=hosts, phase=Phase(phase), created=float(data["created"]),
                       run_dir=run_dir, data_dir=Path(data["data_dir"]), cluster=cluster)
        except (KeyError, TypeError, ValueError, UsageError) as err:
            raise LabError(f"{source}: malformed ({type(err).__name__}: {err}); "
                           "`hvext lab down` removes the lab") from err


def new_hosts(count: int, run_dir: Path = RUN_DIR, data_dir: Path = DATA_DIR) -> list[LabHost]:
    """Hosts 1..count, each with a fresh random host UUID."""
    return [LabHost(index=i, uuid=str(uuid.uuid4()), run_dir=run_dir, data_dir=data_dir)
            for i in range(1, validate_count(count) + 1)]
