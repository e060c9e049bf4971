"""Crash-consistent asynchronous replication of a protected domain's PMEM to N replica hosts (C16).

``hvext ha protect DOMAIN --replicas N`` stores, in the protection record, ``"pmem": {"mode":
"replicas", "replicas": [hosts], "devices": [{"name", "size", "backing", "model"}]}``. Then, in the
owner's hvextd (:class:`Manager`, driven by :mod:`hvext.daemon.ha_loop`):

* **Epochs.** Every ``[ha] epoch_interval`` s (default 1) a :class:`Replicator` *cuts* an epoch: it
  pauses the guest (the vCPUs stop), reads which blocks changed -- the patched QEMU's dirty page
  list of the device's RAM block (:mod:`hvext.dirty.pages`, through :mod:`hvext.pmem.power`'s log
  helpers), else every block compared by hash with what was shipped -- copies those 64 KiB blocks
  into memory and resumes the guest (the pause holds only the query and the copy), then hashes them
  and appends the changed ones with the epoch's COMMIT to the device's local log
  (``STATE_DIR/ha/log/<host>/<domain>/<device>.log``, :mod:`hvext.ha.replication_log`; 0700 dirs,
  0600 files). Because the copy is taken while no vCPU runs, each epoch is the device's contents at
  one instant: every write the guest completed before the pause (a returned flush/fsync included)
  is in it or an earlier epoch, and a write the guest had not completed is either wholly after the
  cut or (for a multi-page store the guest was in the middle of) partly in it -- exactly what a
  power cut at that instant would leave, which is what PMEM software is written to survive. The
  first epoch of a stream (an owner's run) is FULL (every block; zeros sent as ZERO entries).
* **Shipping.** One thread per replica sends the committed epochs it has not acknowledged over the
  cluster's authenticated transport (:mod:`hvext.ha.peer`), oldest first; the replica's hvextd
  stores them durably and applies whole epochs only (:class:`hvext.ha.replication_log.ReplicaImage`,
  ``STATE_DIR/ha/replicas/<host>/<domain>/<device>.img``) and replies with the epoch applied. A
  replica that cannot be reached is retried; the others go on. The local log is truncated up to the
  epoch every live replica acknowledged (a log larger than :data:`MAX_LOG_FACTOR` times the devices
  is cut anyway: a replica that fell that far behind gets a new full epoch).
* **Status.** After each cut the owner writes ``/hvext/replication/<domain>``: stream, last epoch
  written locally and when, and per replica the epoch acknowledged, when it was cut, the bytes not
  yet acknowledged and the last error. ``hvext ha status`` shows it (:func:`status_fields`).
* **Battery.** SIGPWR: :meth:`Manager.battery` pauses each guest for good, cuts a final epoch, waits
  (until the battery budget ends) for every live replica to acknowledge it, and records
  ``/hvext/final/<domain>`` = {"host", "epoch", "at", "acked"}.
* **Failover.** Only live replicas holding the newest acknowledged epoch may claim the domain
  (:func:`claimers`, :func:`hvext.ha.policy.to_adopt`'s *eligible*); the claimer restores the
  backing files from its replica image (:func:`restore_from_replica`) before the domain starts, and
  then owns it: a new stream, epochs numbered on from the last one recorded, to the other replicas.

The replica's hvextd refuses epochs from a host that is not the domain's owner in etcd (a fenced or
partitioned former owner cannot overwrite a replica after another host took over).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvext import aio, durable, paths
from hvext.errors import DomainNotFound, HAError, HvextError, UsageError
from hvext.ha import peer, policy, replication_policy
from hvext.ha.client import FINAL_PREFIX, REPLICATION_PREFIX, Client, Protection, check_key_name
from hvext.ha.etcd import Credentials
from hvext.ha.replication_log import BLOCK_SIZE, DeviceSpec, Entry, Epoch, Log, ReplicaImage
from hvext.ha import replication_log as rlog
from hvext.host import Domain, Host, RunState
from hvext.pmem import devices as pmem_devices, power, virtio

log = logging.getLogger("hvextd.replication")

MODE = "replicas"
#: A log holding more than this many times the devices' size is cut even if a replica lags.
MAX_LOG_FACTOR = 4
#: Bytes of epochs sent in one request.
SEND_LIMIT = 32 << 20
#: The most PMEM per replicated domain: a full epoch (every block, plus 32 bytes per block) is one peer message.
MAX_DOMAIN_PMEM = peer.MAX_PAYLOAD * 15 // 16
#: QEMU's event for a guest's virtio-pmem flush request (qemu-patches/0003; hvext.pmem.hints waits for it too).
FLUSH_EVENT = "X_HVEXT_PMEM_FLUSH"
#: Shortest time between two epoch cuts (a guest flushing all the time is not paused all the time).
MIN_CUT_S = 0.05
#: Shortest time between two writes of the progress record to etcd.
PUBLISH_S = 0.5
#: Seconds between two tries to follow a domain's flush events.
FLUSH_RETRY_S = 3.0
#: Seconds between two tries to reach a replica that failed.
RETRY_S = 1.0
#: How often hvextd looks for its replica images and logs of domains no longer protected (seconds).
COLLECT_EVERY_S = 10.0


def ha_dir(state_dir: Path | None = None) -> Path:
    return (state_dir or paths.STATE_DIR) / "ha"


def log_dir(host: str, domain: str, state_dir: Path | None = None) -> Path:
    """The owner's logs of *domain* (per host: lab hosts share STATE_DIR)."""
    return rlog.private_dirs(ha_dir(state_dir), "log", host, domain)


