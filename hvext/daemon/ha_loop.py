"""hvextd's HA loop: hold this host's lease in the cluster's etcd, and fence when it cannot.

Two tasks share one :class:`Keeper`:

* the renewer grants a lease of ``[ha] lease_ttl`` s, binds this host's key
  to it (``/hvext/host/<host>``), renews it every TTL/3 s
  (:func:`hvext.ha.policy.renew_interval`) and reads which domains this host
  owns (``/hvext/owner/<domain>`` = this host); a lease that etcd says has
  expired is replaced by a new one;
* the watchdog wakes at ``last renewal + TTL - margin`` and, when
  :func:`hvext.ha.policy.fence_decision` says FENCE (no renewal since),
  pauses and then destroys every domain this host owned at its last
  successful read, so that the VM is stopped here before another host can
  claim it (the owner key goes with the lease, at the earliest TTL s after
  the last renewal was sent). It does not wait for a hung etcd request.
  A keepalive counts only when the member that answered it then serves a
  quorum read (:meth:`hvext.ha.client.Client.confirm`): etcd 3.4 lets a
  leader cut off from its quorum renew leases in its memory until it steps
  down, and the leader elected on the other side never sees those renewals.
  The margin is ``[ha] fence_margin``, widened by
  :func:`hvext.ha.policy.fence_margin` when the fence's path is slow: after
  each renewal the owned domains are looked up the way the fence does
  (:func:`probe_domains`, through a thread, a new libvirt connection) and
  the round trip is timed; the fence itself runs in a thread of its own, so
  no other work queued in hvextd's threads delays it.

After a fence the old lease is revoked when etcd answers again (the owner
keys go with it) and a new one is granted: the host is alive but owns nothing.

Each renewal also reads the protected domains (``/hvext/protected/<domain>``,
written by ``hvext ha protect``) and claims, with the adopt transaction
(:meth:`hvext.ha.client.Client.adopt`: exactly one claimer wins), those
:func:`hvext.ha.policy.to_adopt` gives it: its own unowned ones (after
``ha protect``, or after a fence once it holds a new lease) and those whose
home host is no longer alive. A domain it won is defined here from the stored
XML unless it is, and started unless it runs (:func:`ensure_running`); a
record with a ``pmem`` field first has its PMEM restored here
(:func:`hvext.ha.restore.restore_pmem`): a restore that fails is recorded in
``/hvext/failover/<domain>`` and the domain is not started. Restores and
starts run beside the renewer (their own task and etcd client), so a long
restore does not hold up the lease.

After a power-loss save (SIGPWR, :meth:`Keeper.after_power_loss`) shared-store
protected domains are handed to a live host at once
(:func:`hvext.ha.shared_store.hand_off_after_power_loss`) and this host, on
battery, claims nothing for :data:`NO_CLAIMS_AFTER_POWER_LOSS_S`.

Replicated PMEM (C16, :mod:`hvext.ha.replication`): the keeper's
:class:`~hvext.ha.replication.Manager` serves other hosts' epochs (this host as
a replica, on ``[ha] peer_port``) and replicates the owned replicated domains
that run here; a replicated orphan is claimed only by a live replica holding
the newest acknowledged epoch (``eligible`` of :func:`hvext.ha.policy.to_adopt`).
A SIGHUP with another ``[ha] lease_ttl`` or ``fence_margin`` takes effect
without a restart (:meth:`Keeper.reconfigure`): a new TTL is a new lease (a
lease's TTL is fixed when granted), so the keeper grants one and moves its
host key and owner keys onto it in one transaction, then revokes the old one.
``host``, ``etcd_endpoints`` and ``credentials`` need a restart (said in the log).

When libvirt reports a DEFINED event (``virsh define``) for a domain this host
owns, its persistent definition is stored again in the record
(:meth:`Keeper.on_lifecycle`, :meth:`hvext.ha.client.Client.update_xml`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hvext.daemon.config import HAConfig
from hvext.errors import ClusterUnavailable, DomainNotFound, HvextError
from hvext.ha import pagexfer, policy, replication, standby, volatile
from hvext.ha import restore as pmem_restore
from hvext.ha.client import Client, Protection
from hvext.ha.etcd import Credentials
from hvext.host import Host, RunState
from hvext.pmem import power

log = logging.getLogger("hvextd.ha")

#: Seconds after a power-loss save during which this host claims no domain (it is on battery).
NO_CLAIMS_AFTER_POWER_LOSS_S = 120.0
#: Probes of the fence's path remembered (one per renewal: TTL/3 s apart, so 20 cover about 7 TTLs).
FENCE_LATENCY_SAMPLES = 20


def fence_domains(uri: str | None, names: list[str]) -> dict[str, str]:
    """Pause every running domain in *names*, then destroy them all (blocking: run in a thread).

    All are paused first (a pause is quick: the vCPUs stop at once), then destroyed concurrently: a
    destroy waits for QEMU to exit after SIGTERM, which takes seconds on a loaded host (the partition
    test measured 2 s), so one domain's destroy must not delay another's pause. One domain's failure
    does not stop the others; the result says, per domain, ``fenced``, ``not running``, or the error.
    """
    done: dict[str, str] = {}
    try:
        host = Host(uri)
    except HvextError as err:
        return {name: f"error: {err}" for name in names}
    with host:
        active = []
        for name in names:
            try:
                dom = host.lookup(name)
                if not dom.is_active():
                    done[name] = "not running"
                    continue
                if dom.state is RunState.RUNNING:
                    try:
                        dom.suspend()  # the vCPUs stop at once; the destroy below ends the process
                    except HvextError as err:
                        log.warning("fence %s: pausing failed (%s); destroying it", name, err)
                active.append(dom)
            except HvextError as err:
                done[name] = f"error: {err}"

        def destroy(dom: Any) -> str:
            try:
                dom.destroy()
                return "fenced"
            except HvextError as err:
                return f"error: {err}"
        if active:
            with ThreadPoolExecutor(max_workers=min(8, len(active))) as pool:
                for dom, outcome in zip(active, pool.map(destroy, active)):
                    done[dom.name] = outcome
    return {name: done[name] for name in names if name in done}


def probe_domains(uri: str | None, names: list[str]) -> None:
    """What :func:`fence_domains` does before its first pause, without pausing: connect to libvirt,
    look each domain up and read its state (blocking: run in a thread; timed by the keeper)."""
    with Host(uri) as host:
        for name in names:
            try:
                dom = host.lookup(name)
                if dom.is_active():
                    dom.state  # noqa: B018 (the call is what is timed)
            except HvextError:
                pass


def ensure_running(uri: str | None, name: str, xml: str) -> str:
    """Make the claimed domain *name* run here: define it from *xml* unless this host has it, start it
    unless it runs (blocking: run in a thread). The outcome as text; HvextError when it cannot."""
    with Host(uri) as host:
        try:
            dom = host.lookup(name)
            defined = False
        except DomainNotFound:
            dom = host.define_here(xml, name)  # its sockets and console log: this host's, not the old owner's
            defined = True
        if dom.is_active():
            return "already running"
        dom.start()
        return "defined and started" if defined else "started"


class Keeper:
    """This host's lease and the fence that guards it (see the module docstring)."""

    def __init__(self, config: HAConfig, host_name: str, uri: str | None,
                 clock: Callable[[], float] = time.monotonic,
                 fence: Callable[[str | None, list[str]], dict[str, str]] = fence_domains,
                 restart: Callable[[str | None, str, str], str] = ensure_running,
                 restore: Callable[..., pmem_restore.RestoreReport] = pmem_restore.restore_pmem,
                 probe: Callable[[str | None, list[str]], None] = probe_domains) -> None:
        self.config = config
        self.host_name = host_name
        self.uri = uri
        self.clock = clock
        self.fence_action = fence
        self.restart_action = restart
        self.restore_action = restore
        self.probe_action = probe
        #: The fence's own thread: a fence never waits behind other work in the loop's default executor.
        self.fence_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hvextd-fence")
        #: The last round trips of :func:`probe_domains` (s): the worst widens the fence margin.
        self.fence_latencies: collections.deque[float] = collections.deque(maxlen=FENCE_LATENCY_SAMPLES)
        self.probing: asyncio.Future[None] | None = None
        self.probe_began: float | None = None    # clock() when the probe in flight began
        creds = Credentials(config.credentials / "ca.pem", config.credentials / "membercert.pem",
                            config.credentials / "memberkey.pem")
        interval = policy.renew_interval(config.lease_ttl)
        self.client = Client(config.etcd_endpoints, creds, timeout=max(0.5, min(2.0, interval)))
        self.work_client = Client(config.etcd_endpoints, creds)  # restores and starts, beside the renewer
        self.restarting: asyncio.Future[None] | None = None
        self.power_lost_at: float | None = None  # clock() of the last power-loss save
        self.lease_id: int | None = None
        self.last_renewal: float | None = None   # when the last successful grant/renewal was sent
        self.owned: list[str] = []               # domains this host owned at the last successful read
        self.fenced: dict[str, str] | None = None  # the last fence's result (None: no fence since the lease)
        self.stale_leases: list[int] = []        # leases given up after a fence, to revoke when etcd answers
        self.changed = asyncio.Event()           # a renewal succeeded (wakes the watchdog)
        self.orphaned_since: dict[str, float] = {}  # protected domains without an owner: since when (clock)
        self.claimed: list[tuple[str, Protection]] = []  # (domain, record) won, not yet made to run here
        self.restarted: dict[str, str] = {}      # each claimed domain's last restart outcome
        self.bad_records: dict[str, str] = {}    # protected records that are not hvext's, and why
        self.records: dict[str, Protection] = {}  # the protected records at the last renewal
        self.peer = f"{config.peer_host()}:{config.peer_port}"
        self.battery_reports: list[dict[str, Any]] = []  # the last power loss's final epochs (replication)
        self.replication = replication.Manager(host_name, uri, creds,
                                               lambda: Client(config.etcd_endpoints, creds),
                                               config.epoch_interval, config.peer_port, config.peer_host())
        source = volatile.SourceService(uri)  # guest RAM pages for peers: C18's source, C17's standby
        self.volatile = pagexfer.RegionService(pagexfer.ram_file_copy(uri), source.sources,
                                               {"ram-final": source.final, **standby.StandbyService(uri).handlers()})
        self.replication.handlers[pagexfer.PREFIX] = self.volatile.handle
        self.lease_ttl: int = config.lease_ttl   # the TTL the held lease was granted with (the watchdog's)
        #: A lease of a new TTL whose move (Client.rebind) has an unknown outcome: (id, TTL, last sent).
        self.pending: tuple[int, int, float] | None = None
        self.definitions: dict[str, str] = {}    # each owned domain's last definition re-store outcome
        self._tasks: set[asyncio.Future[None]] = set()

    #: [ha] keys a reload cannot change in a running keeper: they name who this host is and where the
    #: cluster is, and the lease and owner keys belong to them; the replication manager (its peer
    #: server, its epoch timer) was started with the last three.
    RESTART_KEYS = ("host", "etcd_endpoints", "credentials", "epoch_interval", "peer_port", "peer_address")

    def reconfigure(self, new: HAConfig) -> list[str]:
        """Use a reloaded ``[ha]`` section: ``lease_ttl`` and ``fence_margin`` (and the informational
        ``cluster``) take effect now (a new TTL moves the keys to a new lease at the next renewal);
        returns the :data:`RESTART_KEYS` that differ, whose running values stay until a restart."""
        restart = [k for k in self.RESTART_KEYS if getattr(new, k) != getattr(self.config, k)]
        self.config = dataclasses.replace(new, **{k: getattr(self.config, k) for k in restart})
        self.changed.set()  # the watchdog computes its deadline again
        return restart

    # ---------------------------------------------------------------- renewer

    def _renew_once(self) -> None:
        """Grant or renew the lease and read what this host owns (blocking; raises HAError)."""
        for stale in list(self.stale_leases):
            self.client.revoke(stale)
            self.stale_leases.remove(stale)
        sent = self.clock()
        if self.lease_id is not None:
            if self.client.keepalive(self.lease_id) <= 0:
                log.warning("lease %x expired in etcd; granting a new one", self.lease_id)
                self.lease_id = None
            else:
                # A leader cut off from its quorum still renews (etcd 3.4, in its memory): the renewal
                # counts only if the same member then serves a quorum read (raises otherwise).
                self.client.confirm()
                if self.pending is None:
                    # Renewed now: the watchdog counts from here, not from the end of this round, whose reads
                    # (owners, records, hosts) may take a while when a member is gone (each endpoint is tried).
                    self.last_renewal = sent
        if self.pending is not None:  # keep it alive until we know whether the keys are on it
            pending_id, pending_ttl, _ = self.pending
            self.pending = (pending_id, pending_ttl, sent) if self.client.keepalive(pending_id) > 0 else None
            if self.pending is None:
                self.stale_leases.append(pending_id)
        if self.lease_id is None:
            if self.pending is not None:
                self.stale_leases.append(self.pending[0])
                self.pending = None
            lease = self.client.grant(self.config.lease_ttl)
            self.client.register_host(self.host_name, lease.id, peer=self.peer)
            self.lease_id = lease.id
            self.lease_ttl = lease.granted_ttl
            self.fenced = None
            log.info("holding lease %x (TTL %d s) as host %s", lease.id, lease.granted_ttl, self.host_name)
        if self.pending is not None:
            self._resolve_pending()
        owners = self.client.owners()
        self.owned = self._mine(owners)
        self.last_renewal = sent
        if self.lease_ttl != self.config.lease_ttl and self.pending is None:
            self._change_ttl()
        self._claim(owners)

    def _change_ttl(self) -> None:
        """Hold a lease of the configured TTL: grant one, move this host's keys onto it in one
        transaction (Client.rebind), revoke the old one. If the transaction's outcome is unknown (etcd
        did not answer), both leases are kept alive and guarded until the next renewal tells."""
        assert self.lease_id is not None
        sent = self.clock()
        lease = self.client.grant(self.config.lease_ttl)
        try:
            moved = self.client.rebind(self.host_name, self.lease_id, lease.id, self.owned, peer=self.peer)
        except ClusterUnavailable:
            self.pending = (lease.id, lease.granted_ttl, sent)
            raise
        except HvextError:
            self.stale_leases.append(lease.id)
            raise
        if not moved:  # an owner key changed meanwhile (unprotected?): try again at the next renewal
            self.stale_leases.append(lease.id)
            log.info("lease TTL change: this host's keys changed meanwhile; retrying at the next renewal")
            return
        self._switch_to(lease.id, lease.granted_ttl, sent)

    def _resolve_pending(self) -> None:
        """After a move whose outcome was unknown: the lease this host's key is bound to is the one held."""
        assert self.pending is not None and self.lease_id is not None
        pending_id, pending_ttl, sent = self.pending
        bound = self.client.hosts().get(self.host_name)  # (raises: the pending lease stays guarded)
        self.pending = None
        if bound == pending_id:
            self._switch_to(pending_id, pending_ttl, sent)
        else:
            self.stale_leases.append(pending_id)

    def _switch_to(self, lease_id: int, ttl: int, sent: float) -> None:
        old, old_ttl = self.lease_id, self.lease_ttl
        assert old is not None
        self.lease_id, self.lease_ttl = lease_id, ttl
        try:  # nothing is bound to it any more
            self.client.revoke(old)
        except HvextError:
            self.stale_leases.append(old)  # revoked at the next renewal (or it expires)
        self.last_renewal = min(self.last_renewal if self.last_renewal is not None else sent, sent)
        log.warning("holding lease %x (TTL %d s) instead of %x (TTL %d s); owned domains moved: %s",
                    lease_id, ttl, old, old_ttl, ", ".join(self.owned) or "none")

    def _mine(self, owners: dict[str, tuple[str, int]]) -> list[str]:
        """The domains of *owners* (domain -> (host, lease)) owned by this host under its current lease
        (or the lease it may have moved to, :attr:`pending`)."""
        leases = {self.lease_id, *([self.pending[0]] if self.pending is not None else [])}
        return sorted(d for d, (owner, lease_id) in owners.items()
                      if owner == self.host_name and lease_id in leases)

    def _claim(self, owners: dict[str, tuple[str, int]]) -> None:
        """Claim the protected domains policy.to_adopt gives this host (blocking; raises HAError)."""
        records, bad = self.client.protected()
        for domain, why in bad.items():
            if self.bad_records.get(domain) != why:  # once per record, not every renewal
                log.error("ignoring protected domain %r: %s", domain, why)
        self.bad_records = bad
        self.records = records
        now = self.clock()
        unowned = {d for d in records if d not in owners}
        self.orphaned_since = {d: self.orphaned_since.get(d, now) for d in unowned}
        if not unowned or self.lease_id is None:
            return
        if self.power_lost_at is not None and now - self.power_lost_at < NO_CLAIMS_AFTER_POWER_LOSS_S:
            return  # on battery: this host is about to go
        hosts = self.client.hosts()
        picks = policy.to_adopt(self.host_name, {d: r.home for d, r in records.items()},
                                {d: owner for d, (owner, _) in owners.items()}, hosts,
                                {d: now - t for d, t in self.orphaned_since.items()},
                                grace=float(self.config.lease_ttl), eligible=self._eligible(records, unowned, hosts))
        for domain in picks:
            record = records[domain]
            if self.client.adopt(record, self.host_name, self.lease_id):
                log.warning("claimed protected domain %s (home was %s%s)", domain, record.home,
                            "" if record.home == self.host_name else ", whose lease ended")
                self.owned = sorted({*self.owned, domain})
                self.orphaned_since.pop(domain, None)
                self.claimed.append((domain, record))
            else:
                log.info("protected domain %s: another host claimed it first", domain)

    def _eligible(self, records: dict[str, Protection], unowned: set[str], hosts: dict[str, int]) \
            -> dict[str, set[str]]:
        """Replicated unowned domains -> the live replicas that may claim them (the newest ack)."""
        replicated = [d for d in unowned if replication.is_replicated(records[d])]
        if not replicated:
            return {}
        progress = self.client.records(replication.REPLICATION_PREFIX)
        return {d: replication.claimers(records[d], progress.get(d), list(hosts)) for d in replicated}

    def replication_battery(self, budget: float | None) -> list[dict[str, Any]]:
        """SIGPWR (main thread, blocking): final epochs of the replicated domains, drained within *budget* s
        (None: the power-loss default). Never raises: the C12/C13 saves must run after it whatever happens."""
        try:
            reports = self.replication.battery(power.PREPAUSE_BUDGET_S if budget is None else budget)
        except Exception:
            log.exception("power loss: replication's final epochs failed unexpectedly")
            return []
        self.battery_reports = reports  # after_power_loss hands the domains off to replicas holding them
        for report in reports:
            if "error" in report:
                log.error("power loss: replication of %s: %s", report.get("domain"), report["error"])
            else:
                log.warning("power loss: %s: final epoch %s, acknowledged by %s", report["domain"], report["epoch"],
                            report["acked"])
        return reports

    def _kick_restarts(self) -> None:
        """Run :meth:`_restart_claimed` as its own task (one at a time) when domains wait for it."""
        if self.claimed and (self.restarting is None or self.restarting.done()):
            self.restarting = asyncio.ensure_future(self._restart_claimed())

    async def _restart_claimed(self) -> None:
        """Restore the PMEM of, define and start the domains just claimed; one failure does not stop
        the others. A domain whose PMEM cannot be restored is not started (recorded in etcd, logged)."""
        while self.claimed:
            domain, record = self.claimed.pop(0)
            if self.fenced is not None or domain not in self.owned:
                log.warning("protected domain %s: not started, the lease it was claimed with is gone", domain)
                continue
            report = await asyncio.to_thread(self.restore_action, record, self.host_name, uri=self.uri,
                                             client=self.work_client)
            if report.performed or not report.ok:
                try:
                    await asyncio.to_thread(pmem_restore.record_failover, self.work_client, report)
                except HvextError as err:
                    log.error("protected domain %s: cannot record the failover in etcd: %s", domain, err)
            if not report.ok:
                self.restarted[domain] = f"error: pmem not restored: {report.error}"
                continue
            if self.fenced is not None or domain not in self.owned:  # the restore took a while
                log.warning("protected domain %s: not started, the lease it was claimed with is gone", domain)
                continue
            try:
                outcome = await asyncio.to_thread(self.restart_action, self.uri, domain, record.xml)
                log.warning("protected domain %s: %s on this host", domain, outcome)
            except HvextError as err:
                outcome = f"error: {err}"
                log.error("protected domain %s is owned here but cannot run: %s", domain, err)
            if self.fenced is not None or domain not in self.owned:  # fenced while it started: stop it again
                log.error("protected domain %s: fenced while it started here; stopping it", domain)
                outcome = (await asyncio.to_thread(self.fence_action, self.uri, [domain])).get(domain, "fenced")
                self.restarted[domain] = f"fenced at start: {outcome}"
                continue
            if record.pmem is not None and outcome in ("defined and started", "started"):
                try:
                    await asyncio.to_thread(pmem_restore.after_start, record, self.host_name, self.uri,
                                            self.work_client)
                except HvextError as err:
                    log.error("protected domain %s runs here, but its pmem is not protected here: %s", domain, err)
            self.restarted[domain] = outcome

    def after_power_loss(self, report: dict[str, Any]) -> dict[str, str]:
        """After hvextd's power-loss save (blocking; main thread): claim nothing for a while, and hand
        the saved shared-store domains to a live host (:mod:`hvext.ha.shared_store`) and the replicated
        ones to a live replica that acknowledged their final epoch (:mod:`hvext.ha.replication`); then,
        if this host's etcd member leads the cluster, move leadership to a live host's member
        (:meth:`step_down`). Never raises."""
        from hvext.ha import shared_store
        self.power_lost_at = self.clock()
        if self.lease_id is None:
            return {}
        if not self.owned:
            self.step_down()
            return {}
        try:
            client = Client(self.config.etcd_endpoints, Credentials(
                self.config.credentials / "ca.pem", self.config.credentials / "membercert.pem",
                self.config.credentials / "memberkey.pem"))
        except HvextError as err:
            log.error("power loss: no etcd client to hand protected domains off: %s", err)
            return {}
        outcomes: dict[str, str] = {}
        try:
            for hand_off in (lambda: shared_store.hand_off_after_power_loss(client, self.host_name, self.uri, report,
                                                                             list(self.owned)),
                             lambda: replication.hand_off_after_power_loss(client, self.host_name, self.uri,
                                                                           self.battery_reports, list(self.owned))):
                try:
                    outcomes.update(hand_off())
                except HvextError as err:
                    log.error("power loss: handing protected domains off failed: %s; they are claimed elsewhere "
                              "after this host's lease ends", err)
                except Exception:
                    log.exception("power loss: handing protected domains off failed unexpectedly")
            self.step_down(client)
        finally:
            client.close()
        return outcomes

    def step_down(self, client: Client | None = None) -> None:
        """On battery: if this host's etcd member (the member named like this host) leads the cluster,
        ask it to hand leadership to a live host's member now. When it dies at the end of the battery
        window it is then a follower, and the survivors -- which may just have claimed and started this
        host's domains -- renew without waiting for an election (renewals stalled by the leader's death
        made a new owner fence the domain it had just started). Never raises."""
        own = client is None
        try:
            if client is None:
                client = Client(self.config.etcd_endpoints, Credentials(
                    self.config.credentials / "ca.pem", self.config.credentials / "membercert.pem",
                    self.config.credentials / "memberkey.pem"))
            live = sorted(set(client.hosts()) - {self.host_name})
            moved = client.move_leader_off(self.host_name, prefer=live)
            if moved is not None:
                log.warning("power loss: etcd leadership moved from this host's member to %s's", moved)
        except HvextError as err:
            log.error("power loss: this host's etcd member may still lead the cluster: %s", err)
        except Exception:
            log.exception("power loss: moving etcd leadership failed unexpectedly")
        finally:
            if own and client is not None:
                client.close()

    async def renewer(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            interval = policy.renew_interval(min(self.lease_ttl, self.config.lease_ttl))
            began = self.clock()
            try:
                await asyncio.to_thread(self._renew_once)
                self.changed.set()
                self._kick_restarts()
                self._kick_probe()
            except HvextError as err:
                log.warning("renewing lease: %s", err)
            except Exception:
                log.exception("renewing lease failed unexpectedly")
            try:  # every interval from the start of the last round: a slow round does not delay the next
                await asyncio.wait_for(stopping.wait(), max(0.0, began + interval - self.clock()))
            except asyncio.TimeoutError:
                pass

    # ---------------------------------------------------------------- watchdog

    def _kick_probe(self) -> None:
        """Time :attr:`probe_action` on the owned domains as its own task (one at a time)."""
        if self.owned and (self.probing is None or self.probing.done()):
            self.probing = asyncio.ensure_future(self._probe(list(self.owned)))

    async def _probe(self, names: list[str]) -> None:
        """One round trip of the fence's path, as the watchdog would see it: from this task through a
        thread and libvirt back to the loop. The watchdog then computes its deadline again."""
        began = self.probe_began = self.clock()
        try:
            await asyncio.to_thread(self.probe_action, self.uri, names)
        except HvextError as err:  # libvirt is down: the fence will say so; the time still counts
            log.debug("probing the fence's path: %s", err)
        except Exception:
            log.exception("probing the fence's path failed unexpectedly")
        self.fence_latencies.append(max(0.0, self.clock() - began))
        self.probe_began = None
        self.changed.set()

    def fence_latency(self) -> float:
        """The worst recent round trip of the fence's path (s); a probe still under way counts so far."""
        running = [self.clock() - self.probe_began] if self.probe_began is not None else []
        return max([*self.fence_latencies, *running], default=0.0)

    def guard(self) -> tuple[float, float, float]:
        """(last renewal, TTL, margin) for policy.fence_decision: the held lease's TTL; with a lease
        :attr:`pending`, the earlier of the two expiries; the margin from policy.fence_margin (the
        configured one, widened by the fence's measured latency, kept below the TTL)."""
        assert self.last_renewal is not None
        last, ttl = self.last_renewal, float(self.lease_ttl)
        if self.pending is not None:
            last = min(last, self.pending[2] + self.pending[1] - ttl)
        return last, ttl, policy.fence_margin(self.config.fence_margin, self.fence_latency(), ttl)

    async def watchdog(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            if self.last_renewal is None or self.fenced is not None:
                timeout: float | None = None  # nothing to guard until a (new) lease is held
            else:
                last, ttl, margin = self.guard()
                timeout = max(0.0, last + ttl - margin - self.clock())
            self.changed.clear()
            waiters = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(self.changed.wait())]
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if stopping.is_set() or self.last_renewal is None or self.fenced is not None:
                continue
            last, ttl, margin = self.guard()
            if policy.fence_decision(last, self.clock(), ttl, margin) is policy.Fence.FENCE:
                await self.fence()

    async def fence(self) -> dict[str, str]:
        """Stop the owned domains now and give the lease up (a new one is granted when etcd answers)."""
        owned, lease_id = list(self.owned), self.lease_id
        margin = self.guard()[2] if self.last_renewal is not None else self.config.fence_margin
        log.error("no lease renewal for %.1f s (TTL %d s, margin %.1f s, fence path %.2f s): fencing %s",
                  self.clock() - (self.last_renewal or 0.0), self.lease_ttl, margin, self.fence_latency(),
                  ", ".join(owned) or "nothing (this host owns no domain)")
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.fence_pool, self.fence_action, self.uri, owned) if owned else {}
        for name, outcome in result.items():
            (log.info if outcome in ("fenced", "not running") else log.error)("fence %s: %s", name, outcome)
        self.fenced = result
        if lease_id is not None:
            self.stale_leases.append(lease_id)
        if self.pending is not None:
            self.stale_leases.append(self.pending[0])
            self.pending = None
        self.lease_id = None
        self.owned = []
        return result

    async def run(self, stopping: asyncio.Event) -> None:
        """Renewer and watchdog until *stopping*. Then the domains this host owns are fenced (stopped
        here, so that no VM ever runs on two hosts once another host claims it) and the lease is revoked:
        the host leaves at once, and its protected domains restart on a surviving host (docs/ha.md)."""
        try:
            await asyncio.to_thread(self.replication.start, lambda: (dict(self.records), list(self.owned)))
        except HvextError as err:  # this host cannot be a replica; the rest of HA goes on
            log.error("replication: %s", err)
        try:
            await asyncio.gather(self.renewer(stopping), self.watchdog(stopping))
        finally:
            if self.restarting is not None and not self.restarting.done():
                try:  # a restore or start under way ends first (its thread cannot be cancelled), then the fence
                    await asyncio.wait_for(asyncio.shield(self.restarting), 60)
                except Exception:
                    log.warning("a claimed domain's restore or start was still running at stop")
            await asyncio.to_thread(self.replication.close)
            if self.owned and self.lease_id is not None:
                try:  # what this host owns now: an `ha unprotect` since the last renewal releases a domain
                    self.owned = self._mine(await asyncio.to_thread(self.client.owners))
                except HvextError as err:  # etcd does not answer: fence what was owned at the last read
                    log.warning("reading owners at stop: %s", err)
            if self.owned:
                log.warning("stopping while owning %s: fencing them here; a surviving host restarts them",
                            ", ".join(self.owned))
                await self.fence()
            held = [self.lease_id] if self.lease_id is not None else []
            for lease_id in [*self.stale_leases, *held, *([self.pending[0]] if self.pending else [])]:
                try:
                    await asyncio.to_thread(self.client.revoke, lease_id)
                except HvextError as err:  # the lease then ends by itself, TTL s after its last renewal
                    log.warning("revoking lease %x at stop: %s", lease_id, err)
            self.client.close()
            self.work_client.close()
            self.fence_pool.shutdown(wait=False)

    # ---------------------------------------------------------------- definitions

    def on_lifecycle(self, domain: str, event: str, detail: int) -> None:
        """hvextd's libvirt lifecycle events (on the loop): when a domain this host owns is (re)defined
        (``virsh define``), its new persistent definition is stored in its protection record."""
        if event != "defined" or domain not in self.owned or self.lease_id is None:
            return
        task = asyncio.ensure_future(self._store_definition(domain, self.lease_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _store_definition(self, domain: str, lease_id: int) -> None:
        try:
            outcome = await asyncio.to_thread(self._store_definition_now, domain, lease_id)
        except HvextError as err:
            outcome = f"error: {err}"
            log.error("protected domain %s was redefined, but its definition could not be stored: %s",
                      domain, err)
        else:
            (log.warning if outcome == "updated" else log.info)(
                "protected domain %s redefined: stored definition %s", domain, outcome)
        self.definitions[domain] = outcome

    def _store_definition_now(self, domain: str, lease_id: int) -> str:
        """Read *domain*'s persistent definition and store it if this host owns it under *lease_id*
        (blocking; its own client, so the renewer's requests are not shared across threads)."""
        with Host(self.uri) as host:
            xml = host.lookup(domain).xml(inactive=True, secure=True)
        creds = Credentials(self.config.credentials / "ca.pem", self.config.credentials / "membercert.pem",
                            self.config.credentials / "memberkey.pem")
        client = Client(self.config.etcd_endpoints, creds)
        try:
            return client.update_xml(domain, self.host_name, lease_id, xml)
        finally:
            client.close()

    def state(self) -> dict[str, Any]:
        return {"host": self.host_name, "lease": self.lease_id, "owned": self.owned, "fenced": self.fenced,
                "restarted": self.restarted}
