"""Cluster membership operations behind ``hvext cluster ...``: init, join, start, stop, leave, status.

``init`` makes a one-member cluster on this host (a fresh CA, this member's
certificate, etcd started with ``initial-cluster-state=new``). ``join``
takes the cluster's CA (exported on a member by ``credentials export``),
issues this host's member certificate with it, adds this host through the
member-add API of a running member, then starts the local member with
``initial-cluster-state=existing``. If that start fails, the member is
removed again and this host's files with it, so nothing is left half done.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

from hvext.errors import ClusterUnavailable, HAError, UsageError
from hvext.ha import etcd
from hvext.ha.client import CLUSTER_KEY, Client
from hvext.ha.etcd import Layout, Member


def default_name() -> str:
    """This host's member name: its short host name."""
    return socket.gethostname().split(".")[0] or "hvext"


def client_for(layout: Layout, member: Member | None = None) -> Client:
    """A client of the cluster through this host's member, with its certificate."""
    member = member or require_member(layout)
    return Client([member.client_url], layout.credentials())


def require_member(layout: Layout) -> Member:
    member = Member.load(layout)
    if member is None:
        raise HAError("this host is in no cluster: run `hvext cluster init` or `hvext cluster join` first")
    return member


def _refuse_leftovers(layout: Layout) -> None:
    for path in (layout.data_dir, layout.ha_dir):
        if path.exists() and any(path.iterdir()):
            raise HAError(f"{path} holds files of an earlier cluster but no member settings; remove "
                          f"{layout.ha_dir} and {layout.data_dir} (after stopping etcd) to start over")


def init(layout: Layout, name: str, cluster: str, address: str, client_port: int = etcd.CLIENT_PORT,
         peer_port: int = etcd.PEER_PORT) -> dict[str, Any]:
    """Make and start a one-member cluster; on an initialised host change nothing and say so."""
    existing = Member.load(layout)
    if existing is not None:
        return {"already": True, "member": existing.name, "cluster": existing.cluster,
                "client_url": existing.client_url}
    etcd.check_name(name)
    etcd.check_name(cluster)
    _refuse_leftovers(layout)
    member = Member(name, cluster, address, client_port, peer_port)
    try:
        etcd.make_ca(layout, cluster)
        etcd.issue_member_cert(layout, member)
        started = etcd.start(layout, member)
        client = client_for(layout, member)
        try:
            client.set_cluster_name(cluster)
        finally:
            client.close()
        member.save(layout)
    except BaseException:
        etcd.stop(layout)
        _remove_files(layout)
        raise
    return {"already": False, "member": name, "cluster": cluster, "client_url": member.client_url,
            "pid": started.pid}


def join(layout: Layout, endpoint: str, credentials: Path, name: str, address: str,
         client_port: int = etcd.CLIENT_PORT, peer_port: int = etcd.PEER_PORT) -> dict[str, Any]:
    """Add this host to the cluster that *endpoint* (a member's client URL) belongs to, and start it."""
    existing = Member.load(layout)
    if existing is not None:
        raise HAError(f"this host is already member {existing.name} of cluster {existing.cluster}")
    etcd.check_name(name)
    _refuse_leftovers(layout)
    added: dict[str, Any] | None = None
    client: Client | None = None
    try:
        etcd.import_ca(layout, credentials)
        probe = Member(name, "?", address, client_port, peer_port)
        etcd.issue_member_cert(layout, probe)
        client = Client([endpoint], layout.credentials())
        members = client.members()
        if any(m.get("name") == name for m in members):
            raise UsageError(f"the cluster already has a member named {name}; give another --name")
        if any(probe.peer_url in m.get("peerURLs", []) for m in members):
            raise UsageError(f"the cluster already has a member at {probe.peer_url}")
        cluster = client.cluster_name()
        if cluster is None:
            raise HAError(f"{endpoint} is an etcd without an hvext cluster (no {CLUSTER_KEY} key)")
        added, members = client.member_add(probe.peer_url, wait=RECONFIGURE_WAIT_S)
        peers = [f"{m['name']}={m['peerURLs'][0]}" for m in members if m.get("name") and m.get("peerURLs")
                 and m.get("ID") != added.get("ID")]
        member = Member(name, cluster, address, client_port, peer_port,
                        initial_cluster=",".join([*peers, f"{name}={probe.peer_url}"]), initial_state="existing")
        started = etcd.start(layout, member)
        member.save(layout)
    except BaseException:
        if added is not None and client is not None:
            try:
                client.member_remove(str(added["ID"]))
            except HAError:
                pass
        etcd.stop(layout)
        _remove_files(layout)
        raise
    finally:
        if client is not None:
            client.close()
    return {"member": name, "cluster": cluster, "client_url": member.client_url, "pid": started.pid,
            "members": len(members)}


