"""Removing the lab: domains and QEMUs, daemons, namespaces and links, directories, the state file.

Works from the recorded state, or without one (an interrupted ``up``, an
unreadable file) by the fixed names and the daemons' own pid files.
"""

from __future__ import annotations

import re
from pathlib import Path

from hvext import durable
from hvext.errors import HvextError
from hvext.lab import daemons, net, pki, plan, procs
from hvext.lab.plan import MAX_HOSTS, LabError, LabHost, LabState, ProcessRef
from hvext.lab.statefile import state_file

_HOST_DIR = re.compile(r"host[1-9][0-9]*")


def _dir_indexes(*roots: Path) -> set[int]:
    found = set()
    for root in roots:
        if root.is_dir():
            found |= {plan.host_index(p.name) for p in root.iterdir()
                      if p.is_dir() and _HOST_DIR.fullmatch(p.name) and int(p.name[4:]) <= MAX_HOSTS}
    return found


def leftovers(run_dir: Path) -> bool:
    present = net.present()
    return bool(present["netns"] or present["links"] or _dir_indexes(run_dir, plan.DATA_DIR))


def teardown(state: LabState | None, run_dir: Path, data_dir: Path) -> list[str]:
    """Remove every trace of the lab; collects failures and raises them together at the end."""
    removed: list[str] = []
    errors: list[HvextError] = []
    recorded = {h.index: h for h in (state.hosts if state else [])}
    indexes = set(recorded) | set(net.indexes_present()) | _dir_indexes(run_dir, data_dir)
    hosts = [recorded.get(i) or LabHost(index=i, uuid="", run_dir=run_dir, data_dir=data_dir)
             for i in sorted(indexes)]
    # Domains and QEMUs first (virtlogd holds their logs), then all daemons together:
    # libvirtd takes about a second to shut down, and the hosts need not wait for each other.
    refs: list[ProcessRef] = []
    owner: dict[int, str] = {}
    for host in hosts:
        try:
            removed += _stop_domains(host, run_dir)
        except HvextError as err:
            errors.append(err)
        for ref in _daemon_refs(host, run_dir):
            refs.append(ref)
            owner[ref.pid] = host.name
    try:
        stopped = []
        for daemon in reversed(plan.DAEMONS):  # hvextd (libvirtd's client), libvirtd, then virtlogd
            stopped += procs.kill_all([r for r in refs if r.comm == daemon])
        removed += [f"{r.comm} pid {r.pid} of {owner[r.pid]}" for r in stopped]
        # Whatever else still runs in a host (nothing, unless someone started it there): killed too,
        # so that no process is left in a namespace that is about to go.
        for host in hosts:
            removed += [f"{r.comm} pid {r.pid} of {host.name}" for r in kill_host_processes(host)]
    except HvextError as err:
        # Something of the lab still runs: keep its namespaces and directories for a later down.
        errors.append(err)
        raise LabError(f"lab down incomplete: {'; '.join(str(e) for e in errors)}") from errors[0]
    for host in hosts:
        for step in (lambda: net.remove_host(host.index),
                     lambda: daemons.remove_dirs(host.index, run_dir, data_dir)):
            try:
                removed += step()
            except HvextError as err:
                errors.append(err)
    if not errors:
        for step in (net.remove_bridge, lambda: pki.remove(data_dir)):
            try:
                removed += step()
            except HvextError as err:
                errors.append(err)
    path = state_file(run_dir)
    if not errors:
        temps = re.compile(durable.temp_pattern(path.name))
        stray = [p for p in path.parent.iterdir() if temps.fullmatch(p.name)] if path.parent.is_dir() else []
        for leftover in (path, path.with_suffix(".tmp"), *stray):  # .tmp: written by older hvext
            if leftover.exists():
                leftover.unlink()
                removed.append(f"state {leftover}" if leftover == path else f"file {leftover}")
        for directory in (run_dir, data_dir):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as err:
                errors.append(LabError(f"{directory} is not empty after removing the lab: {err}"))
    if errors:
        raise LabError("lab down incomplete: " + "; ".join(str(e) for e in errors)) from errors[0]
    return removed


def kill_host_processes(host: LabHost) -> list[ProcessRef]:
    """SIGKILL every process in host's network namespace until none is left (a dying parent may
    have forked meanwhile); returns what was killed. Nothing when the namespace is gone."""
    killed: list[ProcessRef] = []
    for _ in range(10):
        inode = net.netns_inode(host.netns)
        found = procs.in_netns(inode) if inode is not None else []
        if not found:
            return killed
        killed += procs.kill_now(found)
    raise LabError(f"{host.name}: processes keep appearing in {host.netns}")


def _daemon_refs(host: LabHost, run_dir: Path) -> list[ProcessRef]:
    """Host's running daemons: as recorded, or from their pid files when `up` was interrupted."""
    refs = []
    for daemon in plan.DAEMONS:
        ref = host.processes.get(daemon)
        if ref is None or not procs.is_alive(ref):
            ref = daemons.daemon_ref(host, daemon, run_dir)
        if ref is not None:
            refs.append(ref)
    return refs


def _stop_domains(host: LabHost, run_dir: Path) -> list[str]:
    """Destroy host's running domains through its libvirtd, then kill QEMUs libvirt left behind."""
    stopped: list[str] = []
    if daemons.probe_libvirt(host.uri_unix).ok:
        stopped += daemons.destroy_domains(host, run_dir)
    for qemu in procs.kill_all(daemons.leftover_qemus(host, run_dir)):
        stopped.append(f"{qemu.comm} pid {qemu.pid} of {host.name}")
    return stopped
