"""hvextd's Prometheus metrics (docs/metrics.md): the host and its guests, read at scrape time.

:class:`HvextCollector` reads everything when Prometheus scrapes, through the
capability modules (no second copy of their logic): libvirt's balloon
statistics (:meth:`hvext.host.Domain.balloon_stats`), the balloon target hvext
recorded (:func:`hvext.memory.balloon.recorded_target`), the QEMU process's
memory from /proc (:mod:`hvext.memory.swap`), the guest agent's memory classes
(:func:`hvext.memory.classes.fetch`, its cached sample), QEMU's last dirty-rate
measurement (``query-dirty-rate``, checked by :func:`hvext.dirty.rate.parse_result`),
the power registry and store manifests (:mod:`hvext.pmem`), the pool tree's
entitlements (:mod:`hvext.memory.pools`) and /proc/meminfo.

What hvextd itself does is counted by plain Counters (:data:`RECLAIM_DECISIONS`,
:data:`PMEM_SAVES`, ...), incremented where it happens.

One domain's failure (a libvirt error, data from its guest or its QEMU that
does not check out, a read that takes too long) skips that domain's metrics
and increments ``hvext_scrape_errors_total{domain=...}``; the other domains
and the host are exported as usual. Collecting is split into reading (the
functions that touch libvirt, QMP, the agent, /proc) and :func:`families`, a
pure function from a :class:`Snapshot` to metric families.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hvext import aio
from hvext.dirty import rate
from hvext.errors import (AgentError, AgentTimeout, AgentUnavailable, DomainNotFound, DomainStateError, HvextError,
                          QMPError)
from hvext.host import MIGRATION_EVENTS, Domain, Host
from hvext.memory import balloon, classes, ramfile, swap
from hvext.memory.demand import leaf_demands, stored_tree
from hvext.memory.host import meminfo
from hvext.memory.pools import PoolStore
from hvext.pmem import power
from hvext.pmem.store import Store
from hvext.units import KIB, MIB

if TYPE_CHECKING:  # hvext.daemon.config imports reclaim_loop, which imports this module
    from hvext.daemon.config import MetricsConfig

log = logging.getLogger("hvextd.metrics")

#: A scrape waits at most this long for one domain (libvirt, QMP and the agent together).
DOMAIN_TIMEOUT_S = 8.0
#: ... and at most this long for the guest agent's memory classes (then they are left out).
AGENT_TIMEOUT_S = 4.0
#: The agent's cached memory-class sample is used while younger than this (a new one is taken otherwise).
CLASSES_MAX_AGE_S = 60.0


@dataclass(frozen=True)
class Spec:
    """One metric family: its name (a counter's without ``_total``), type, help and labels."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    labels: tuple[str, ...] = ()

    def exported(self) -> set[str]:
        """The sample names Prometheus sees for this family."""
        return {self.name + "_total", self.name + "_created"} if self.kind == "counter" else {self.name}


#: Families the collector builds at scrape time.
GAUGES: dict[str, Spec] = {s.name: s for s in (
    Spec("hvext_libvirt_connected", "gauge", "1 when hvextd is connected to libvirt"),
    Spec("hvext_scrape_duration_seconds", "gauge", "seconds the collector took to read this scrape"),
    Spec("hvext_host_memory_total_bytes", "gauge", "host MemTotal (/proc/meminfo)"),
    Spec("hvext_host_memory_available_bytes", "gauge", "host MemAvailable (/proc/meminfo)"),
    Spec("hvext_host_swap_total_bytes", "gauge", "host SwapTotal (/proc/meminfo)"),
    Spec("hvext_host_swap_used_bytes", "gauge", "host SwapTotal - SwapFree (/proc/meminfo)"),
    Spec("hvext_domain_memory_max_bytes", "gauge", "the domain's maximum memory (libvirt)", ("domain",)),
    Spec("hvext_domain_balloon_actual_bytes", "gauge",
         "where the balloon is: the guest's memory (libvirt memoryStats actual, as virsh dommemstat)", ("domain",)),
    Spec("hvext_domain_balloon_target_bytes", "gauge",
         "the balloon target hvext set (source=hvext), else the definition's currentMemory (source=definition)",
         ("domain", "source")),
    Spec("hvext_domain_memory_class_bytes", "gauge",
         "guest memory by usage class (guest agent, plausible reports only)", ("domain", "class")),
    Spec("hvext_domain_qemu_rss_bytes", "gauge", "resident memory of the domain's QEMU process (/proc); for a "
         "RAM-file domain without its RAM file's pages (hvext_domain_ram_file_bytes): add the two, counted once",
         ("domain",)),
    Spec("hvext_domain_ram_file_bytes", "gauge", "host memory the guest RAM file of a RAM-file domain holds "
         "(/dev/shm/hvext; running domains)", ("domain",)),
    Spec("hvext_domain_qemu_swap_bytes", "gauge", "host swap used by the domain's QEMU process (/proc)", ("domain",)),
    Spec("hvext_domain_dirty_rate_bytes_per_second", "gauge",
         "QEMU's last finished dirty-rate measurement (absent until one is made)", ("domain", "mode")),
    Spec("hvext_pmem_store_generation", "gauge",
         "generation of a protected PMEM device's store: the number of saves it holds", ("domain", "backing")),
    Spec("hvext_pmem_last_save_timestamp_seconds", "gauge", "when the store was last saved (Unix time)",
         ("domain", "backing")),
    Spec("hvext_pmem_last_save_bytes", "gauge", "bytes the last save of the device wrote (power registry)",
         ("domain", "backing")),
    Spec("hvext_pmem_last_save_seconds", "gauge", "seconds the last save of the device took (power registry)",
         ("domain", "backing")),
    Spec("hvext_pool_entitlement_bytes", "gauge",
         "memory the pool tree entitles a pool or VM leaf to, given the running VMs' balloon actual", ("pool",)),
)}

REGISTRY = CollectorRegistry()


def _counter(spec: Spec) -> Counter:
    return Counter(spec.name, spec.help, list(spec.labels), registry=REGISTRY)


#: Families hvextd increments as things happen (plain Counters).
COUNTERS: dict[str, Spec] = {s.name: s for s in (
    Spec("hvext_scrape_errors", "counter",
         "reads that failed during scrapes; domain is empty for host-wide sources", ("domain", "source")),
    Spec("hvext_reclaim_decisions", "counter", "reclaims hvextd's reclaim loop carried out, by method",
         ("domain", "method")),
    Spec("hvext_reclaim_returned_bytes", "counter", "bytes the QEMU processes gave back in those reclaims",
         ("domain", "method")),
    Spec("hvext_reclaim_failures", "counter", "reclaims hvextd's reclaim loop tried and that failed", ("domain",)),
    Spec("hvext_pmem_saves", "counter", "PMEM device saves hvextd made on SIGPWR, by result", ("domain", "result")),
    Spec("hvext_pmem_saved_bytes", "counter", "bytes written by those saves", ("domain",)),
    Spec("hvext_pmem_save_seconds", "counter", "seconds spent in those saves", ("domain",)),
    Spec("hvext_migrations", "counter",
         "migrations libvirt reported: direction=out, the domain completed leaving this host; "
         "direction=in, an incoming migration started here", ("domain", "direction")),
)}
SCRAPE_ERRORS, RECLAIM_DECISIONS, RECLAIM_RETURNED, RECLAIM_FAILURES, PMEM_SAVES, PMEM_SAVED_BYTES, \
    PMEM_SAVE_SECONDS, MIGRATIONS = (_counter(s) for s in COUNTERS.values())


def exported_names() -> set[str]:
    """Every sample name hvextd's endpoint can show (what a dashboard may query)."""
    return {name for spec in (*GAUGES.values(), *COUNTERS.values()) for name in spec.exported()}


# -- what hvextd counts itself ------------------------------------------------------------------

def count_lifecycle(domain: str, event: str, detail: int) -> None:
    """Count a lifecycle event (as :meth:`hvext.host.Host.watch` names it) that is a migration
    outcome; others are ignored."""
    direction = MIGRATION_EVENTS.get((event, detail))
    if direction is not None:
        MIGRATIONS.labels(domain, direction).inc()


def count_reclaim(domain: str, method: str, returned: int) -> None:
    RECLAIM_DECISIONS.labels(domain, method).inc()
    RECLAIM_RETURNED.labels(domain, method).inc(max(0, returned))


def count_power_loss(report: dict[str, Any]) -> None:
    """Count the device saves of a :func:`hvext.pmem.power.power_loss` report."""
    for device in report.get("devices", []):
        domain = str(device.get("domain", ""))
        if "error" in device:
            PMEM_SAVES.labels(domain, "error").inc()
            continue
        PMEM_SAVES.labels(domain, "saved").inc()
        PMEM_SAVED_BYTES.labels(domain).inc(max(0, int(device.get("bytes_written") or 0)))
        PMEM_SAVE_SECONDS.labels(domain).inc(max(0.0, float(device.get("seconds") or 0.0)))


# -- reading ------------------------------------------------------------------------------------


@dataclass
class DomainSample:
    """What one running domain looks like now (bytes); None or empty: not known."""

    name: str
    balloon_actual: int
    max_memory: int
    balloon_target: balloon.Target | None = None
    qemu_rss: int | None = None  # a RAM-file domain's without its RAM file's pages
    ram_file: int | None = None  # pages its RAM file holds (RAM-file domains)
    qemu_swap: int | None = None
    classes: dict[str, int] = field(default_factory=dict)
    dirty_rate: tuple[str, int] | None = None  # (mode, bytes per second)
    hvext_managed: bool = False
    has_agent: bool = False
    soft_errors: list[str] = field(default_factory=list)  # sources left out this time (the rest is exported)


@dataclass(frozen=True)
class PmemDevice:
    """A protected PMEM device as the registry and its store's manifest describe it."""

    domain: str
    backing: str
    generation: int | None
    saved_at: float | None
    last_save_bytes: int | None
    last_save_seconds: float | None


@dataclass
class Snapshot:
    """Everything one scrape read; :func:`families` turns it into metrics."""

    meminfo: dict[str, int]
    connected: bool
    domains: list[DomainSample] = field(default_factory=list)
    entitlements: dict[str, int] = field(default_factory=dict)  # pool path -> bytes
    pmem: list[PmemDevice] = field(default_factory=list)
    duration_s: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)  # (domain, source)