def replica_dir(host: str, domain: str, state_dir: Path | None = None, create: bool = True) -> Path:
    """*host*'s replica of *domain* (per host: lab hosts share STATE_DIR)."""
    if create:
        return rlog.private_dirs(ha_dir(state_dir), "replicas", host, domain)
    return ha_dir(state_dir) / "replicas" / host / domain


def remove_state(domain: str, state_dir: Path | None = None, *, host: str | None = None,
                 kinds: tuple[str, ...] = ("log", "replicas")) -> list[str]:
    """Delete every host's (or only *host*'s) log and replica of *domain* under STATE_DIR/ha (what this
    module wrote there: log files, images, state and lock files); the paths removed. For an unprotected
    domain's leftovers."""
    import shutil
    check_key_name("domain", domain)
    removed = []
    for kind in kinds:
        base = ha_dir(state_dir) / kind
        if not base.is_dir():
            continue
        for host_dir in base.iterdir():
            if host is not None and host_dir.name != host:
                continue
            target = host_dir / domain
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
                removed.append(str(target))
            try:
                host_dir.rmdir()  # only when no other domain's files are left in it
            except OSError:
                pass
    return removed


# ----------------------------------------------------------------- the pmem field of a protection record
def device_specs(pmem: dict[str, Any]) -> list[dict[str, Any]]:
    """The devices of a replicated record, checked: name, size, absolute backing path."""
    raw = pmem.get("devices")
    if not isinstance(raw, list) or not 0 < len(raw) <= rlog.MAX_DEVICES:
        raise HAError("replicated pmem record without devices")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise HAError("replicated pmem record: a device is not an object")
        name = DeviceSpec.check_name(item.get("name"))
        size = item.get("size")
        backing = item.get("backing")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= 1 << 40 or size % BLOCK_SIZE:
            raise HAError(f"replicated pmem device {name}: bad size {size!r:.40}")
        if not isinstance(backing, str) or not backing.startswith("/") or "\0" in backing:
            raise HAError(f"replicated pmem device {name}: bad backing {backing!r:.80}")
        out.append({"name": name, "size": size, "backing": backing, "model": str(item.get("model", ""))[:40]})
    if len({d["name"] for d in out}) != len(out):
        raise HAError("replicated pmem record: two devices with one name")
    return out


def replica_hosts(pmem: dict[str, Any]) -> list[str]:
    raw = pmem.get("replicas")
    if not isinstance(raw, list) or not all(isinstance(h, str) for h in raw):
        raise HAError("replicated pmem record without a replica list")
    return [check_key_name("host", h) for h in raw]


def is_replicated(record: Protection) -> bool:
    pmem = getattr(record, "pmem", None)
    return isinstance(pmem, dict) and pmem.get("mode") == MODE


def pmem_field(domain: Domain, home: str, live_hosts: list[str], replicas: int) -> dict[str, Any]:
    """The ``pmem`` field ``ha protect --replicas N`` stores: the domain's PMEM devices and N live hosts."""
    found = pmem_devices.parse_devices(domain.xml()) + virtio.list_devices(domain)
    if not found:
        raise UsageError(f"domain {domain.name!r} has no pmem device to replicate (`hvext pmem-list`)")
    specs = []
    for i, dev in enumerate(found):
        name = dev.alias if dev.alias and all(c.isalnum() or c in "-_" for c in dev.alias) else f"pmem{i}"
        if dev.size % BLOCK_SIZE:
            raise UsageError(f"pmem device {dev.path} of {dev.size} bytes is not a multiple of {BLOCK_SIZE}")
        specs.append({"name": name, "size": dev.size, "backing": str(dev.path), "model": dev.model})
    total = sum(d["size"] for d in specs)
    if total > MAX_DOMAIN_PMEM:
        raise UsageError(f"domain {domain.name!r} has {total} bytes of pmem; replication sends a full epoch in one "
                         f"message, so it takes at most {MAX_DOMAIN_PMEM} bytes per domain in this version")
    try:
        chosen = replication_policy.choose_replicas(domain.name, home, live_hosts, replicas)
    except ValueError as err:
        raise UsageError(str(err)) from err
    return {"mode": MODE, "replicas": chosen, "devices": specs}


def protect(client: Client, host: Host, domain: str, home: str, replicas: int) -> dict[str, Any]:
    """``ha protect DOMAIN --replicas N``: the protection record with the domain's PMEM devices and N
    live hosts (besides *home*) as replicas; this host's hvextd then replicates it."""
    from hvext.ha import protection
    dom = host.lookup(domain)
    pmem = pmem_field(dom, home, list(client.hosts()), replicas)
    result = protection.protect(client, host, domain, home, pmem=pmem)
    return {**result, "pmem": pmem}


def claimers(record: Protection, replication: dict[str, Any] | None, live_hosts: list[str]) -> set[str]:
    """Who may claim the replicated *record* now (see :func:`hvext.ha.replication_policy.claimers`)."""
    acks = (replication or {}).get("replicas", {})
    acked = {h: int(a.get("epoch", 0)) for h, a in acks.items()
             if isinstance(a, dict) and isinstance(a.get("epoch", 0), int)} if isinstance(acks, dict) else {}
    try:
        hosts = replica_hosts(record.pmem or {})
    except HAError:
        return set()
    return replication_policy.claimers(hosts, acked, live_hosts)


