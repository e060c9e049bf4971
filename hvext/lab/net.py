"""The lab's network, made with pyroute2: a bridge in the root namespace, a
network namespace per host, and a veth pair joining each host to the bridge.

The bridge has no other port and no route leads off it, so traffic between
lab addresses stays inside this machine. Every object has a fixed name
(:mod:`hvext.lab.plan`), which lets `down` remove leftovers of an
interrupted `up` even without a state file.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError, NetNS, netns

from hvext.lab import plan
from hvext.lab.plan import LabError

NETNS_DIR = Path("/run/netns")


@contextmanager
def _ipr(context: str) -> Iterator[IPRoute]:
    """An IPRoute whose netlink errors become :class:`LabError` naming *context*."""
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as err:
        raise LabError(f"{context}: {os.strerror(err.code)} (netlink error {err.code})") from err


@contextmanager
def _in_netns(name: str, context: str) -> Iterator[NetNS]:
    try:
        ns = NetNS(name)
    except OSError as err:
        raise LabError(f"{context}: cannot enter network namespace {name}: {err}") from err
    try:
        yield ns
    except NetlinkError as err:
        raise LabError(f"{context}: {os.strerror(err.code)} (netlink error {err.code})") from err
    finally:
        ns.close()


def _link_index(ipr: IPRoute | NetNS, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def netns_exists(name: str) -> bool:
    return name in netns.listnetns()


def netns_inode(name: str) -> int | None:
    """The inode that identifies namespace *name* (as in /proc/PID/ns/net), or None."""
    try:
        return os.stat(NETNS_DIR / name).st_ino
    except FileNotFoundError:
        return None


def ensure_bridge() -> None:
    """The bridge with the lab's gateway address, up (created when missing)."""
    with _ipr(f"creating bridge {plan.BRIDGE_NAME}") as ipr:
        index = _link_index(ipr, plan.BRIDGE_NAME)
        if index is None:
            ipr.link("add", ifname=plan.BRIDGE_NAME, kind="bridge")
            index = _link_index(ipr, plan.BRIDGE_NAME)
        current = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=2)}
        if str(plan.BRIDGE_ADDRESS) not in current:
            ipr.addr("add", index=index, address=str(plan.BRIDGE_ADDRESS),
                     prefixlen=plan.LAB_NETWORK.prefixlen)
        ipr.link("set", index=index, state="up")


def add_host(index: int) -> None:
    """Host *index*'s network namespace, joined to the bridge by a veth pair, addressed and up."""
    name = plan.netns_name(index)
    root_end, peer = plan.veth_name(index), plan.veth_peer_name(index)
    context = f"network of {plan.host_name(index)}"
    if not netns_exists(name):
        try:
            netns.create(name)
        except OSError as err:
            raise LabError(f"{context}: cannot create network namespace {name}: {err}") from err
    with _ipr(context) as ipr:
        bridge = _link_index(ipr, plan.BRIDGE_NAME)
        if bridge is None:
            raise LabError(f"{context}: bridge {plan.BRIDGE_NAME} is missing")
        if _link_index(ipr, root_end) is None:
            ipr.link("add", ifname=root_end, kind="veth", peer=peer)
            ipr.link("set", index=_link_index(ipr, peer), net_ns_fd=name)
        ipr.link("set", index=_link_index(ipr, root_end), master=bridge, state="up")
    with _in_netns(name, context) as ns:
        lo = _link_index(ns, "lo")
        ns.link("set", index=lo, state="up")
        inner = _link_index(ns, peer)
        if inner is not None:
            ns.link("set", index=inner, ifname=plan.HOST_IFNAME)
        inner = _link_index(ns, plan.HOST_IFNAME)
        if inner is None:
            raise LabError(f"{context}: {plan.HOST_IFNAME} did not appear in namespace {name}")
        current = {a.get_attr("IFA_ADDRESS") for a in ns.get_addr(index=inner, family=2)}
        if plan.host_address(index) not in current:
            ns.addr("add", index=inner, address=plan.host_address(index), prefixlen=plan.LAB_NETWORK.prefixlen)
        ns.link("set", index=inner, state="up")