def read_libvirt(domain: Domain) -> DomainSample:
    """The libvirt and /proc part of a domain's sample (blocking)."""
    stats = domain.balloon_stats()
    max_kib, current_kib = domain.memory_kib()
    # without a balloon driver libvirt reports no "actual": the current memory is where it stands
    actual_kib = stats.get("actual", current_kib)
    facts = domain.facts()
    sample = DomainSample(domain.name, actual_kib * KIB, max_kib * KIB,
                          balloon_target=balloon.recorded_target(domain),
                          hvext_managed=facts.hvext_managed, has_agent=facts.has_agent_channel)
    try:
        memory = swap.process_memory(swap.qemu_pid(domain.name))
        sample.qemu_rss, sample.qemu_swap = memory["rss"], memory["swap"]
        if ramfile.of(domain) is not None:  # its RSS includes the RAM file's pages: count them once
            used = ramfile.usage(domain)
            sample.qemu_rss, sample.ram_file = used.private, used.file
    except DomainStateError as err:  # no pid file here (a remote URI) or QEMU just exited
        log.debug("no QEMU process figures for %s: %s", domain.name, err)
    return sample


def measured_dirty_rate(reply: Any) -> tuple[str, int] | None:
    """(mode, bytes/s) of QEMU's last finished ``query-dirty-rate``; None while none finished (QMPError if bad)."""
    if not isinstance(reply, dict) or reply.get("status") != "measured":
        return None
    result = rate.parse_result(reply, "page-sampling", 0, time.monotonic())
    return result.mode, result.rate_mib_s * MIB


