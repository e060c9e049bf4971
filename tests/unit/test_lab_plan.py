"""The lab's pure parts: input validation, addresses, names, URIs, config files, the state file."""

from __future__ import annotations

import ipaddress
import json
import uuid
from pathlib import Path

import pytest

from hvext.errors import HostError, UsageError
from hvext.lab import plan
from hvext.lab.plan import HostPhase, LabError, LabHost, LabState, LabUsageError, Phase, ProcessRef

DATA = Path("/var/lib/hvext/lab")
RUN = Path("/run/hvext-lab")


@pytest.mark.parametrize("count", [1, 2, 8])
def test_validate_count_accepts_1_to_8(count: int) -> None:
    assert plan.validate_count(count) == count


@pytest.mark.parametrize("count", [0, -1, 9, 100, "2", 2.0, True, None])
def test_validate_count_rejects(count: object) -> None:
    with pytest.raises(LabUsageError):
        plan.validate_count(count)


def test_errors_fit_the_hvext_tree() -> None:
    assert issubclass(LabError, HostError)
    assert issubclass(LabUsageError, UsageError)


def test_addresses_are_distinct_in_the_benchmark_range_and_off_the_bridge() -> None:
    addresses = [plan.host_address(i) for i in range(1, plan.MAX_HOSTS + 1)]
    assert addresses[0] == "198.18.0.11" and addresses[-1] == "198.18.0.18"
    assert len(set(addresses)) == plan.MAX_HOSTS
    assert str(plan.BRIDGE_ADDRESS) == "198.18.0.1" and str(plan.BRIDGE_ADDRESS) not in addresses
    for address in addresses + [str(plan.BRIDGE_ADDRESS)]:
        ip = ipaddress.IPv4Address(address)
        assert ip in plan.LAB_NETWORK and ip in ipaddress.IPv4Network("198.18.0.0/15")
        assert ip != plan.LAB_NETWORK.broadcast_address


@pytest.mark.parametrize("index", [0, 9, -3])
def test_per_host_names_reject_bad_indexes(index: int) -> None:
    for fn in (plan.host_name, plan.host_address, plan.netns_name, plan.veth_name):
        with pytest.raises(LabUsageError):
            fn(index)


def test_names_fit_linux_limits() -> None:
    for i in range(1, plan.MAX_HOSTS + 1):
        for ifname in (plan.veth_name(i), plan.veth_peer_name(i), plan.BRIDGE_NAME):
            assert len(ifname) <= 15  # IFNAMSIZ - 1
        assert plan.netns_name(i) == f"hvext-lab-host{i}"
        assert plan.hostname(i) == f"host{i}.hvext-lab"


def test_host_index_round_trips() -> None:
    assert [plan.host_index(plan.host_name(i)) for i in range(1, 9)] == list(range(1, 9))
    for bad in ("host0", "host9", "host", "hostx", "Host1", "host01", "xhost1"):
        with pytest.raises(LabUsageError):
            plan.host_index(bad)


def test_uris() -> None:
    assert plan.uri_unix(RUN, 1) == "qemu+unix:///system?socket=/run/hvext-lab/host1/libvirt/libvirt-sock"
    assert plan.uri_tls(2, DATA) == "qemu+tls://198.18.0.12/system?pkipath=/var/lib/hvext/lab/pki/client"
    assert plan.uri_tls(1, Path("/srv/my lab")) == "qemu+tls://198.18.0.11/system?pkipath=/srv/my%20lab/pki/client"
    host = LabHost(index=3, uuid=str(uuid.uuid4()), run_dir=Path("/tmp/x"), data_dir=Path("/d"))
    assert host.uri_tls == "qemu+tls://198.18.0.13/system?pkipath=/d/pki/client"
    assert host.uri_unix == "qemu+unix:///system?socket=/tmp/x/host3/libvirt/libvirt-sock"
    assert host.socket == Path("/tmp/x/host3/libvirt/libvirt-sock")
    assert (host.name, host.address, host.netns) == ("host3", "198.18.0.13", "hvext-lab-host3")