def cut_host(index: int) -> bool:
    """Cut host *index* off the bridge, as a pulled cable would: its bridge port goes down (the host's
    eth0 loses its carrier). Returns whether the link was up. `add_host` brings it up again."""
    root_end = plan.veth_name(index)
    with _ipr(f"cutting the link of {plan.host_name(index)}") as ipr:
        found = _link_index(ipr, root_end)
        if found is None:
            return False
        (link,) = ipr.get_links(found)
        was_up = link.get_attr("IFLA_OPERSTATE") == "UP"
        ipr.link("set", index=found, state="down")
    return was_up


def restore_link(index: int) -> bool:
    """Plug host *index*'s cable back in (its bridge port up again, after :func:`cut_host`). Returns
    whether it was down. The host's processes are not touched."""
    root_end = plan.veth_name(index)
    with _ipr(f"restoring the link of {plan.host_name(index)}") as ipr:
        found = _link_index(ipr, root_end)
        if found is None:
            raise LabError(f"{plan.host_name(index)} has no link {root_end} to restore")
        (link,) = ipr.get_links(found)
        was_down = link.get_attr("IFLA_OPERSTATE") != "UP"
        ipr.link("set", index=found, state="up")
    return was_down


def link_up(index: int) -> bool:
    """Whether host *index*'s bridge port exists and is up (admin up with a carrier)."""
    with _ipr(f"reading the link of {plan.host_name(index)}") as ipr:
        found = _link_index(ipr, plan.veth_name(index))
        if found is None:
            return False
        (link,) = ipr.get_links(found)
        return link.get_attr("IFLA_OPERSTATE") == "UP"


def remove_host(index: int) -> list[str]:
    """Delete host *index*'s veth pair and network namespace; returns what existed and was removed."""
    removed = []
    root_end = plan.veth_name(index)
    with _ipr(f"removing the network of {plan.host_name(index)}") as ipr:
        for link in (root_end, plan.veth_peer_name(index)):
            found = _link_index(ipr, link)
            if found is not None:
                try:
                    ipr.link("del", index=found)
                except NetlinkError as err:  # the pair's other end may have taken it along
                    if err.code != errno.ENODEV:
                        raise
                removed.append(f"veth {link}")
    name = plan.netns_name(index)
    if netns_exists(name):
        try:
            netns.remove(name)
        except OSError as err:
            raise LabError(f"cannot remove network namespace {name}: {err}") from err
        removed.append(f"netns {name}")
    return removed


def remove_bridge() -> list[str]:
    with _ipr(f"removing bridge {plan.BRIDGE_NAME}") as ipr:
        found = _link_index(ipr, plan.BRIDGE_NAME)
        if found is None:
            return []
        ipr.link("del", index=found)
    return [f"bridge {plan.BRIDGE_NAME}"]


def present() -> dict[str, list[str]]:
    """The lab's network objects that exist now, found by their fixed names."""
    with _ipr("listing links") as ipr:
        links = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    prefixes = tuple(plan.veth_name(i) for i in range(1, plan.MAX_HOSTS + 1))
    return {
        "netns": sorted(n for n in netns.listnetns() if n.startswith(plan.NETNS_PREFIX)),
        "links": sorted(n for n in links if n == plan.BRIDGE_NAME or n.startswith(prefixes)),
    }


def indexes_present() -> list[int]:
    """Host indexes with a namespace or veth still present (for cleaning up without a state file)."""
    found = set()
    for i in range(1, plan.MAX_HOSTS + 1):
        if netns_exists(plan.netns_name(i)):
            found.add(i)
    with _ipr("listing links") as ipr:
        for i in range(1, plan.MAX_HOSTS + 1):
            if _link_index(ipr, plan.veth_name(i)) is not None or _link_index(ipr, plan.veth_peer_name(i)) is not None:
                found.add(i)
    return sorted(found)
