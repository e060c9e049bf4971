"""The lab's life cycle: :class:`Lab` (``up``, ``load``, ``status``, ``down``) and one host's
(``fail``, ``revive``, ``partition``, ``heal``).

What the lab is, and how other code uses it: :mod:`hvext.lab`.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hvext.errors import HvextError
from hvext.lab import daemons, net, pki, plan, procs, statefile, teardown
from hvext.lab.daemons import Probe
from hvext.lab.plan import HostPhase, LabError, LabHost, LabState, LabUsageError, Phase

if TYPE_CHECKING:
    from hvext.ha.client import Client

log = logging.getLogger(__name__)


def _cluster() -> Any:
    """:mod:`hvext.lab.cluster`, imported when first needed: it imports hvext.ha, which imports
    hvext.lab (its PKI and process code), so importing it here at load time would be circular."""
    from hvext.lab import cluster
    return cluster


@dataclass
class HostStatus:
    """What `hvext lab status` reports for one host."""

    host: LabHost
    netns_present: bool
    daemons: dict[str, int | None]  # daemon -> PID when it still runs
    unix: Probe
    tls: Probe
    link_up: bool = True
    #: A cluster lab's etcd member on this host (:func:`hvext.lab.cluster.status`); None without a cluster.
    etcd: dict[str, Any] | None = None

    @property
    def answering(self) -> bool:
        return self.unix.ok and self.tls.ok

    def to_dict(self) -> dict[str, Any]:
        h = self.host
        return {
            "name": h.name, "address": h.address, "netns": h.netns, "hostname": h.hostname,
            "uuid": h.uuid, "uri_unix": h.uri_unix, "uri_tls": h.uri_tls,
            "phase": h.phase, "link_up": self.link_up,
            "netns_present": self.netns_present, "daemons": self.daemons,
            "answering": self.answering,
            "unix": {"ok": self.unix.ok, "error": self.unix.error, "hostname": self.unix.hostname,
                     "libvirt": self.unix.version, "domains": self.unix.domains},
            "tls": {"ok": self.tls.ok, "error": self.tls.error, "hostname": self.tls.hostname},
            "etcd": self.etcd,
        }


@dataclass
class FailReport:
    """What `hvext lab fail` did to one host."""

    host: str
    power_loss: bool
    battery_seconds: float
    #: When hvextd got SIGPWR and when the kill began, in seconds from the start of the fail.
    sigpwr_at: float | None = None
    kill_at: float = 0.0
    killed: list[str] = field(default_factory=list)
    link_was_up: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "power_loss": self.power_loss, "battery_seconds": self.battery_seconds,
                "sigpwr_at": self.sigpwr_at, "kill_at": round(self.kill_at, 3), "killed": self.killed,
                "link_was_up": self.link_was_up, "seconds": round(self.seconds, 3)}


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
        return _find(self.state, name)

    # -- life cycle ----------------------------------------------------------
    @classmethod
    def load(cls) -> Lab | None:
        """The lab recorded in the state file, or None when no lab is up."""
        state = statefile.read_state(plan.RUN_DIR)
        return None if state is None else cls(state)

    @classmethod
    def up(cls, count: int, *, force: bool = False, cluster: bool = False) -> Lab:
        """Make sure a lab of *count* hosts is up; a no-op (``created`` False) when it already is.

        With *cluster*, each host also runs an etcd member of one *count*-member
        cluster and its hvextd holds the host's lease (:mod:`hvext.lab.cluster`).
        A lab of another size or kind is refused unless *force* (then it is removed
        first). A recorded lab whose daemons or namespaces are gone is rebuilt.
        """
        count = plan.validate_count(count)
        started = time.monotonic()
        run_dir, data_dir = plan.RUN_DIR, plan.DATA_DIR
        with statefile.locked(run_dir):
            replaced = ""
            existing = statefile.read_state(run_dir)
            if existing is not None:
                if len(existing.hosts) != count or existing.cluster != cluster:
                    kind = f"{len(existing.hosts)}-host {'cluster ' if existing.cluster else ''}lab"
                    if not force:
                        again = f"`hvext lab up --hosts {count}{' --cluster' if cluster else ''} --force`"
                        raise LabUsageError(f"a {kind} is already up; run `hvext lab down` first, or "
                                            f"{again} to replace it")
                    replaced = f"it was a {kind}"
                else:
                    replaced = _health_problem(existing)
                    if not replaced:
                        return cls(existing, created=False, seconds=time.monotonic() - started)
                log.info("replacing the recorded lab: %s", replaced)
                teardown.teardown(existing, run_dir, data_dir)
            elif teardown.leftovers(run_dir):
                teardown.teardown(None, run_dir, data_dir)
            state = LabState(hosts=plan.new_hosts(count, run_dir, data_dir), phase=Phase.CREATING,
                             created=time.time(), run_dir=run_dir, data_dir=data_dir, cluster=cluster)
            statefile.write_state(state)
            try:
                _build(state)
            except BaseException as err:
                try:
                    teardown.teardown(state, run_dir, data_dir)
                except HvextError as cleanup:
                    err.add_note(f"removing the half-built lab also failed: {cleanup}")
                raise
        return cls(state, created=True, replaced=replaced, seconds=time.monotonic() - started)

    def down(self) -> list[str]:
        """Remove this lab (processes, namespaces, links, directories); returns what was removed."""
        with statefile.locked(self.state.run_dir):
            current = statefile.read_state(self.state.run_dir)
            return teardown.teardown(current, self.state.run_dir, self.state.data_dir)

    def fail(self, name: str | int, *, power_loss: bool = False,
             battery: float = plan.DEFAULT_BATTERY_S) -> FailReport:
        """Host *name* fails abruptly: every process in it (QEMUs, its daemons, anything started there)
        is SIGKILLed and its link is cut, so its peers see it gone.

        With *power_loss*, its hvextd first gets SIGPWR (it saves protected PMEM) and the kill comes
        *battery* seconds later. The host is FAILING meanwhile and FAILED after; other hosts are
        untouched. The lab lock is held throughout.
        """
        battery = plan.check_battery(battery)
        with statefile.locked(self.state.run_dir):
            state = self._current()
            host = _find(state, name)
            host.begin_fail()
            report = FailReport(host=host.name, power_loss=power_loss, battery_seconds=battery)
            started = time.monotonic()
            if power_loss:
                ref = host.processes.get("hvextd")
                if ref is None or not procs.is_alive(ref):
                    raise LabError(f"{host.name}'s hvextd is not running, so it cannot get SIGPWR; "
                                   f"`hvext lab fail {host.name}` kills the host without it")
            statefile.write_state(state)
            if power_loss:
                procs.signal_one(host.processes["hvextd"], signal.SIGPWR)
                report.sigpwr_at = round(time.monotonic() - started, 3)
                time.sleep(max(0.0, started + battery - time.monotonic()))
            report.kill_at = time.monotonic() - started
            killed = teardown.kill_host_processes(host)
            report.killed = [f"{r.comm} pid {r.pid}" for r in killed]
            report.link_was_up = net.cut_host(host.index)
            host.mark_failed()
            statefile.write_state(state)
            report.seconds = time.monotonic() - started
            self.state = state
            return report

    def partition(self, name: str | int) -> bool:
        """Cut host *name* off the network and nothing else: its processes (QEMUs, daemons, its etcd
        member) keep running, unlike :meth:`fail`. A network partition of one host: it stays UP (its
        link shows cut in :meth:`status`) until :meth:`heal`. Returns whether the link was up."""
        with statefile.locked(self.state.run_dir):
            host = self._up_host(name, "partitioned")
            return net.cut_host(host.index)

    def heal(self, name: str | int) -> bool:
        """Undo :meth:`partition`: host *name*'s link is up again. Returns whether it was cut."""
        with statefile.locked(self.state.run_dir):
            host = self._up_host(name, "healed")
            return net.restore_link(host.index)

    def _up_host(self, name: str | int, what: str) -> LabHost:
        host = _find(self._current(), name)
        if host.phase is not HostPhase.UP:
            raise LabUsageError(f"{host.name} is {host.phase}: only a host that is up can be {what} "
                                f"(a failed host comes back with `hvext lab revive {host.name}`)")
        return host

    def revive(self, name: str | int) -> LabHost:
        """Bring failed host *name* back as an empty host: fresh directories (no domains), fresh
        daemons, its link up. Its name, address and host UUID stay. In a cluster lab its etcd member
        rejoins as a new member (the old one removed; :func:`hvext.lab.cluster.rejoin`). UP afterwards;
        FAILED again (what started killed, the link cut) when it does not come up."""
        with statefile.locked(self.state.run_dir):
            state = self._current()
            host = _find(state, name)
            host.check_revivable()
            teardown.kill_host_processes(host)  # whatever someone ran in the dead host meanwhile
            host.processes = {}
            daemons.remove_dirs(host.index, state.run_dir, state.data_dir)
            net.ensure_bridge()
            net.add_host(host.index)
            config = None
            if state.cluster:
                _cluster().write_hvextd_config(host, len(state.hosts))
                config = _cluster().hvextd_config(host)
            daemons.prepare(host, len(state.hosts), state.run_dir, state.data_dir, config)
            try:
                daemons.launch(host, state.run_dir)
                host.processes = daemons.wait_ready(host, state.run_dir, state.data_dir)
                if state.cluster:
                    host.processes["etcd"] = _cluster().rejoin(state, host)
            except BaseException:
                # Not up: whatever did start is killed again, so the host stays FAILED and consistent.
                teardown.kill_host_processes(host)
                net.cut_host(host.index)
                host.processes = {}
                raise
            host.mark_revived()
            statefile.write_state(state)
            self.state = state
            return host

    def _current(self) -> LabState:
        """The recorded lab (under the lock): the one this object opened, still up."""
        current = statefile.read_state(self.state.run_dir)
        if current is None:
            raise LabUsageError("no lab is up; `hvext lab up --hosts N` creates one")
        if current.created != self.state.created:
            raise LabUsageError("the lab was replaced meanwhile; load it again")
        if current.phase is not Phase.UP:
            raise LabUsageError(f"the lab is {current.phase}, not {Phase.UP}; `hvext lab up` finishes or rebuilds it")
        return current

    def status(self) -> list[HostStatus]:
        """Each host: its phase, namespace, link, daemons, and whether libvirtd answers on the unix and TLS URIs."""
        result = []
        for h in self.state.hosts:
            alive = {d: (ref.pid if procs.is_alive(ref) else None) for d, ref in h.processes.items()}
            for daemon in plan.DAEMONS:
                alive.setdefault(daemon, None)
            result.append(HostStatus(
                host=h, netns_present=net.netns_exists(h.netns), daemons=alive,
                unix=daemons.probe_libvirt(h.uri_unix),
                tls=daemons.probe_libvirt(h.uri_tls, tcp=(h.address, plan.LIBVIRT_TLS_PORT)),
                link_up=net.link_up(h.index),
                etcd=_cluster().status(h) if self.state.cluster else None))
        return result

    def cluster_client(self) -> Client:
        """A client (:class:`hvext.ha.client.Client`) of a cluster lab's etcd through the hosts that are up."""
        current = statefile.read_state(self.state.run_dir) or self.state
        return _cluster().client_for(current)