def test_libvirtd_conf_listens_only_with_tls_and_roots_client_certificate() -> None:
    host_uuid = str(uuid.uuid4())
    conf = plan.libvirtd_conf(2, host_uuid, DATA)
    assert f'host_uuid = "{host_uuid}"' in conf
    assert 'listen_addr = "198.18.0.12"' in conf
    assert "listen_tcp = 0" in conf and "listen_tls = 1" in conf and "auth_tcp" not in conf
    assert "tls_no_verify_certificate = 0" in conf and "tls_no_sanity_certificate = 0" in conf
    assert 'tls_allowed_dn_list = ["O=hvext lab,CN=root@hvext-lab"]' in conf
    for kind in ("ro", "rw", "admin"):
        assert f'unix_sock_{kind}_perms = "0700"' in conf
    assert 'key_file = "/var/lib/hvext/lab/host2/tls/serverkey.pem"' in conf
    assert 'ca_file = "/var/lib/hvext/lab/host2/tls/cacert.pem"' in conf
    with pytest.raises(ValueError):
        plan.libvirtd_conf(2, "not-a-uuid", DATA)


def test_qemu_conf_replaces_the_keys_the_lab_sets() -> None:
    base = ('user = "libvirt-qemu"\nmigration_address = "0.0.0.0"\n#migration_host = "x"\n'
            '  cgroup_controllers = [ "cpu" ]\n')
    conf = plan.qemu_conf(base, 1)
    assert 'user = "libvirt-qemu"' in conf and '#migration_host = "x"' in conf  # comments and others kept
    assert '"0.0.0.0"' not in conf and '"cpu"' not in conf
    assert 'migration_address = "198.18.0.11"' in conf and 'migration_host = "198.18.0.11"' in conf
    assert "cgroup_controllers = [ ]" in conf


def test_hosts_file_names_every_host() -> None:
    text = plan.hosts_file("127.0.0.1 localhost\n", 2)
    assert text.startswith("127.0.0.1 localhost\n")
    assert "198.18.0.11 host1.hvext-lab host1\n" in text and "198.18.0.12 host2.hvext-lab host2\n" in text
    assert "198.18.0.13" not in text


def test_start_script_binds_private_dirs_and_starts_both_daemons() -> None:
    script = plan.start_script(2, RUN, Path("/var/lib/hvext/lab"))
    assert script.startswith("set -eu\n")
    assert "hostname host2.hvext-lab" in script
    assert "mount --bind /run/hvext-lab/host2/libvirt /run/libvirt" in script
    for target, sub in plan.PRIVATE_DIRS.items():
        assert f"mount --bind /var/lib/hvext/lab/host2/{sub} {target}" in script
    assert script.index("mount --bind") < script.index("virtlogd") < script.index("libvirtd --daemon")
    assert "--pid-file /run/hvext-lab/host2/libvirtd.pid" in script
    assert "--pid-file /run/hvext-lab/host2/virtlogd.pid" in script
    # The firewall and no IPv6 come before any daemon listens.
    assert script.index("disable_ipv6") < script.index("virtlogd") and script.index("iptables") < script.index("virtlogd")
    assert "iptables -w -A INPUT -p tcp --dport 16514 -j ACCEPT" in script
    # A revived host's namespace keeps its old rules: the chain is flushed before they are added again.
    assert script.index("iptables -w -F INPUT") < script.index("iptables -w -A INPUT")
    assert "hvextd" not in script  # only when its path is given


def test_start_script_runs_hvextd_last_with_its_pid_and_log_in_the_host_run_dir() -> None:
    script = plan.start_script(1, RUN, DATA, "/opt/venv/bin/hvextd", "/src/my tree")
    line = script.splitlines()[-2]
    assert line.startswith("PYTHONPATH='/src/my tree' setsid /opt/venv/bin/hvextd -c qemu:///system")
    assert line.endswith(" >>/run/hvext-lab/host1/hvextd.log 2>&1 &")
    assert script.splitlines()[-1] == "echo $! > /run/hvext-lab/host1/hvextd.pid"
    assert script.index("libvirtd --daemon") < script.index("hvextd -c")
    assert plan.HVEXTD_READY.endswith("qemu:///system")  # what hvextd logs for the URI it is given


@pytest.mark.parametrize("seconds", [0, 0.5, 10, 600])
def test_battery_window_accepts(seconds: float) -> None:
    assert plan.check_battery(seconds) == seconds


@pytest.mark.parametrize("seconds", [-1, 600.5, float("nan"), float("inf"), True, "10", None])
def test_battery_window_rejects(seconds: object) -> None:
    with pytest.raises(LabUsageError, match="battery window"):
        plan.check_battery(seconds)


