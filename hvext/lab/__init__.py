"""A multi-host lab on one machine: ``hvext lab up|down|status``.

Each lab host is a network namespace, plus mount and UTS namespaces, with its
own virtlogd and libvirtd (own config, run, lib, log and cache directories,
own host UUID and hostname), joined to the others by veth pairs on a bridge
in the root namespace, with an address in 198.18.0.0/15. Migration and
failover code reaches the hosts through :attr:`LabHost.uri_unix` (a socket
reachable from the root namespace, root's only) or :attr:`LabHost.uri_tls`
(libvirt's TLS transport with root's client certificate from the lab's own
CA; see :mod:`hvext.lab.pki`). Nothing in the lab answers the root
namespace without authentication: libvirtd has no plain TCP listener, and
each host's firewall admits only the TLS port from outside the lab's hosts
(so QEMU's migration ports are for the lab hosts alone).

The state file (``/run/hvext-lab/lab.json``) lets separate processes (the
CLI, tests, benchmarks) find one lab; a lock serialises ``up`` and ``down``.

::

    lab = Lab.up(2)                  # or Lab.load() for the lab that is up, if any
    src, dst = lab.hosts
    ... libvirt.open(src.uri_unix) ... migrateToURI3(dst.uri_tls, ...)
    lab.down()
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvext import durable
from hvext.errors import HvextError
from hvext.lab import daemons, net, pki, plan, procs
from hvext.lab.daemons import Probe
from hvext.lab.plan import MAX_HOSTS, MIN_HOSTS, LabError, LabHost, LabState, LabUsageError, ProcessRef

__all__ = ["Lab", "LabHost", "HostStatus", "LabError", "LabUsageError", "ProcessRef",
           "MIN_HOSTS", "MAX_HOSTS", "down", "state_file"]

log = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 300.0


def state_file(run_dir: Path | None = None) -> Path:
    return (run_dir or plan.RUN_DIR) / "lab.json"


@contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """Serialise up and down across processes (the lock file sits beside the run dir, which down removes)."""
    lock_path = run_dir.with_name(run_dir.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = durable.lock_file(lock_path, wait=LOCK_TIMEOUT_S)
    except BlockingIOError as err:
        raise LabError(f"another `hvext lab` command has held {lock_path} for {LOCK_TIMEOUT_S:.0f} s") from err
    except OSError as err:
        raise LabError(f"cannot open the lab lock {lock_path}: {err}") from err
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_state(run_dir: Path) -> LabState | None:
    path = state_file(run_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise LabError(f"cannot read the lab state {path}: {err}") from err
    return LabState.from_json(text, str(path))


def _write_state(state: LabState) -> None:
    path = state_file(state.run_dir)
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(state.to_json())
        os.replace(tmp, path)
    except OSError as err:
        raise LabError(f"cannot write the lab state {path}: {err}") from err


@dataclass
class HostStatus:
    """What `hvext lab status` reports for one host."""

    host: LabHost
    netns_present: bool
    daemons: dict[str, int | None]  # daemon -> PID when it still runs
    unix: Probe
    tls: Probe

    @property
    def answering(self) -> bool:
        return self.unix.ok and self.tls.ok

    def to_dict(self) -> dict[str, Any]:
        h = self.host
        return {
            "name": h.name, "address": h.address, "netns": h.netns, "hostname": h.hostname,
            "uuid": h.uuid, "uri_unix": h.uri_unix, "uri_tls": h.uri_tls,
            "netns_present": self.netns_present, "daemons": self.daemons,
            "answering": self.answering,
            "unix": {"ok": self.unix.ok, "error": self.unix.error, "hostname": self.unix.hostname,
                     "libvirt": self.unix.version, "domains": self.unix.domains},
            "tls": {"ok": self.tls.ok, "error": self.tls.error, "hostname": self.tls.hostname},
        }


class Lab:
    """The lab that is up: open one with :meth:`up` or :meth:`load`."""

    def __init__(self, state: LabState, *, created: bool = False, replaced: str = "",
                 seconds: float = 0.0) -> None:
        self.state = state
        #: True when this `up` built the lab; False when an identical one was already up.
        self.created = created
        #: Why `up` first removed a recorded lab (another size with ``force``, or a broken one); "" if not.
        self.replaced = replaced
        self.seconds = seconds

    @property
    def hosts(self) -> list[LabHost]:
        return list(self.state.hosts)

    def host(self, name: str | int) -> LabHost:
        """A host by name (``host2``) or index (2)."""
        index = name if isinstance(name, int) else plan.host_index(name)
        for h in self.state.hosts:
            if h.index == index:
                return h
        raise LabUsageError(f"the lab has no {plan.host_name(index)}: it has "
                            f"{', '.join(h.name for h in self.state.hosts)}")

    # -- life cycle ----------------------------------------------------------
    @classmethod
    def load(cls) -> Lab | None:
        """The lab recorded in the state file, or None when no lab is up."""
        state = _read_state(plan.RUN_DIR)
        return None if state is None else cls(state)

    @classmethod
    def up(cls, count: int, *, force: bool = False) -> Lab:
        """Make sure a lab of *count* hosts is up; a no-op (``created`` False) when it already is.

        A lab of another size is refused unless *force* (then it is removed
        first). A recorded lab whose daemons or namespaces are gone is rebuilt.
        """
        count = plan.validate_count(count)
        started = time.monotonic()
        run_dir, data_dir = plan.RUN_DIR, plan.DATA_DIR
        with _locked(run_dir):
            replaced = ""
            existing = _read_state(run_dir)
            if existing is not None:
                if len(existing.hosts) != count:
                    if not force:
                        raise LabUsageError(
                            f"a {len(existing.hosts)}-host lab is already up; run `hvext lab down` first, or "
                            f"`hvext lab up --hosts {count} --force` to replace it")
                    replaced = f"it had {len(existing.hosts)} hosts"
                else:
                    replaced = _health_problem(existing)
                    if not replaced:
                        return cls(existing, created=False, seconds=time.monotonic() - started)
                log.info("replacing the recorded lab: %s", replaced)
                _teardown(existing, run_dir, data_dir)
            elif _leftovers(run_dir):
                _teardown(None, run_dir, data_dir)
            state = LabState(hosts=plan.new_hosts(count, run_dir, data_dir), phase="creating", created=time.time(),
                             run_dir=run_dir, data_dir=data_dir)
            _write_state(state)
            try:
                _build(state)
            except BaseException as err:
                try:
                    _teardown(state, run_dir, data_dir)
                except HvextError as cleanup:
                    err.add_note(f"removing the half-built lab also failed: {cleanup}")
                raise
        return cls(state, created=True, replaced=replaced, seconds=time.monotonic() - started)

    def down(self) -> list[str]:
        """Remove this lab (processes, namespaces, links, directories); returns what was removed."""
        with _locked(self.state.run_dir):
            current = _read_state(self.state.run_dir)
            return _teardown(current, self.state.run_dir, self.state.data_dir)

    def status(self) -> list[HostStatus]:
        """Each host: its namespace, daemons, and whether libvirtd answers on the unix and TLS URIs."""
        result = []
        for h in self.state.hosts:
            alive = {d: (ref.pid if procs.is_alive(ref) else None) for d, ref in h.processes.items()}
            for daemon in plan.DAEMONS:
                alive.setdefault(daemon, None)
            result.append(HostStatus(
                host=h, netns_present=net.netns_exists(h.netns), daemons=alive,
                unix=daemons.probe_libvirt(h.uri_unix),
                tls=daemons.probe_libvirt(h.uri_tls, tcp=(h.address, plan.LIBVIRT_TLS_PORT))))
        return result


def down() -> list[str]:
    """Remove the lab, whether or not a (readable) state file records it; nothing up is fine."""
    run_dir, data_dir = plan.RUN_DIR, plan.DATA_DIR
    with _locked(run_dir):
        notes = []
        try:
            state = _read_state(run_dir)
        except LabError as err:
            # Clean up by fixed names and by the daemons' own pid files instead.
            log.info("%s", err)
            notes.append(f"unreadable state file ignored ({err})")
            state = None
        if state is not None:
            run_dir, data_dir = state.run_dir, state.data_dir
        return notes + _teardown(state, run_dir, data_dir)


# -- internals ------------------------------------------------------------------

def _build(state: LabState) -> None:
    count = len(state.hosts)
    net.ensure_bridge()
    for h in state.hosts:
        net.add_host(h.index)
    pki.make_lab_authorities(state.data_dir)
    for h in state.hosts:
        daemons.prepare(h, count, state.run_dir, state.data_dir)
    for h in state.hosts:  # all daemons start first, then we wait for them together
        daemons.launch(h, state.run_dir)
    for h in state.hosts:
        h.processes = daemons.wait_ready(h, state.run_dir, state.data_dir)
        _write_state(state)
    state.phase = "up"
    _write_state(state)


def _health_problem(state: LabState) -> str:
    """Why the recorded lab is not usable as it is ("" when every host has its namespace,
    its daemons and an answering libvirtd)."""
    if state.phase != "up":
        return "an earlier `lab up` did not finish"
    for h in state.hosts:
        if not net.netns_exists(h.netns):
            return f"{h.name}'s network namespace is gone"
        for daemon in plan.DAEMONS:
            ref = h.processes.get(daemon)
            if ref is None or not procs.is_alive(ref):
                return f"{h.name}'s {daemon} is not running"
        probe = daemons.probe_libvirt(h.uri_unix)
        if not probe.ok:
            return f"{h.name}'s libvirtd does not answer ({probe.error})"
    return ""


_HOST_DIR = re.compile(r"host[1-9][0-9]*")


def _dir_indexes(*roots: Path) -> set[int]:
    found = set()
    for root in roots:
        if root.is_dir():
            found |= {plan.host_index(p.name) for p in root.iterdir()
                      if p.is_dir() and _HOST_DIR.fullmatch(p.name) and int(p.name[4:]) <= MAX_HOSTS}
    return found


def _leftovers(run_dir: Path) -> bool:
    present = net.present()
    return bool(present["netns"] or present["links"] or _dir_indexes(run_dir, plan.DATA_DIR))


def _teardown(state: LabState | None, run_dir: Path, data_dir: Path) -> list[str]:
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
        stopped = procs.kill_all([r for r in refs if r.comm == "libvirtd"])
        stopped += procs.kill_all([r for r in refs if r.comm == "virtlogd"])
        removed += [f"{r.comm} pid {r.pid} of {owner[r.pid]}" for r in stopped]
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
        for leftover in (path, path.with_suffix(".tmp")):
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