def down() -> list[str]:
    """Remove the lab, whether or not a (readable) state file records it; nothing up is fine."""
    run_dir, data_dir = plan.RUN_DIR, plan.DATA_DIR
    with statefile.locked(run_dir):
        notes = []
        try:
            state = statefile.read_state(run_dir)
        except LabError as err:
            # Clean up by fixed names and by the daemons' own pid files instead.
            log.info("%s", err)
            notes.append(f"unreadable state file ignored ({err})")
            state = None
        if state is not None:
            run_dir, data_dir = state.run_dir, state.data_dir
        return notes + teardown.teardown(state, run_dir, data_dir)


# -- internals ------------------------------------------------------------------
def _find(state: LabState, name: str | int) -> LabHost:
    index = name if isinstance(name, int) else plan.host_index(name)
    for h in state.hosts:
        if h.index == index:
            return h
    raise LabUsageError(f"the lab has no {plan.host_name(index)}: it has "
                        f"{', '.join(h.name for h in state.hosts)}")


def _build(state: LabState) -> None:
    count = len(state.hosts)
    net.ensure_bridge()
    for h in state.hosts:
        net.add_host(h.index)
    pki.make_lab_authorities(state.data_dir)
    if state.cluster:
        _cluster().make_ca(state.data_dir)
    for h in state.hosts:
        daemons.prepare(h, count, state.run_dir, state.data_dir,
                        _cluster().hvextd_config(h) if state.cluster else None)
        if state.cluster:
            _cluster().prepare(h, count)
    for h in state.hosts:  # all daemons start first (the firewalls with them), then we wait for them together
        daemons.launch(h, state.run_dir)
    members = _cluster().start_all(state) if state.cluster else {}
    for h in state.hosts:
        h.processes = daemons.wait_ready(h, state.run_dir, state.data_dir)
        if h.name in members:
            h.processes["etcd"] = members[h.name]
        statefile.write_state(state)
    state.mark_up()
    statefile.write_state(state)


def _health_problem(state: LabState) -> str:
    """Why the recorded lab is not usable as it is ("" when every host has its namespace,
    its daemons and an answering libvirtd)."""
    if state.phase is not Phase.UP:
        return "an earlier `lab up` did not finish"
    for h in state.hosts:
        if h.phase is not HostPhase.UP:
            return f"{h.name} is {h.phase} (`hvext lab revive {h.name}` brings it back without a rebuild)"
        if not net.netns_exists(h.netns):
            return f"{h.name}'s network namespace is gone"
        for daemon in plan.DAEMONS + (plan.CLUSTER_DAEMONS if state.cluster else ()):
            ref = h.processes.get(daemon)
            if ref is None or not procs.is_alive(ref):
                return f"{h.name}'s {daemon} is not running"
        probe = daemons.probe_libvirt(h.uri_unix)
        if not probe.ok:
            return f"{h.name}'s libvirtd does not answer ({probe.error})"
    return ""


