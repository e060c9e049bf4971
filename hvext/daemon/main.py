"""``hvextd``: the per-host hvext daemon.

It watches the host: it follows libvirt's domain lifecycle events on hvext's
shared asyncio loop (libvirtaio) and logs one line per event, and it
reconnects with backoff when libvirtd goes away. With ``--config FILE`` it
also runs the policy loops configured there (``[reclaim]``: see
hvext.daemon.reclaim_loop; ``[placement] enabled = true``: hvext.daemon.placement_loop) and takes its SIGPWR saves' pre-pause budget from
``[power] budget``; with a ``[metrics]`` section it serves Prometheus
metrics (hvext.daemon.metrics, docs/metrics.md); with an ``[ha]`` section it
holds this host's lease in the cluster and fences its owned VMs when it
cannot renew it (hvext.daemon.ha_loop, docs/ha.md). Every section is documented
in hvext.daemon.config. It always syncs the memory mirrors ``hvext ha mirror`` registered
(hvext.daemon.mirror_loop) and keeps the dirty sets of ``hvext ha baseline`` current
(hvext.daemon.volatile_loop).

Signals: SIGHUP reloads the config file (a valid one takes effect at once;
a bad one, or a ``[metrics]`` address it cannot bind, is logged and the
config in force stays); SIGPWR saves protected PMEM (docs/power.md); SIGTERM or SIGINT
stops it cleanly. It reports readiness (once watching libvirt), reloads and
stopping to ``$NOTIFY_SOCKET`` (hvext.daemon.notify: systemd's
``Type=notify``, ``hvext daemon start``).

No failure in one round of a loop (watching, reclaim, a SIGPWR save) stops
hvextd: it is logged with its traceback and the loop goes on. Blocking calls
(libvirt, files) run in threads, never on the shared loop, which must stay free
for libvirt's keepalives and events.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hvext import aio, qmp
from hvext.errors import HvextError, LibvirtUnavailable, UsageError
from hvext.daemon import config as daemon_config
from hvext.daemon import ha_loop, metrics, mirror_loop, notify, placement_loop, reclaim_loop, volatile_loop
from hvext.daemon.config import Config, HAConfig, MetricsConfig, PowerConfig
from hvext.ha import standby
from hvext.ha.cluster import default_name as default_host_name
from hvext.daemon.placement_loop import PlacementConfig
from hvext.daemon.reclaim_loop import ReclaimConfig
from hvext.host import GUEST_STOPS, Host
from hvext.memory import ramfile
from hvext.pmem import hints, power

log = logging.getLogger("hvextd")

MAX_BACKOFF_S = 30.0


def release_ram_file(host: Host, name: str) -> None:
    """Empty the RAM file of RAM-file domain *name* after its guest stopped by itself (never one saved to
    RAM: :func:`hvext.memory.ramfile.release` checks); failures are logged."""
    try:
        if ramfile.release(host.lookup(name)):
            log.info("domain %s stopped: its RAM file's memory given back", name)
    except HvextError as err:
        log.warning("domain %s stopped, its RAM file was not emptied: %s", name, err)
    except Exception:
        log.exception("emptying the RAM file of %s failed unexpectedly", name)


class Daemon:
    """Connects to libvirt, logs lifecycle events, reconnects when the connection drops,
    runs the policy loops of its config (replaced by :meth:`apply` on a reload)."""

    def __init__(self, uri: str | None, config: Config | None = None) -> None:
        self.uri = uri
        self.config = config or daemon_config.defaults()
        self.stopping = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.reloaded = asyncio.Event()
        self.ready = False  # READY=1 was sent (the first time it watched libvirt)
        self.host: Host | None = None  # the connection being watched (read by the metrics collector)
        #: Also called with every lifecycle event (on the loop), e.g. the HA keeper's.
        self.listeners: list[Callable[[str, str, int], None]] = []

    async def apply(self, config: Config) -> None:
        """Use *config* from now on: the policy loops restart with it (a round in progress ends first)."""
        self.config = config
        self.reloaded.set()

    def _on_lifecycle(self, domain: str, event: str, detail: int) -> None:
        log.info("domain %s %s (detail %d)", domain, event, detail)
        metrics.count_lifecycle(domain, event, detail)
        if event == "stopped" and detail in GUEST_STOPS and self.host is not None:
            # a guest that powered off leaves its RAM file's pages in /dev/shm: give them back
            asyncio.get_running_loop().run_in_executor(None, release_ram_file, self.host, domain)
        for listener in self.listeners:
            listener(domain, event, detail)

    def _on_close(self, reason: int) -> None:
        log.warning("libvirt connection closed (reason %d)", reason)
        self.disconnected.set()

    async def serve(self) -> None:
        """Watch the host until stopped; every failure is logged and retried with backoff."""
        backoff = 1.0
        while not self.stopping.is_set():
            try:
                host = await asyncio.to_thread(Host, self.uri)
            except LibvirtUnavailable as err:
                log.error("%s; retrying in %.0f s", err, backoff)
                backoff = await self._back_off(backoff)
                continue
            except Exception:
                log.exception("connecting to libvirt failed unexpectedly; retrying in %.0f s", backoff)
                backoff = await self._back_off(backoff)
                continue
            backoff = 1.0
            self.disconnected.clear()
            self.host = host
            try:
                await self._watch(host)
            except HvextError as err:
                log.error("libvirt failed: %s; retrying in %.0f s", err, backoff)
                backoff = await self._back_off(backoff)
            except Exception:
                log.exception("watching %s failed unexpectedly; retrying in %.0f s", host.uri, backoff)
                backoff = await self._back_off(backoff)
            finally:
                self.host = None
                await asyncio.to_thread(host.close)

    async def _back_off(self, seconds: float) -> float:
        """Wait *seconds* (or until stopped) and return the next, longer wait."""
        await self._sleep(seconds)
        return min(seconds * 2, MAX_BACKOFF_S)

    def _register(self, host: Host) -> int:
        """Keepalive, close callback and lifecycle events on *host* (blocking: run in a thread)."""
        if not host.keep_alive(5, 3):
            log.info("%s has no keepalive (a local driver): not needed", host.uri)
        callback = host.watch(self._on_lifecycle, self._on_close)
        watching = f"watching {host.uri} ({len(host.domains())} domains)"
        log.info("%s", watching)
        if not self.ready:
            self.ready = True
            notify.ready(watching)
        else:
            notify.status(watching)
        return callback

    def _deregister(self, host: Host, callback: int) -> None:
        host.unwatch(callback)

    async def _watch(self, host: Host) -> None:
        """Register on *host*, run the policy loops (again after each reload), and wait until stopped or
        disconnected."""
        callback = await asyncio.to_thread(self._register, host)
        while True:
            self.reloaded.clear()
            finish = asyncio.Event()
            reclaim = self.config.get(ReclaimConfig)
            loops = [asyncio.ensure_future(reclaim_loop.run(host, reclaim, finish))] if reclaim else []
            loops.append(asyncio.ensure_future(mirror_loop.run(host, finish)))  # mirrors registered by `ha mirror`
            loops.append(asyncio.ensure_future(volatile_loop.run(host, finish)))  # `ha baseline`'s dirty sets
            placing = self.config.get(PlacementConfig)
            if placing is not None and placing.enabled:
                loops.append(asyncio.ensure_future(placement_loop.run(host, placing, finish)))
            try:
                await self._wait_any(self.stopping, self.disconnected, self.reloaded)
                if self.stopping.is_set() or self.disconnected.is_set():
                    break
                finish.set()  # a reload: the round in progress ends, then the loops start with the new config
                await asyncio.gather(*loops, return_exceptions=True)
            finally:
                for task in loops:
                    task.cancel()
                await asyncio.gather(*loops, return_exceptions=True)
        if not self.disconnected.is_set():
            await asyncio.to_thread(self._deregister, host, callback)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    @staticmethod
    async def _wait_any(*events: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


def on_power_loss(uri: str | None, budget: float | None = None) -> dict[str, Any] | None:
    """SIGPWR (the UPS/BIOS says power is failing): what `hvext power loss` does, logged; its report
    (None when the save could not run). *budget*: the config's ``[power] budget`` (None:
    :data:`hvext.pmem.power.PREPAUSE_BUDGET_S`)."""
    log.warning("SIGPWR: power is failing; saving protected pmem devices")
    try:
        with Host(uri) as host:
            report = power.power_loss(host, hints=hints.PROVIDER, budget=budget)
    except HvextError as err:
        log.error("power-loss save failed: %s", err)
        return None
    except Exception:  # hvextd must live on: the next SIGPWR (or a restore at start) may still work
        log.exception("power-loss save failed unexpectedly")
        return None
    metrics.count_power_loss(report)
    for device in report["devices"]:
        log.warning("power loss: %s %s: %s", device["domain"], device["backing"],
                    device.get("error") or f"{device.get('bytes_written', 0)} bytes in {device.get('seconds')} s "
                                           f"({device.get('mode')})")
    for gone in report["missing"]:
        log.warning("power loss: %s %s: registered, but the domain no longer exists; its store %s is kept "
                    "(`hvext power unprotect` removes the registration)", gone["domain"], gone["backing"],
                    gone["store"])
    log.warning("power loss: %d bytes saved in %.2f s (pre-pause budget %.1f s)", report["bytes_written"],
                report["seconds"], report["budget_seconds"])
    return report


def on_start_restore(uri: str | None) -> None:
    """At host start: when a power loss was recorded, restore the saved PMEM and the guests."""
    try:
        pending = [r for r in power.registrations() if r.pending]
    except HvextError as err:
        log.error("cannot read the power registry: %s", err)
        return
    except Exception:
        log.exception("cannot read the power registry")
        return
    if not pending:
        return
    log.warning("a power loss was recorded for %d device(s): restoring", len(pending))
    try:
        with Host(uri) as host:
            report = power.power_restore(host, hints=hints.PROVIDER)
    except HvextError as err:
        log.error("power restore failed: %s", err)
        return
    except Exception:
        log.exception("power restore failed unexpectedly")
        return
    for domain in report.get("domains", []):
        log.warning("power restore: %s: %s", domain.get("domain"), domain.get("error") or domain.get("action"))


class MetricsEndpoint:
    """hvextd's Prometheus endpoint as its ``[metrics]`` section says; served anew when a reload changes it."""

    def __init__(self, host: Callable[[], Host | None]) -> None:
        self.host = host
        self.config = MetricsConfig()  # what is served (enabled=False: nothing)
        self.endpoint: metrics.Endpoint | None = None

    def apply(self, config: MetricsConfig | None) -> None:
        """Serve as *config* says; HvextError when it cannot (then the previous settings are served again)."""
        config = config or MetricsConfig()
        if config == self.config:
            return
        previous = self.config
        self.close()
        try:
            if config.enabled:
                self.endpoint = metrics.serve(config, self.host)
            self.config = config
        except HvextError:
            if previous.enabled:
                self.endpoint = metrics.serve(previous, self.host)
                self.config = previous
            raise

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        self.endpoint = None
        self.config = MetricsConfig()