def class_bytes(report: classes.MemClasses) -> dict[str, int]:
    """Bytes per memory class of a validated report; {} for an implausible one (not trusted)."""
    if not report.plausible:
        return {}
    return {row["name"]: max(0, row["bytes"]) for row in report.rows()}


async def sample_domain(domain: Domain) -> DomainSample:
    """A running domain's sample. QMP and the agent are asked only on domains hvext defined
    (libvirt's passthrough would taint the others)."""
    sample = await asyncio.to_thread(read_libvirt, domain)
    if not sample.hvext_managed:
        return sample
    async with domain.qmp() as session:
        sample.dirty_rate = measured_dirty_rate(await session.execute("query-dirty-rate"))
    if sample.has_agent:
        try:
            report = await asyncio.wait_for(
                classes.fetch(domain, cached=True, max_age=CLASSES_MAX_AGE_S, timeout=AGENT_TIMEOUT_S),
                AGENT_TIMEOUT_S)
            sample.classes = class_bytes(report)
        except AgentUnavailable:  # booting, or its agent is not running: classes are not known
            pass
        except (AgentTimeout, asyncio.TimeoutError):
            sample.soft_errors.append("agent")
    return sample


def read_meminfo() -> dict[str, int]:
    return {key: meminfo(key) for key in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree")}


def read_pmem(registry_dir: Path | None = None) -> tuple[list[PmemDevice], list[tuple[str, str]]]:
    """Protected devices from the power registry and their stores' manifests; and (domain, "pmem")
    for each store that cannot be read (that device's generation is then left out)."""
    devices: list[PmemDevice] = []
    errors: list[tuple[str, str]] = []
    for reg in power.registrations(registry_dir):
        generation = saved_at = None
        try:
            store = Store.open(Path(reg.store))
            generation = store.generation
            stamp = store.manifest.get("saved_at")
            saved_at = float(stamp) if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else None
        except (HvextError, ValueError, TypeError, KeyError) as err:
            log.warning("metrics: store of %s %s: %s", reg.domain, reg.backing, err)
            errors.append((str(reg.domain), "pmem"))
        last = reg.last_save if isinstance(reg.last_save, dict) else {}
        written, seconds = last.get("bytes_written"), last.get("seconds")
        devices.append(PmemDevice(
            str(reg.domain), str(reg.backing), generation, saved_at,
            written if isinstance(written, int) and not isinstance(written, bool) and written >= 0 else None,
            float(seconds) if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) else None))
    return devices, errors