def test_host_phase_moves_up_failing_failed_up() -> None:
    host = plan.new_hosts(1)[0]
    assert host.phase is HostPhase.UP
    with pytest.raises(LabError, match="host1 is up, not failing"):
        host.mark_failed()
    with pytest.raises(LabUsageError, match="only a failed host is revived"):
        host.mark_revived()
    host.begin_fail()
    assert host.phase is HostPhase.FAILING
    with pytest.raises(LabUsageError, match="`hvext lab fail host1` finishes"):
        host.check_revivable()
    host.begin_fail()  # a fail that stopped half-way may be run again
    host.mark_failed()
    assert host.phase is HostPhase.FAILED
    with pytest.raises(LabUsageError, match="already failed; `hvext lab revive host1`"):
        host.begin_fail()
    host.mark_revived()
    assert host.phase is HostPhase.UP
    with pytest.raises(ValueError):
        LabHost(index=1, uuid=host.uuid, phase="melted")  # type: ignore[arg-type]


def test_host_phases_round_trip_through_the_state_file() -> None:
    state = _state()
    state.hosts[1].begin_fail()
    state.hosts[1].mark_failed()
    again = LabState.from_json(state.to_json())
    assert [h.phase for h in again.hosts] == [HostPhase.UP, HostPhase.FAILED]
    assert json.loads(state.to_json())["hosts"][1]["phase"] == "failed"


def test_firewall_admits_only_tls_from_outside_the_lab_hosts() -> None:
    rules = [" ".join(r) for r in plan.firewall_rules()]
    assert rules[0] == "-i lo -j ACCEPT" and rules[1] == "-p tcp --dport 16514 -j ACCEPT"
    assert rules[2] == "-p tcp --dport 2379 -j ACCEPT"  # etcd's client port (client certificates)
    assert not any("2380" in r for r in rules)  # etcd's peer port: lab hosts only
    assert rules[3:-2] == [f"-s 198.18.0.{10 + i} -j ACCEPT" for i in range(1, 9)]
    assert f"-s {plan.BRIDGE_ADDRESS} -j ACCEPT" not in rules  # the root namespace's address
    assert rules[-2:] == ["-p tcp -j REJECT --reject-with tcp-reset", "-j DROP"]


def _state(count: int = 2) -> LabState:
    hosts = plan.new_hosts(count, RUN)
    hosts[0].processes = {"libvirtd": ProcessRef(100, 5000, "libvirtd"), "virtlogd": ProcessRef(99, 4990, "virtlogd"),
                          "hvextd": ProcessRef(101, 5001, "hvextd")}
    return LabState(hosts=hosts, phase="up", created=1700000000.5, run_dir=RUN, data_dir=Path("/var/lib/hvext/lab"))


def test_the_phase_is_an_enum_that_only_moves_from_creating_to_up() -> None:
    state = _state()
    assert LabState.from_json(state.to_json()).phase is Phase.UP
    assert json.loads(state.to_json())["phase"] == "up"  # the file's format is unchanged
    with pytest.raises(LabError, match="the lab is up, not creating"):
        state.mark_up()
    state.phase = Phase.CREATING
    state.mark_up()
    assert state.phase is Phase.UP
    with pytest.raises(ValueError):
        LabState(hosts=state.hosts, phase="exploding", created=0.0, run_dir=RUN, data_dir=DATA)  # type: ignore[arg-type]


def test_new_hosts_get_distinct_uuids() -> None:
    hosts = plan.new_hosts(8)
    assert len({h.uuid for h in hosts}) == 8
    assert [h.index for h in hosts] == list(range(1, 9))


def test_state_round_trips() -> None:
    state = _state()
    again = LabState.from_json(state.to_json())
    assert again == state
    data = json.loads(state.to_json())
    assert data["hosts"][1]["uri_tls"] == "qemu+tls://198.18.0.12/system?pkipath=/var/lib/hvext/lab/pki/client"
    assert data["bridge"] == {"name": "hvextlab0", "address": "198.18.0.1/24"}


def _mangled(edit: object) -> str:
    data = json.loads(_state().to_json())
    edit(data)  # type: ignore[operator]
    return json.dumps(data)