def ha_keeper(config: HAConfig | None, uri: str | None) -> ha_loop.Keeper | None:
    """The lease keeper of an ``[ha]`` section (None without one); UsageError for a section it cannot use."""
    if config is None:
        return None
    if not config.etcd_endpoints:
        raise UsageError("[ha] etcd_endpoints is empty: name at least one member (https://HOST:2379)")
    return ha_loop.Keeper(config, config.host or default_host_name(), uri)


async def serve(daemon: Daemon, keeper: ha_loop.Keeper | None) -> None:
    """The daemon and, with ``[ha]``, its lease keeper (which hears the daemon's lifecycle events), until
    stopped."""
    if keeper is None:
        await daemon.serve()
        return
    daemon.listeners.append(keeper.on_lifecycle)
    await asyncio.gather(daemon.serve(), keeper.run(daemon.stopping))


def reload_ha(new: HAConfig | None, keeper: ha_loop.Keeper | None, loop: asyncio.AbstractEventLoop) -> str:
    """A reload's ``[ha]`` section for the running keeper; the log line saying what took effect and what
    needs a restart. Adding or removing the section needs one (the keeper is made at start)."""
    if keeper is None:
        return "[ha] added: joining the cluster needs an hvextd restart" if new is not None else ""
    if new is None:
        return ("[ha] removed: leaving the cluster needs an hvextd restart (`hvext daemon restart`, which fences "
                "the owned domains); the cluster settings in force stay")
    old = keeper.config

    async def apply() -> list[str]:
        return keeper.reconfigure(new)
    restart = asyncio.run_coroutine_threadsafe(apply(), loop).result(timeout=30)
    live = [f"{key} {getattr(old, key)} -> {getattr(new, key)}" for key in ("lease_ttl", "fence_margin", "cluster")
            if getattr(old, key) != getattr(new, key)]
    parts = []
    if live:
        parts.append("[ha] " + ", ".join(live) + " in effect now"
                     + (" (a new lease at the next renewal)" if old.lease_ttl != new.lease_ttl else ""))
    if restart:
        parts.append(f"[ha] {', '.join(restart)} changed: this needs an hvextd restart "
                     "(`hvext daemon restart`); the running values stay until then")
    return "; ".join(parts)


