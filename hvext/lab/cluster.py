"""A cluster lab (``hvext lab up --hosts N --cluster``): an etcd member per lab host, one N-member cluster.

Each host runs its member in its own network namespace (hvext.ha.etcd's
:func:`~hvext.ha.etcd.start` with a :class:`~hvext.ha.etcd.Layout` whose
``netns`` is the host's), listening on the host's lab address; the members
start together from a static ``--initial-cluster`` of every host's peer URL
(:func:`hvext.lab.plan.etcd_initial_cluster`). One cluster CA (``pki/etcd-ca``
in the lab's data dir, made with :mod:`hvext.lab.pki`, removed by ``lab down``)
signs each member's certificate, which is server and client certificate alike.
Each host's hvextd runs with an ``[ha]`` config (:func:`hvext.lab.plan.hvextd_conf`)
naming its own member first, so it holds the host's lease.

A host's files follow hvext.ha.etcd's layout inside the host's directories:
``DATA/hostN/ha/`` (member.json, pki/), ``DATA/hostN/etcd/`` (etcd's data),
``RUN/hostN/etcd.pid`` and ``etcd.log``. A failed host's member dies with the
host; :func:`rejoin` brings the revived host back as a new member (the old one
removed, the new one added: what ``hvext cluster join`` does).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hvext.errors import HvextError
from hvext.ha import client as ha_client
from hvext.ha import cluster as ha_cluster
from hvext.ha import etcd
from hvext.lab import pki, plan, procs
from hvext.lab.plan import LabError, LabHost, LabState, ProcessRef


def ca_dir(data_dir: Path) -> Path:
    """The cluster lab's CA (ca-cert.pem, ca-key.pem 0600), beside the lab's other CAs."""
    return plan.pki_dir(data_dir) / "etcd-ca"


def layout(host: LabHost) -> etcd.Layout:
    """Where host's member keeps its files, and the namespace it runs in."""
    hrun = plan.host_run_dir(host.run_dir, host.index)
    return etcd.Layout(state_dir=plan.host_data_dir(host.data_dir, host.index), run_dir=hrun, log_dir=hrun,
                       netns=host.netns)


def hvextd_config(host: LabHost) -> Path:
    """Host's hvextd.toml (its ``[ha]`` section)."""
    return plan.host_data_dir(host.data_dir, host.index) / "hvextd.toml"


def member(host: LabHost, count: int, *, joining: bool = False) -> etcd.Member:
    return etcd.Member(host.name, plan.CLUSTER_NAME, host.address, plan.ETCD_CLIENT_PORT, plan.ETCD_PEER_PORT,
                       initial_cluster="" if joining else plan.etcd_initial_cluster(count))


def make_ca(data_dir: Path) -> None:
    pki.make_ca(ca_dir(data_dir), f"hvext lab cluster {plan.CLUSTER_NAME} CA")


def prepare(host: LabHost, count: int) -> None:
    """Host's member settings and certificate from the lab's cluster CA, and its hvextd.toml."""
    lay = layout(host)
    try:
        etcd.import_ca(lay, ca_dir(host.data_dir))
        m = member(host, count)
        etcd.issue_member_cert(lay, m)
        m.save(lay)
        write_hvextd_config(host, count)
    except OSError as err:
        raise LabError(f"preparing {host.name}'s etcd member: {err}") from err


def write_hvextd_config(host: LabHost, count: int) -> None:
    path = hvextd_config(host)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.hvextd_conf(host.index, count, layout(host).pki_dir))


def _ref(host: LabHost, pid: int) -> ProcessRef:
    ref = procs.identify(pid)
    if ref is None:
        raise LabError(f"{host.name}'s etcd (PID {pid}) exited right after starting")
    return ref


def start_all(state: LabState) -> dict[str, ProcessRef]:
    """Start every host's member together (a member is healthy only once a quorum runs), then name the
    cluster as ``hvext cluster init`` does; the members' processes by host name."""
    hosts = state.hosts
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        futures = {h.name: pool.submit(etcd.start, layout(h), etcd.Member.load(layout(h)) or member(h, len(hosts)))
                   for h in hosts}
        errors = []
        started = {}
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except HvextError as err:
                errors.append(f"{name}: {err}")
    if errors:
        raise LabError("starting the lab's etcd cluster: " + "; ".join(errors))
    client = client_for(state)
    try:
        client.set_cluster_name(plan.CLUSTER_NAME)
    finally:
        client.close()
    return {h.name: _ref(h, started[h.name].pid) for h in hosts}


def client_for(state: LabState, *, timeout: float = ha_client.REQUEST_TIMEOUT_S) -> ha_client.Client:
    """A client of the lab's cluster (root's, in the root namespace) through every host that is up,
    with the first such host's member certificate."""
    up = [h for h in state.hosts if h.phase is plan.HostPhase.UP]
    if not state.cluster or not up:
        raise LabError("the lab has no etcd cluster" if not state.cluster else "no lab host is up")
    return ha_client.Client([plan.etcd_client_url(h.index) for h in up], layout(up[0]).credentials(),
                            timeout=timeout)


def rejoin(state: LabState, host: LabHost) -> ProcessRef:
    """Revived *host*'s member joins again: its old member is removed (through the hosts that are up) and a
    new one added and started, as ``hvext cluster join`` does. Host's directories must be fresh."""
    others = [h for h in state.hosts if h.phase is plan.HostPhase.UP and h.index != host.index]
    if not others:
        raise LabError(f"no other lab host is up, so {host.name}'s etcd member has no cluster to rejoin")
    client = ha_client.Client([plan.etcd_client_url(h.index) for h in others], layout(others[0]).credentials())
    try:
        for m in client.members():
            if m.get("name") == host.name or plan.etcd_peer_url(host.index) in m.get("peerURLs", []):
                client.member_remove(str(m["ID"]), wait=ha_cluster.RECONFIGURE_WAIT_S)
    except HvextError as err:
        raise LabError(f"removing {host.name}'s old etcd member: {err}") from err
    finally:
        client.close()
    try:
        joined = ha_cluster.join(layout(host), plan.etcd_client_url(others[0].index), ca_dir(state.data_dir),
                                 host.name, host.address, plan.ETCD_CLIENT_PORT, plan.ETCD_PEER_PORT)
    except HvextError as err:
        raise LabError(f"{host.name}'s etcd member cannot rejoin: {err}") from err
    return _ref(host, int(joined["pid"]))


def status(host: LabHost) -> dict[str, Any]:
    """Host's member as `hvext lab status` shows it: pid, healthy, leader (this member leads), error."""
    lay = layout(host)
    ref = host.processes.get("etcd")
    pid = ref.pid if ref is not None and procs.is_alive(ref) else None
    out: dict[str, Any] = {"pid": pid, "healthy": False, "leader": False, "error": ""}
    if pid is None:
        out["error"] = "not running"
        return out
    url = plan.etcd_client_url(host.index)
    try:
        out["healthy"], out["error"] = etcd.health(url, lay.credentials())
        client = ha_client.Client([url], lay.credentials(), timeout=2.0)
        try:
            reply = client.status()
        finally:
            client.close()
        out["leader"] = str(reply.get("leader", "")) == str(reply.get("header", {}).get("member_id", "?"))
    except HvextError as err:
        out["error"] = str(err)
    return out