# ----------------------------------------------------------------- the owner side
class Replicator:
    """One owned, replicated domain: its logs, its epoch cuts and a shipper per replica."""

    def __init__(self, record: Protection, me: str, uri: str | None, creds: Credentials,
                 client_factory: Callable[[], Client], interval: float, port: int,
                 state_dir: Path | None = None) -> None:
        self.domain = record.domain
        self.me = me
        self.uri = uri
        self.creds = creds
        self.port = port
        self.interval = interval
        self.pmem = record.pmem or {}
        self.devices = device_specs(self.pmem)
        self.specs = [DeviceSpec(d["name"], d["size"]) for d in self.devices]
        self.replicas = [h for h in replica_hosts(self.pmem) if h != me]
        self.client = client_factory()
        self.state_dir = state_dir
        self.lock = threading.RLock()
        self.new_epoch = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.frozen = False               # battery: no more cuts after the final one
        self.flushed = threading.Event()  # a guest flush (virtio-pmem, patched QEMU) asks for a cut now
        self.flush_cuts = 0               # epochs cut because of a guest flush
        self.watch: concurrent.futures.Future[None] | None = None
        directory = log_dir(me, self.domain, state_dir)
        self.logs = [Log.open(directory / f"{d['name']}.log") for d in self.devices]
        for lg in self.logs:             # a new stream: what an earlier run left is not shipped again
            lg.drop_through(1 << 62)
        previous = self.client.records(REPLICATION_PREFIX).get(self.domain, {}) if self.client else {}
        self.epoch = max(int(previous.get("epoch", 0) or 0) if isinstance(previous.get("epoch"), int) else 0, 0)
        self.epoch_at = 0.0
        self.stream = f"{me}:{time.time_ns()}"
        self.hashes: list[list[bytes] | None] = [None] * len(self.devices)
        self.domain_id: int | None = None
        self.dirty_log: dict[str, int] | None = None
        self.ram_blocks: list[str] = [""] * len(self.devices)
        self.need_full = True
        self.acks: dict[str, dict[str, Any]] = {h: {"epoch": 0} for h in self.replicas}
        self.in_stream: dict[str, bool] = {h: False for h in self.replicas}
        self.last_status = 0.0
        self.last_cut: dict[str, float | int] = {}  # the last cut's timings (s) and block counts (see cut)
        self.query_s = 0.0                          # of the last cut's copy: the dirty-list query's part
        self.threads = [threading.Thread(target=self._cut_loop, name=f"hvext-cut-{self.domain}", daemon=True)]
        self.threads += [threading.Thread(target=self._ship_loop, args=(h,), name=f"hvext-ship-{h}", daemon=True)
                         for h in self.replicas]
        if any(d["model"] == "virtio-pmem" for d in self.devices):
            self.threads.append(threading.Thread(target=self._flush_loop, name=f"hvext-flush-{self.domain}",
                                                 daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stopping.set()
        self.flushed.set()
        if self.watch is not None:
            self.watch.cancel()
        with self.lock:
            self.new_epoch.notify_all()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(timeout=15)
        for lg in self.logs:
            lg.close()
        if self.client:
            self.client.close()

    # ------------------------------------------------------------- cutting epochs
    def _cut_loop(self) -> None:
        """Cut every *interval* s, and at once (but at most every :data:`MIN_CUT_S`) after a guest flush."""
        by_flush = False
        while not self.stopping.is_set():
            started = time.monotonic()
            self.flushed.clear()  # a flush from now on asks for the next cut (this one may precede its data)
            try:
                if self.cut() is not None and by_flush:
                    self.flush_cuts += 1
            except HvextError as err:
                log.warning("replication of %s: epoch cut failed: %s", self.domain, err)
            except Exception:
                log.exception("replication of %s: epoch cut failed unexpectedly", self.domain)
            if time.monotonic() - self.last_status >= PUBLISH_S:
                try:
                    self.publish()
                except HvextError as err:
                    log.info("replication of %s: status not recorded: %s", self.domain, err)
            by_flush = self.flushed.wait(max(0.0, self.interval - (time.monotonic() - started)))
            self.stopping.wait(max(0.0, MIN_CUT_S - (time.monotonic() - started)))

    def _flush_loop(self) -> None:
        """Follow the guest's virtio-pmem flush requests (QEMU's X_HVEXT_PMEM_FLUSH event, patched QEMU):
        each is a durability point the guest just asked for, so an epoch is cut right after it."""
        while not self.stopping.is_set():
            try:
                with Host(self.uri) as host:
                    dom = host.lookup(self.domain)
                    if dom.is_active():
                        self.watch = asyncio.run_coroutine_threadsafe(self._watch_flushes(dom), aio.loop())
                        if self.stopping.is_set():
                            self.watch.cancel()
                        self.watch.result()
            except (HvextError, concurrent.futures.CancelledError) as err:
                if not self.stopping.is_set():
                    log.info("replication of %s: not following flush events (%s)", self.domain, err)
            except Exception:
                log.exception("replication of %s: following flush events failed", self.domain)
            self.stopping.wait(FLUSH_RETRY_S)

    async def _watch_flushes(self, dom: Domain) -> None:
        async with dom.qmp() as qmp:
            if not getattr(qmp, "supports_events", False):
                return  # libvirt passthrough: no events; the timer alone cuts
            async for _ in qmp.events(FLUSH_EVENT):  # type: ignore[attr-defined]
                self.flushed.set()

    def cut(self, *, final: bool = False) -> Epoch | None:
        """Cut one epoch (see the module docstring); with *final* the guest stays paused. None: the
        domain does not run here (nothing to cut) or nothing changed (no empty epochs, except a final).

        The guest is paused only while the dirty list is fetched and the candidate blocks are copied
        into memory (:meth:`_copy_blocks`): that copy is the epoch, the device at one instant. Hashing,
        encoding and the log write happen after the guest runs again (:meth:`_entries`); the time paused
        and the whole cut's are kept in :attr:`last_cut` and logged at debug level."""
        with self.lock:
            if self.frozen:
                return None
            started = time.perf_counter()
            with Host(self.uri) as host:
                try:
                    dom = host.lookup(self.domain)
                except DomainNotFound:
                    return None
                if not dom.is_active():
                    return None
                paused_here = dom.state is RunState.RUNNING
                suspending_at = time.perf_counter()
                if paused_here:
                    dom.suspend()
                paused_at = time.perf_counter()
                try:
                    copies, full = self._copy_blocks(dom)
                finally:
                    copied_at = time.perf_counter()
                    if paused_here and not final:
                        dom.resume()
                    resumed_at = time.perf_counter()
            if final:
                self.frozen = True
            blocks = self._entries(copies, full)
            hashed_at = time.perf_counter()
            self.last_cut = {"paused_s": round(resumed_at - suspending_at, 6) if paused_here and not final else 0.0,
                             "suspend_s": round(paused_at - suspending_at, 6), "copy_s": round(copied_at - paused_at, 6),
                             "query_s": round(self.query_s, 6),
                             "resume_s": round(resumed_at - copied_at, 6), "hash_s": round(hashed_at - resumed_at, 6),
                             "copied": sum(len(c) for c in copies), "changed": sum(len(b) for b in blocks)}
            if not any(blocks) and not full and not final:
                self._log_cut(started, None)
                return None
            self.epoch += 1
            at_ns = time.time_ns()
            for index, (lg, entries) in enumerate(zip(self.logs, blocks)):
                data = b"".join(e.encode() for e in entries) + rlog.commit_entry(
                    self.epoch, len(entries), sum(e.length for e in entries), full, at_ns).encode()
                lg.append(data)
            self.epoch_at = at_ns / 1e9
            self.need_full = False if full else self.need_full
            self._truncate()
            self.new_epoch.notify_all()
            self._log_cut(started, self.epoch)
            return self.logs[0].epochs[-1]

    def _log_cut(self, started: float, epoch: int | None) -> None:
        self.last_cut["total_s"] = round(time.perf_counter() - started, 6)
        log.debug("replication of %s: cut %s: %s", self.domain, epoch if epoch is not None else "(nothing changed)",
                  " ".join(f"{k}={v}" for k, v in self.last_cut.items()))

    def _copy_blocks(self, dom: Domain) -> tuple[list[list[tuple[int, bytes]]], bool]:
        """(per device the candidate blocks as (index, bytes), full) for the next epoch: what may have
        changed since the last cut, copied from the backing. The guest is paused: only the dirty-list
        query and the reads happen here."""
        started = time.perf_counter()
        domain_id = dom.id()
        full = self.need_full or domain_id != self.domain_id or any(h is None for h in self.hashes)
        ranges: list[list[tuple[int, int]] | None] = [None] * len(self.devices)
        if domain_id is not None and domain_id != self.domain_id:
            try:  # a new QEMU run (or the first cut): start our dirty log now, with the guest paused
                self.ram_blocks = [power.ram_block_id(dom, power.find_device(dom, Path(d["backing"])))
                                   for d in self.devices]
                self.dirty_log = aio.run(power._start_log(dom), timeout=10)
            except (HvextError, TimeoutError) as err:
                log.info("replication of %s: no dirty log (%s); comparing every block by hash", self.domain, err)
                self.dirty_log = None
            self.domain_id = domain_id
            full = True
        elif self.dirty_log is not None and not full:
            try:
                dirty = aio.run(power._fetch_dirty(dom), timeout=10)
            except (HvextError, TimeoutError) as err:
                log.info("replication of %s: no dirty list this epoch (%s); comparing every block", self.domain, err)
                dirty = None
            ranges = [power.dirty_ranges(self.dirty_log, rb, d["size"], dirty, domain_id)
                      for rb, d in zip(self.ram_blocks, self.devices)]
            self.dirty_log = {"domain_id": domain_id, "generation": dirty.generation} if dirty is not None else None
        self.query_s = time.perf_counter() - started
        out: list[list[tuple[int, bytes]]] = []
        for index, device in enumerate(self.devices):
            nblocks = device["size"] // BLOCK_SIZE
            if full or self.hashes[index] is None or ranges[index] is None:
                candidates: Any = range(nblocks)  # a full epoch, an unpatched QEMU or a broken list
            else:
                candidates = sorted({b for off, n in ranges[index] or []
                                     for b in range(off // BLOCK_SIZE, (off + n - 1) // BLOCK_SIZE + 1)
                                     if b < nblocks})
            fd = pmem_devices.open_backing(Path(device["backing"]), os.O_RDONLY)
            try:
                out.append([(block, os.pread(fd, BLOCK_SIZE, block * BLOCK_SIZE)) for block in candidates])
            finally:
                os.close(fd)
        return out, full

    def _entries(self, copies: list[list[tuple[int, bytes]]], full: bool) -> list[list[Entry]]:
        """The next epoch's entries per device from the blocks :meth:`_copy_blocks` copied: every block
        of a full epoch, else those whose hash differs from what was shipped (the guest runs again)."""
        out: list[list[Entry]] = []
        for index, (device, copied) in enumerate(zip(self.devices, copies)):
            hashes = self.hashes[index]
            if full or hashes is None:
                hashes = [b""] * (device["size"] // BLOCK_SIZE)
            entries = []
            for block, data in copied:
                digest = hashlib.blake2b(data, digest_size=16).digest()
                if full or digest != hashes[block]:
                    hashes[block] = digest
                    entries.append(rlog.data_entry(0, self.epoch + 1, block * BLOCK_SIZE, data))
            self.hashes[index] = hashes
            out.append(entries)
        return out

    def _truncate(self) -> None:
        """Drop epochs every live replica acknowledged (or, past the size cap, everything but the last)."""
        try:
            live = set(self.client.hosts())
        except HvextError:
            return
        acked = [self.acks[h].get("epoch", 0) for h in self.replicas if h in live]
        upto = min(acked) if acked else 0
        cap = MAX_LOG_FACTOR * sum(d["size"] for d in self.devices)
        if sum(lg.end for lg in self.logs) > cap:
            upto = max(upto, self.epoch - 1)
            self.need_full = any(self.acks[h].get("epoch", 0) < upto for h in self.replicas)
        if upto:
            for lg in self.logs:
                lg.drop_through(upto)

    # ------------------------------------------------------------- shipping
    def _batch(self, host: str) -> tuple[list[Epoch], bytes]:
        """The next epochs for *host*, re-encoded for the replica (device = index, one COMMIT per epoch)."""
        with self.lock:
            acked = self.acks[host].get("epoch", 0)
            first_log = self.logs[0].epochs
            if self.in_stream[host] and (not first_log or first_log[0].epoch <= acked + 1):
                chosen = [e for e in first_log if e.epoch > acked]
            else:                                   # the replica needs a full epoch
                fulls = [e for e in first_log if e.full]
                if not fulls:
                    self.need_full = True
                    return [], b""
                chosen = [e for e in first_log if e.epoch >= fulls[-1].epoch]
            out, picked, size = [], [], 0
            for info in chosen:
                entries = []
                for index, lg in enumerate(self.logs):
                    match = next(e for e in lg.epochs if e.epoch == info.epoch)
                    entries += [Entry(e.kind, e.flags, index, e.epoch, e.offset, e.length, e.data)
                                for e in lg.entries(match)]
                encoded = b"".join(e.encode() for e in entries) + rlog.commit_entry(
                    info.epoch, len(entries), sum(e.length for e in entries), info.full, info.at_ns).encode()
                if picked and size + len(encoded) > SEND_LIMIT:
                    break
                out.append(encoded)
                picked.append(info)
                size += len(encoded)
            return picked, b"".join(out)

    def _hello(self, host: str) -> peer.Connection:
        records = self.client.host_records()
        address = (records.get(host) or {}).get("peer")
        if not isinstance(address, str) or ":" not in address:
            raise HAError(f"replica host {host} is not alive or has no peer address")
        name, _, port = address.rpartition(":")
        conn = peer.Connection(self.creds, name.strip("[]"), int(port))
        try:
            reply, _ = conn.request({"op": "hello", "domain": self.domain, "owner": self.me, "stream": self.stream,
                                     "devices": [{"name": s.name, "size": s.size} for s in self.specs]})
        except BaseException:
            conn.close()
            raise
        epoch = reply.get("epoch")
        with self.lock:
            self.in_stream[host] = reply.get("stream") == self.stream and isinstance(epoch, int)
            self.acks[host]["epoch"] = epoch if self.in_stream[host] else 0
        return conn

    def _ship_loop(self, host: str) -> None:
        conn: peer.Connection | None = None
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn = self._hello(host)
                picked, data = self._batch(host)
                if not picked:
                    with self.lock:
                        self.new_epoch.wait(timeout=self.interval)
                    continue
                reply, _ = conn.request({"op": "epochs", "domain": self.domain, "owner": self.me,
                                         "stream": self.stream,
                                         "devices": [{"name": s.name, "size": s.size} for s in self.specs]}, data)
                epoch = reply.get("epoch")
                if not isinstance(epoch, int) or epoch < picked[-1].epoch:
                    raise HAError(f"replica {host} applied epoch {epoch!r:.20}, not {picked[-1].epoch}")
                with self.lock:
                    self.in_stream[host] = True
                    self.acks[host] = {"epoch": epoch, "cut_at": round(picked[-1].at_ns / 1e9, 3),
                                       "pending_bytes": sum(lg.pending_bytes(epoch) for lg in self.logs)}
                    self.new_epoch.notify_all()
            except HvextError as err:
                with self.lock:
                    if self.acks[host].get("error") != str(err):
                        log.warning("replication of %s to %s: %s", self.domain, host, err)
                    self.acks[host]["error"] = str(err)[:300]
                if conn is not None:
                    conn.close()
                    conn = None
                self.stopping.wait(RETRY_S)
            except Exception:
                log.exception("replication of %s to %s failed unexpectedly", self.domain, host)
                if conn is not None:
                    conn.close()
                    conn = None
                self.stopping.wait(RETRY_S)
        if conn is not None:
            conn.close()

    # ------------------------------------------------------------- status and battery
    def record(self) -> dict[str, Any]:
        with self.lock:
            for host, ack in self.acks.items():
                ack["pending_bytes"] = sum(lg.pending_bytes(int(ack.get("epoch", 0))) for lg in self.logs)
            return {"owner": self.me, "stream": self.stream, "epoch": self.epoch, "epoch_at": round(self.epoch_at, 3),
                    "flush_cuts": self.flush_cuts,
                    "replicas": {h: dict(a) for h, a in self.acks.items()}, "updated": round(time.time(), 3)}

    def publish(self) -> None:
        self.last_status = time.monotonic()
        self.client.put_record(REPLICATION_PREFIX, self.domain, self.record())

    def drain(self, epoch: int, deadline: float) -> dict[str, int]:
        """Wait until every live replica acknowledged *epoch*, or *deadline* (monotonic); the acks."""
        try:
            live = set(self.client.hosts())
        except HvextError:
            live = set(self.replicas)
        with self.lock:
            while True:
                acked = {h: int(self.acks[h].get("epoch", 0)) for h in self.replicas}
                if all(acked[h] >= epoch for h in self.replicas if h in live) or time.monotonic() >= deadline:
                    return acked
                self.new_epoch.wait(timeout=max(0.01, min(0.2, deadline - time.monotonic())))

    def battery(self, deadline: float) -> dict[str, Any]:
        """The power is failing: pause the guest for good, cut the final epoch, drain it to the replicas
        until *deadline*, record ``/hvext/final/<domain>``. A report (never raises)."""
        report: dict[str, Any] = {"domain": self.domain}
        try:
            info = self.cut(final=True)
            final = self.epoch if info is None else info.epoch
            if info is None and self.epoch == 0:
                raise HAError("no epoch was ever cut (the domain does not run here)")
            acked = self.drain(final, deadline)
            record = {"host": self.me, "epoch": final, "at": round(time.time(), 3), "acked": acked}
            self.client.put_record(FINAL_PREFIX, self.domain, record)
            self.publish()
            report.update(epoch=final, acked=acked, complete=all(a >= final for a in acked.values()))
        except Exception as err:
            report["error"] = str(err) if isinstance(err, HvextError) else f"unexpected {type(err).__name__}: {err}"
        return report


# ----------------------------------------------------------------- the replica side
class ReplicaService:
    """The peer handler of a replica host: hello, then epochs, each checked against etcd's owner key."""

    def __init__(self, me: str, client: Client, state_dir: Path | None = None) -> None:
        self.me = me
        self.client = client
        self.state_dir = state_dir
        self.locks: dict[str, threading.Lock] = {}
        self.guard = threading.Lock()

    def _check(self, header: dict[str, Any]) -> tuple[str, str, list[DeviceSpec]]:
        domain = check_key_name("domain", str(header.get("domain", "")))
        owner = header.get("owner")
        stream = header.get("stream")
        if not isinstance(owner, str) or not isinstance(stream, str) or not 0 < len(stream) <= 300:
            raise HAError("a replication request needs owner and stream")
        raw = header.get("devices")
        if not isinstance(raw, list) or not 0 < len(raw) <= rlog.MAX_DEVICES or \
                not all(isinstance(d, dict) for d in raw):
            raise HAError("a replication request needs its devices")
        specs = [DeviceSpec(DeviceSpec.check_name(d.get("name")), rlog._size(d.get("size"))) for d in raw]
        current = self.client.owners().get(domain, (None, 0))[0]
        if owner == self.me or current != owner:
            raise HAError(f"{owner!r:.80} is not the owner of {domain!r} (etcd says {current!r:.80}): refused")
        return domain, stream, specs

    def handle(self, header: dict[str, Any], payload: bytes, who: str) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        if op not in ("hello", "epochs"):
            raise HAError(f"unknown request {op!r:.40}")
        domain, stream, specs = self._check(header)
        with self.guard:
            lock = self.locks.setdefault(domain, threading.Lock())
        with lock, ReplicaImage.open(replica_dir(self.me, domain, self.state_dir), wait=30) as image:
            if op == "epochs":
                image.receive(stream, payload, specs)
            return {"stream": image.stream, "epoch": image.epoch, "devices": len(image.devices)}, b""


# ----------------------------------------------------------------- restore on the claimer
def hand_off_after_power_loss(client: Client, host_name: str, uri: str | None, reports: list[dict[str, Any]],
                              owned: list[str]) -> dict[str, str]:
    """After the battery path's final epochs (:meth:`Manager.battery`): for each replicated domain this
    host owns whose final epoch a live replica acknowledged, destroy the (paused) guest and hand the
    domain to such a replica, so that it claims at its next renewal instead of after this host's lease
    ends. A domain no live replica holds whole is kept (claimed after the lease, from the newest ack).
    One domain's failure does not stop the others. Domain -> what happened (also logged)."""
    records, _ = client.protected()
    live = set(client.hosts()) - {host_name}
    outcomes: dict[str, str] = {}
    for report in reports:
        name = report.get("domain")
        record = records.get(name) if isinstance(name, str) else None
        if record is None or name not in owned or not is_replicated(record) or "error" in report:
            continue
        try:
            final = int(report["epoch"])
            holders = sorted(h for h, epoch in dict(report.get("acked") or {}).items()
                             if h in live and int(epoch) >= final)
            target = policy.preferred_host(name, holders)
            if target is None:
                outcomes[name] = (f"kept: no live replica acknowledged the final epoch {final}; claimed after "
                                  "this host's lease ends")
            else:
                with Host(uri) as host:  # paused since the final epoch; now it can never run here again
                    try:
                        dom = host.lookup(name)
                        if dom.is_active():
                            dom.destroy()
                    except DomainNotFound:
                        pass
                outcomes[name] = (f"final epoch {final} on {target}: stopped and handed off"
                                  if client.hand_off(record, host_name, target) else
                                  f"stopped; the hand-off to {target} did not apply (ownership or record changed)")
            log.warning("power loss: replicated domain %s: %s", name, outcomes[name])
        except (HvextError, KeyError, TypeError, ValueError) as err:
            outcomes[name] = f"error: {err}"
            log.error("power loss: replicated domain %s not handed off: %s; claimed after this host's lease "
                      "ends", name, err)
    return outcomes


def restore_from_replica(record: Protection, host_name: str, *, uri: str | None = None,
                         final: dict[str, Any] | None = None, state_dir: Path | None = None) -> Any:
    """Write *record*'s PMEM backing files on this host from its replica image (whole epoch: the image
    is recovered first); a :class:`hvext.ha.restore.RestoreReport` with the restored epoch. HAError
    when this host is no replica, holds no epoch, or its devices do not match the record."""
    from hvext.ha.restore import RestoreReport
    started = time.perf_counter()
    pmem = record.pmem or {}
    devices = device_specs(pmem)
    if host_name not in replica_hosts(pmem):
        if final is None and record.home == host_name and all(os.path.isfile(d["backing"]) for d in devices):
            # its home re-adopts it (after its own fence, no power loss): its own files are the newest
            return RestoreReport(record.domain, host_name, MODE, ok=True, performed=False,
                                 action="kept (its home re-adopted it and has its pmem files, newer than "
                                        "any replica)", seconds=round(time.perf_counter() - started, 4))
        raise HAError(f"{host_name} is not a replica of {record.domain!r} (replicas: "
                      f"{', '.join(replica_hosts(pmem))})")
    directory = replica_dir(host_name, record.domain, state_dir, create=False)
    if not (directory / ReplicaImage.STATE).exists():
        raise HAError(f"this host ({host_name}) holds no replica of {record.domain!r} (nothing in {directory})")
    with ReplicaImage.open(directory, wait=60) as image:
        if image.epoch <= 0:
            raise HAError(f"the replica of {record.domain!r} on {host_name} holds no whole epoch yet")
        if [(d.name, d.size) for d in image.devices] != [(d["name"], d["size"]) for d in devices]:
            raise HAError(f"the replica of {record.domain!r} has devices "
                          f"{[(d.name, d.size) for d in image.devices]}, the record "
                          f"{[(d['name'], d['size']) for d in devices]}")
        with Host(uri) as host:
            owner = host.qemu_user()
        done = []
        for index, device in enumerate(devices):
            done.append(_write_backing(record.domain, Path(device["backing"]), image, index, owner))
        epoch = image.epoch
    final_epoch = final.get("epoch") if isinstance(final, dict) else None
    complete = None if not isinstance(final_epoch, int) else epoch >= final_epoch
    return RestoreReport(record.domain, host_name, MODE, ok=True, performed=True,
                         action=f"restored from this host's replica (epoch {epoch})", epoch=epoch,
                         complete=complete, final_host=final.get("host") if isinstance(final, dict) else None,
                         devices=done, seconds=round(time.perf_counter() - started, 4))


def _write_backing(domain: str, backing: Path, image: ReplicaImage, index: int,
                   owner: tuple[int, int]) -> dict[str, Any]:
    """Replace *backing* with the image of device *index* (temp file, fsync, chown, rename; sparse)."""
    if backing.parent.is_relative_to(paths.VOLATILE_DIR):
        paths.volatile_dir(domain, owner[1])
    elif not backing.parent.is_dir():
        raise HAError(f"directory {backing.parent} of {backing} does not exist on this host")
    fd, tmp_name = tempfile.mkstemp(dir=backing.parent, prefix=f".{backing.name}.replica-")
    tmp = Path(tmp_name)
    written = 0
    try:
        size = image.devices[index].size
        os.ftruncate(fd, size)
        offset = 0
        for chunk in image.iter_image(index):
            if chunk.count(0) != len(chunk):
                rlog._write_all(fd, chunk, offset)
                written += len(chunk)
            offset += len(chunk)
        os.fsync(fd)
        os.fchown(fd, *owner)
        os.fchmod(fd, 0o660)
        os.replace(tmp, backing)
        durable.fsync_dir(backing.parent)
    except OSError as err:
        raise HAError(f"cannot restore {backing} from the replica: {err.strerror}") from err
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)
    return {"name": image.devices[index].name, "backing": str(backing), "bytes_written": written}


# ----------------------------------------------------------------- hvextd's part
class Manager:
    """hvextd's replication: the replica listener, and a :class:`Replicator` per owned replicated domain."""

    def __init__(self, me: str, uri: str | None, creds: Credentials, client_factory: Callable[[], Client],
                 interval: float = replication_policy.DEFAULT_EPOCH_INTERVAL_S, port: int = peer.PORT,
                 address: str = "", state_dir: Path | None = None) -> None:
        self.me = me
        self.uri = uri
        self.creds = creds
        self.client_factory = client_factory
        self.interval = interval
        self.port = port
        self.address = address
        self.state_dir = state_dir
        self.replicators: dict[str, Replicator] = {}
        self.server: peer.Server | None = None
        self.service: ReplicaService | None = None
        self.service_client: Client | None = None
        self.collect_every = COLLECT_EVERY_S  # how often leftovers of unprotected domains are looked for
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.syncer: threading.Thread | None = None
        #: Other services on the same peer port: op prefix -> handler (``ram-``: volatile state, C17/C18).
        self.handlers: dict[str, peer.Handler] = {}

    def start(self, source: Callable[[], tuple[dict[str, Protection], list[str]]]) -> None:
        """Follow *source* (the protected records and the domains owned here, read at each renewal) in
        a thread, and listen for owners' epochs (this host as a replica; HAError when it cannot)."""
        self.source = source
        self.syncer = threading.Thread(target=self._sync_loop, name="hvext-replication", daemon=True)
        self.syncer.start()
        self.start_server()

    def _sync_loop(self) -> None:
        collected = 0.0
        while not self.stopping.wait(min(1.0, self.interval)):
            try:
                records, owned = self.source()
                self.sync(records, owned)
                if time.monotonic() - collected >= self.collect_every:
                    collected = time.monotonic()
                    self.collect(set(records))
            except Exception:
                log.exception("replication: following the owned domains failed")

    def leftovers(self) -> set[str]:
        """Domains with a replica image or an owner log of this host under STATE_DIR/ha."""
        found: set[str] = set()
        for kind in ("log", "replicas"):
            base = ha_dir(self.state_dir) / kind / self.me
            if base.is_dir() and not base.is_symlink():
                found.update(p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink())
        return found

    def collect(self, protected: set[str]) -> list[str]:
        """Delete this host's replica images and owner logs of domains that are no longer protected
        (``hvext ha unprotect`` on any host): each hvextd cleans its own, so every replica host does.
        Candidates are domains neither in *protected* (the last renewal's records) nor replicated from
        here; etcd is asked again (a domain protected since that read keeps its files; etcd not
        answering: nothing is deleted) and each is removed under the replica service's lock of the
        domain. The paths removed."""
        with self.lock:
            candidates = self.leftovers() - protected - set(self.replicators)
        if not candidates or self.service is None:
            return []
        try:
            good, bad = self.service.client.protected()
        except HvextError as err:
            log.info("replication: leftovers of unprotected domains kept for now: %s", err)
            return []
        removed: list[str] = []
        for domain in sorted(candidates - set(good) - set(bad)):
            try:
                check_key_name("domain", domain)
            except HAError:
                continue  # not a directory this module made
            with self.service.guard:
                lock = self.service.locks.setdefault(domain, threading.Lock())
            with self.lock, lock:
                if domain in self.replicators:
                    continue
                try:
                    done = remove_state(domain, self.state_dir, host=self.me)
                except OSError as err:
                    log.warning("replication: cannot remove the replica of unprotected %s: %s", domain, err)
                    continue
            if done:
                log.warning("replication: %s is no longer protected: removed %s", domain, ", ".join(done))
            removed += done
        return removed

    def start_server(self) -> None:
        """Listen for owners' epochs (this host as a replica)."""
        self.service_client = self.client_factory()
        service = self.service = ReplicaService(self.me, self.service_client, self.state_dir)
        handler = peer.route(service.handle, self.handlers) if self.handlers else service.handle
        self.server = peer.Server(self.creds, handler, self.address, self.port)
        log.info("replication: listening for peers on %s:%d", self.address or "*", self.server.port)

    def sync(self, records: dict[str, Protection], owned: list[str]) -> None:
        """Replicate exactly the owned, replicated domains that run here (blocking: a thread)."""
        wanted = {d: records[d] for d in owned if d in records and is_replicated(records[d])}
        with self.lock:
            for domain in [d for d in self.replicators if d not in wanted]:
                log.info("replication of %s stops here (no longer owned or protected)", domain)
                self.replicators.pop(domain).stop()
            running = self._running(list(d for d in wanted if d not in self.replicators))
            for domain in running:
                try:
                    rep = Replicator(wanted[domain], self.me, self.uri, self.creds, self.client_factory,
                                     self.interval, self.port, self.state_dir)
                except HvextError as err:
                    log.error("replication of %s cannot start: %s", domain, err)
                    continue
                rep.start()
                self.replicators[domain] = rep
                log.warning("replicating %s to %s (stream %s)", domain, ", ".join(rep.replicas) or "no host",
                            rep.stream)

    def _running(self, names: list[str]) -> list[str]:
        if not names:
            return []
        out = []
        try:
            with Host(self.uri) as host:
                for name in names:
                    try:
                        if host.lookup(name).is_active():
                            out.append(name)
                    except DomainNotFound:
                        pass
        except HvextError as err:
            log.info("replication: libvirt: %s", err)
        return out

    def stop_all(self) -> None:
        with self.lock:
            for rep in self.replicators.values():
                rep.stop()
            self.replicators.clear()

    def battery(self, budget: float) -> list[dict[str, Any]]:
        """SIGPWR: every replicated domain's final epoch, drained until *budget* s from now (concurrently)."""
        deadline = time.monotonic() + budget
        with self.lock:
            reps = list(self.replicators.values())
        reports: list[dict[str, Any]] = [{} for _ in reps]

        def one(i: int, rep: Replicator) -> None:
            reports[i] = rep.battery(deadline)
        threads = [threading.Thread(target=one, args=(i, r), daemon=True) for i, r in enumerate(reps)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=budget + 10)
        return reports

    def close(self) -> None:
        self.stopping.set()
        if self.syncer is not None:
            self.syncer.join(timeout=15)
        self.stop_all()
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.service_client is not None:
            self.service_client.close()


# ----------------------------------------------------------------- ha status
def status_fields(record: Protection, replication: dict[str, Any] | None, final: dict[str, Any] | None,
                  live_hosts: list[str]) -> dict[str, Any]:
    """What ``ha status`` adds for a replicated domain: replicas with acks and lag, last local epoch."""
    rep = replication or {}
    replicas = replica_hosts(record.pmem or {})
    acks = rep.get("replicas") if isinstance(rep.get("replicas"), dict) else {}
    owner = rep.get("owner")
    rows = replication_policy.replica_states([h for h in replicas if h != owner],
                                             {h: a for h, a in acks.items() if isinstance(a, dict)},
                                             live_hosts, int(rep.get("epoch", 0) or 0),
                                             float(rep.get("epoch_at", 0) or 0))
    return {"mode": MODE, "replicas": rows, "stream_owner": owner, "epoch_local": rep.get("epoch"),
            "epoch_local_at": rep.get("epoch_at"), "final": final}