def reload(path: Path | None, daemon: Daemon, loop: asyncio.AbstractEventLoop,
           endpoint: MetricsEndpoint, keeper: ha_loop.Keeper | None = None) -> bool:
    """SIGHUP: read *path* again; a valid file replaces the daemon's config, a bad one (or a ``[metrics]``
    address that cannot be served) is logged and the config in force stays. Whether the new one was taken."""
    notify.reloading()
    try:
        if path is None:
            log.info("SIGHUP: hvextd runs without --config: nothing to reload")
            return False
        try:
            new = daemon_config.load(path)
            endpoint.apply(new.get(MetricsConfig))
        except HvextError as err:
            log.error("SIGHUP: %s; the configuration in force stays", err)
            return False
        asyncio.run_coroutine_threadsafe(daemon.apply(new), loop).result(timeout=30)
        log.info("SIGHUP: reloaded %s: %s", path, new.summary())
        ha = reload_ha(new.get(HAConfig), keeper, loop)
        if ha:
            log.warning("SIGHUP: %s", ha)
        return True
    finally:
        if daemon.ready:
            notify.ready()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hvextd", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--connect", metavar="URI", dest="uri", help="libvirt URI (as for hvext)")
    parser.add_argument("--config", type=Path,
                        help="TOML file: [reclaim], [power], [metrics], [ha], [placement] (documented in hvext/daemon/config.py)")
    parser.add_argument("--check-config", action="store_true",
                        help="check the --config file, print what it sets, and exit (0: valid, 1: not)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if args.check_config and args.config is None:
        print("error: --check-config needs --config FILE", file=sys.stderr)
        return 1
    try:
        config = daemon_config.load(args.config) if args.config else daemon_config.defaults()
    except HvextError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.check_config:
        print(f"{args.config}: valid: {config.summary()}")
        return 0
    if args.config:
        log.info("config %s: %s", args.config, config.summary())
    qmp.use_monitor("daemon")  # the CLI keeps the other one: `hvext qmp` works while hvextd holds this one
    loop = aio.loop()

    async def start() -> Daemon:
        return Daemon(args.uri, config)
    daemon = aio.run(start())
    try:
        keeper = ha_keeper(config.get(HAConfig), args.uri)
    except HvextError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    endpoint = MetricsEndpoint(lambda: daemon.host)
    try:
        endpoint.apply(config.get(MetricsConfig))
    except HvextError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    def stop(*_: object) -> None:
        notify.stopping()
        loop.call_soon_threadsafe(daemon.stopping.set)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    power_failing = threading.Event()
    signal.signal(signal.SIGPWR, lambda *_: power_failing.set())
    hangup = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: hangup.set())
    on_start_restore(args.uri)
    future = asyncio.run_coroutine_threadsafe(serve(daemon, keeper), loop)
    while not future.done():  # the main thread stays free to receive signals
        if power_failing.is_set():
            power_failing.clear()
            power_config = daemon.config.get(PowerConfig)
            standby.battery(args.uri)  # C17 first: RAM-file guests with a standby copy resume there
            if keeper is not None:  # C16 then: final epochs drained to the replicas while on battery
                keeper.replication_battery(power_config.budget if power_config else None)
            report = on_power_loss(args.uri, power_config.budget if power_config else None)
            if keeper is not None and report is not None:  # shared-store domains: to a live host now
                keeper.after_power_loss(report)
        if hangup.is_set():
            hangup.clear()
            try:
                reload(args.config, daemon, loop, endpoint, keeper)
            except Exception:  # hvextd must live on with the config in force
                log.exception("SIGHUP: reloading failed unexpectedly; the configuration in force stays")
        try:
            future.result(timeout=0.5)
        except TimeoutError:
            continue
    future.result()
    endpoint.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