def _remove_files(layout: Layout) -> None:
    for path in (layout.data_dir, layout.ha_dir):
        shutil.rmtree(path, ignore_errors=True)


def start(layout: Layout) -> dict[str, Any]:
    member = require_member(layout)
    started = etcd.start(layout, member)
    return {"member": member.name, **started.as_dict()}


def stop(layout: Layout) -> dict[str, Any]:
    member = require_member(layout)
    return {"member": member.name, "pid": etcd.stop(layout)}


#: How long a join or a leave retries etcd's "unhealthy cluster" refusal (it wants every member
#: connected for 5 s before a membership change).
RECONFIGURE_WAIT_S = 30.0


def leave(layout: Layout) -> dict[str, Any]:
    """Remove this host's member from the cluster, stop it and delete its files (not for the last member)."""
    member = require_member(layout)
    client = client_for(layout, member)
    try:
        members = client.members()
        me = [m for m in members if m.get("name") == member.name]
        if not me:
            raise HAError(f"the cluster has no member named {member.name}")
        if len(members) == 1:
            raise HAError("this is the cluster's last member: `hvext cluster stop` stops it; remove "
                          f"{layout.ha_dir} and {layout.data_dir} to delete the cluster")
    finally:
        client.close()
    # Through another member: a member asked to remove itself may stop before it answers
    # ("etcdserver: server stopped"), and then the removal's outcome is unknown.
    others = [url for m in members if m.get("name") != member.name for url in m.get("clientURLs") or []]
    remover = Client(others, layout.credentials()) if others else client_for(layout, member)
    try:
        remover.member_remove(str(me[0]["ID"]), wait=RECONFIGURE_WAIT_S)
    finally:
        remover.close()
    etcd.stop(layout)
    _remove_files(layout)
    return {"member": member.name, "left": member.cluster}


def export_credentials(layout: Layout, target: Path) -> list[str]:
    require_member(layout)
    return [str(p) for p in etcd.export_ca(layout, target)]


def status(layout: Layout) -> dict[str, Any]:
    """Members (and which leads), each host's lease and the VMs it owns, as seen through this host's member."""
    member = require_member(layout)
    client = client_for(layout, member)
    try:
        try:
            state = client.status()
        except ClusterUnavailable as err:
            if etcd.running_pid(layout) is None:
                raise ClusterUnavailable(f"{err}; this host's etcd member is not running (`hvext cluster "
                                         "start` starts it)") from err
            raise
        leader = str(state.get("leader", ""))
        members = client.members()
        hosts = client.hosts()
        owners = client.owners()
        leases = {host: client.lease(lease_id) for host, lease_id in hosts.items()}
    finally:
        client.close()
    return {
        "cluster": member.cluster,
        "this_member": member.name,
        "version": state.get("version", ""),
        "leader": next((m.get("name", "") for m in members if str(m.get("ID")) == leader), None),
        "members": [{"name": m.get("name", ""), "id": f"{int(m['ID']):x}", "peer_urls": m.get("peerURLs", []),
                     "client_urls": m.get("clientURLs", []), "leader": str(m.get("ID")) == leader,
                     "started": bool(m.get("name"))} for m in members],
        "hosts": [{"name": host, "lease": f"{lease.id:x}", "ttl": lease.ttl, "granted_ttl": lease.granted_ttl,
                   "owns": sorted(d for d, (owner, _) in owners.items() if owner == host)}
                  for host, lease in sorted(leases.items())],
        "owners": {d: owner for d, (owner, _) in sorted(owners.items())},
    }