def read_entitlements(demand_bytes: dict[str, int], store: PoolStore | None = None) -> dict[str, int]:
    """Bytes per pool node (pools and leaves) for the running domains' *demand_bytes*; {} without a pool store.

    Read only: a missing store is not created (unlike ``hvext pool-*``)."""
    with stored_tree(store) as tree:
        if tree is None:
            return {}
        leaves = leaf_demands(tree, {name: amount // MIB for name, amount in demand_bytes.items()})
        return {path: mib * MIB for path, mib in tree.entitlements(leaves, all_nodes=True).items()}


def _error_source(err: BaseException) -> str:
    if isinstance(err, asyncio.TimeoutError):
        return "timeout"
    if isinstance(err, AgentError):
        return "agent"
    if isinstance(err, QMPError):
        return "qmp"
    if isinstance(err, HvextError):
        return "libvirt"
    return "unexpected"


class HvextCollector(Collector):
    """Reads the host and its running domains at every scrape (see the module doc).

    *host* returns hvextd's current libvirt connection, or None while it has none;
    *domains*, when given, are the only domains read.
    """

    def __init__(self, host: Callable[[], Host | None], domains: tuple[str, ...] = ()) -> None:
        self.host = host
        self.domains = domains

    def collect(self) -> Iterator[Metric]:
        snapshot = self.read()
        for domain, source in snapshot.errors:
            SCRAPE_ERRORS.labels(domain, source).inc()
        yield from families(snapshot)

    def read(self) -> Snapshot:
        """One scrape's reads; every failure is recorded in ``errors``, none is raised."""
        started = time.monotonic()
        snapshot = Snapshot(meminfo={}, connected=False)
        try:
            snapshot.meminfo = read_meminfo()
        except (OSError, ValueError, IndexError) as err:
            log.warning("metrics: cannot read /proc/meminfo: %s", err)
            snapshot.errors.append(("", "meminfo"))
        host = self.host()
        if host is not None:
            self._read_domains(host, snapshot)
        demand = {d.name: d.balloon_actual for d in snapshot.domains}
        try:
            snapshot.entitlements = read_entitlements(demand)
        except HvextError as err:
            log.warning("metrics: pool entitlements: %s", err)
            snapshot.errors.append(("", "pools"))
        try:
            snapshot.pmem, pmem_errors = read_pmem()
            snapshot.errors += pmem_errors
        except HvextError as err:
            log.warning("metrics: power registry: %s", err)
            snapshot.errors.append(("", "pmem"))
        snapshot.duration_s = time.monotonic() - started
        return snapshot

    def _read_domains(self, host: Host, snapshot: Snapshot) -> None:
        try:
            domains = [d for d in host.domains(include_inactive=False)
                       if not self.domains or d.name in self.domains]
        except HvextError as err:
            log.warning("metrics: cannot list domains: %s", err)
            snapshot.errors.append(("", "libvirt"))
            return
        snapshot.connected = True
        results = aio.run(_sample_all(domains))
        for domain, result in zip(domains, results, strict=True):
            if isinstance(result, DomainSample):
                snapshot.domains.append(result)
                snapshot.errors += [(domain.name, source) for source in result.soft_errors]
            elif isinstance(result, (DomainNotFound, DomainStateError)):
                log.debug("metrics: %s went away during the scrape: %s", domain.name, result)
            else:
                source = _error_source(result)
                if source == "unexpected":
                    log.error("metrics: reading %s failed unexpectedly", domain.name, exc_info=result)
                else:
                    log.warning("metrics: skipping %s: %s", domain.name, result or type(result).__name__)
                snapshot.errors.append((domain.name, source))


async def _sample_all(domains: list[Domain]) -> list[DomainSample | BaseException]:
    """Every domain's sample, concurrently, each bounded by :data:`DOMAIN_TIMEOUT_S`."""
    return await asyncio.gather(*(asyncio.wait_for(sample_domain(d), DOMAIN_TIMEOUT_S) for d in domains),
                                return_exceptions=True)


# -- building families (pure) -------------------------------------------------------------------


def families(snapshot: Snapshot) -> list[Metric]:
    """The gauge families of *snapshot* (unknown values are left out, never exported as 0)."""
    out: dict[str, GaugeMetricFamily] = {
        name: GaugeMetricFamily(name, spec.help, labels=list(spec.labels)) for name, spec in GAUGES.items()}

    def put(name: str, value: float | None, *labels: str) -> None:
        if value is not None:
            out[name].add_metric(list(labels), value)

    put("hvext_libvirt_connected", 1 if snapshot.connected else 0)
    put("hvext_scrape_duration_seconds", snapshot.duration_s)
    info = snapshot.meminfo
    if info:
        put("hvext_host_memory_total_bytes", info.get("MemTotal"))
        put("hvext_host_memory_available_bytes", info.get("MemAvailable"))
        put("hvext_host_swap_total_bytes", info.get("SwapTotal"))
        if "SwapTotal" in info and "SwapFree" in info:
            put("hvext_host_swap_used_bytes", max(0, info["SwapTotal"] - info["SwapFree"]))
    for d in snapshot.domains:
        put("hvext_domain_memory_max_bytes", d.max_memory, d.name)
        put("hvext_domain_balloon_actual_bytes", d.balloon_actual, d.name)
        if d.balloon_target is not None:
            put("hvext_domain_balloon_target_bytes", d.balloon_target.bytes, d.name, d.balloon_target.source)
        for name, value in d.classes.items():
            put("hvext_domain_memory_class_bytes", value, d.name, name)
        put("hvext_domain_qemu_rss_bytes", d.qemu_rss, d.name)
        put("hvext_domain_ram_file_bytes", d.ram_file, d.name)
        put("hvext_domain_qemu_swap_bytes", d.qemu_swap, d.name)
        if d.dirty_rate is not None:
            put("hvext_domain_dirty_rate_bytes_per_second", d.dirty_rate[1], d.name, d.dirty_rate[0])
    for p in snapshot.pmem:
        put("hvext_pmem_store_generation", p.generation, p.domain, p.backing)
        put("hvext_pmem_last_save_timestamp_seconds", p.saved_at, p.domain, p.backing)
        put("hvext_pmem_last_save_bytes", p.last_save_bytes, p.domain, p.backing)
        put("hvext_pmem_last_save_seconds", p.last_save_seconds, p.domain, p.backing)
    for pool, value in sorted(snapshot.entitlements.items()):
        put("hvext_pool_entitlement_bytes", value, pool)
    return list(out.values())


# -- serving ------------------------------------------------------------------------------------


def url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/metrics"


@dataclass
class Endpoint:
    """A running endpoint: its HTTP server (a thread) and the collector it registered."""

    server: Any
    collector: HvextCollector

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and unregister the collector (a reload may serve anew; counters are kept)."""
        self.server.shutdown()
        self.server.server_close()
        REGISTRY.unregister(self.collector)


def serve(config: MetricsConfig, host: Callable[[], Host | None]) -> Endpoint:
    """Start the endpoint (a thread) with :class:`HvextCollector` on :data:`REGISTRY`.

    QMP goes through this process's monitor: hvextd's (hvext.qmp.use_monitor("daemon"))."""
    collector = HvextCollector(host, config.domains)
    REGISTRY.register(collector)
    try:
        server, _thread = start_http_server(config.port, config.address, registry=REGISTRY)
    except OSError as err:
        REGISTRY.unregister(collector)
        raise HvextError(f"cannot serve metrics on {config.address} port {config.port}: "
                         f"{err.strerror or err}") from err
    log.info("serving metrics on %s", url(config.address, server.server_port))
    return Endpoint(server, collector)