@pytest.mark.parametrize("text", [
    "", "{", "[]", "null",
    _mangled(lambda d: d.update(version=1)),  # before hosts had phases
    _mangled(lambda d: d.update(version=99)),
    _mangled(lambda d: d["hosts"][0].update(phase="exploded")),
    _mangled(lambda d: d["hosts"][0].pop("phase")),
    _mangled(lambda d: d.update(phase="exploding")),
    _mangled(lambda d: d.pop("hosts")),
    _mangled(lambda d: d.update(hosts=[])),
    _mangled(lambda d: d["hosts"].reverse()),
    _mangled(lambda d: d["hosts"][0].update(uuid="zzz")),
    _mangled(lambda d: d["hosts"][0].update(name="host7")),
    _mangled(lambda d: d["hosts"][0]["processes"]["libvirtd"].update(pid=-4)),
    _mangled(lambda d: d["hosts"][0]["processes"]["libvirtd"].update(pid="100")),
    _mangled(lambda d: d["hosts"][0]["processes"].update(sshd={"pid": 1, "start_ticks": 1, "comm": "sshd"})),
    _mangled(lambda d: d["hosts"].extend(d["hosts"][-1:] * 8)),
])
def test_malformed_state_is_a_lab_error(text: str) -> None:
    with pytest.raises(LabError, match="lab down"):
        LabState.from_json(text, "lab.json")


def test_cluster_lab_etcd_urls_and_static_initial_cluster() -> None:
    assert plan.etcd_initial_cluster(3) == ("host1=https://198.18.0.11:2380,host2=https://198.18.0.12:2380,"
                                            "host3=https://198.18.0.13:2380")
    assert plan.etcd_endpoints(2, 3) == ["https://198.18.0.12:2379", "https://198.18.0.11:2379",
                                         "https://198.18.0.13:2379"]
    with pytest.raises(plan.LabUsageError):
        plan.etcd_endpoints(4, 3)


def test_cluster_lab_hvextd_conf_is_a_valid_ha_section(tmp_path: Path) -> None:
    from hvext.daemon import config as daemon_config

    path = tmp_path / "hvextd.toml"
    path.write_text(plan.hvextd_conf(3, 3, Path("/var/lib/hvext/lab/host3/ha/pki")))
    ha = daemon_config.load(path).get(daemon_config.HAConfig)
    assert ha is not None and ha.host == "host3" and ha.cluster == plan.CLUSTER_NAME
    assert ha.etcd_endpoints[0] == "https://198.18.0.13:2379" and len(ha.etcd_endpoints) == 3
    assert ha.credentials == Path("/var/lib/hvext/lab/host3/ha/pki") and ha.lease_ttl == plan.LAB_LEASE_TTL_S


def test_start_script_runs_hvextd_with_the_cluster_config() -> None:
    script = plan.start_script(1, RUN, Path("/d"), "/usr/bin/hvextd", "/src", Path("/d/host1/hvextd.toml"))
    assert "hvextd -c qemu:///system --config /d/host1/hvextd.toml <" in script
    assert "hvextd.toml" not in plan.start_script(1, RUN, Path("/d"), "/usr/bin/hvextd", "/src")


def test_cluster_flag_and_etcd_process_round_trip_through_the_state_file() -> None:
    state = _state()
    assert LabState.from_json(state.to_json()).cluster is False
    state.cluster = True
    state.hosts[0].processes["etcd"] = ProcessRef(102, 5002, "etcd")
    again = LabState.from_json(state.to_json())
    assert again.cluster is True and again.hosts[0].processes["etcd"] == ProcessRef(102, 5002, "etcd")
    data = json.loads(state.to_json())
    data["cluster"] = "yes"
    with pytest.raises(plan.LabError, match="cluster"):
        LabState.from_json(json.dumps(data))
    del data["cluster"]  # a state file written before cluster labs: not a cluster lab
    assert LabState.from_json(json.dumps(data)).cluster is False


def test_lab_state_is_written_durably_and_a_failed_write_leaves_the_old_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lab.json went through a fixed ``lab.tmp`` name without fsync; now hvext.durable.atomic_write."""
    from hvext import durable
    from hvext.lab import statefile
    state = _state()
    state.run_dir = tmp_path / "run"
    statefile.write_state(state)
    path = statefile.state_file(state.run_dir)
    assert path.read_text() == state.to_json() and path.stat().st_mode & 0o777 == 0o644
    before = path.read_bytes()

    def fail(step: str) -> None:
        if step == "synced":
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(durable, "_step_hook", fail)
    state.phase = plan.Phase.CREATING
    with pytest.raises(plan.LabError, match="cannot write the lab state"):
        statefile.write_state(state)
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["lab.json"]
