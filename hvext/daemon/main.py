"""``hvextd``: the per-host hvext daemon.

It watches the host: it follows libvirt's domain lifecycle events on hvext's
shared asyncio loop (libvirtaio) and logs one line per event, and it
reconnects with backoff when libvirtd goes away. With ``--config FILE`` it
also runs the policy loops configured there (``[reclaim]``: see
hvext.daemon.reclaim_loop) and takes its SIGPWR saves' pre-pause budget from
``[power] budget`` (hvext.daemon.config). With a ``[metrics]`` section it serves
Prometheus metrics (hvext.daemon.metrics, docs/metrics.md). It stops cleanly on
SIGTERM or SIGINT.

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
from pathlib import Path
from typing import Any

import libvirt

from hvext import aio, qmp
from hvext.errors import HvextError, LibvirtUnavailable
from hvext.daemon import metrics, reclaim_loop
from hvext.daemon.config import MetricsConfig, PowerConfig
from hvext.daemon.reclaim_loop import ReclaimConfig
from hvext.host import Host
from hvext.pmem import hints, power

log = logging.getLogger("hvextd")

EVENT_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined", libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started", libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed", libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
MAX_BACKOFF_S = 30.0


class Daemon:
    """Connects to libvirt, logs lifecycle events, reconnects when the connection drops."""

    def __init__(self, uri: str | None, reclaim: ReclaimConfig | None = None) -> None:
        self.uri = uri
        self.reclaim = reclaim
        self.stopping = asyncio.Event()
        self.disconnected = asyncio.Event()
        self.host: Host | None = None  # the connection being watched (read by the metrics collector)

    def _on_lifecycle(self, conn: Any, dom: libvirt.virDomain, event: int, detail: int, opaque: Any) -> None:
        try:
            log.info("domain %s %s (detail %d)", dom.name(), EVENT_NAMES.get(event, f"event {event}"), detail)
            metrics.count_lifecycle(dom.name(), event, detail)
        except Exception:  # libvirt would print the traceback on stderr and drop it
            log.exception("handling lifecycle event %d (detail %d) failed", event, detail)

    def _on_close(self, conn: Any, reason: int, opaque: Any) -> None:
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
            except (libvirt.libvirtError, HvextError) as err:
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
        try:
            host.conn.setKeepAlive(5, 3)
        except libvirt.libvirtError as err:
            if err.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise
            log.info("%s has no keepalive (a local driver): not needed", host.uri)
        host.conn.registerCloseCallback(self._on_close, None)
        callback: int = host.conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        log.info("watching %s (%d domains)", host.uri, len(host.domains()))
        return callback

    def _deregister(self, host: Host, callback: int) -> None:
        host.conn.domainEventDeregisterAny(callback)
        host.conn.unregisterCloseCallback()

    async def _watch(self, host: Host) -> None:
        """Register on *host*, run the policy loops, and wait until stopped or disconnected."""
        callback = await asyncio.to_thread(self._register, host)
        loops = [asyncio.ensure_future(reclaim_loop.run(host, self.reclaim, self.stopping))] \
            if self.reclaim else []
        try:
            await self._wait_any(self.stopping, self.disconnected)
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


def on_power_loss(uri: str | None, budget: float | None = None) -> None:
    """SIGPWR (the UPS/BIOS says power is failing): what `hvext power loss` does, logged.
    *budget*: the config's ``[power] budget`` (None: :data:`hvext.pmem.power.PREPAUSE_BUDGET_S`)."""
    log.warning("SIGPWR: power is failing; saving protected pmem devices")
    hints.install()
    try:
        with Host(uri) as host:
            report = power.power_loss(host, budget=budget)
    except HvextError as err:
        log.error("power-loss save failed: %s", err)
        return
    except Exception:  # hvextd must live on: the next SIGPWR (or a restore at start) may still work
        log.exception("power-loss save failed unexpectedly")
        return
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
    hints.install()
    try:
        with Host(uri) as host:
            report = power.power_restore(host)
    except HvextError as err:
        log.error("power restore failed: %s", err)
        return
    except Exception:
        log.exception("power restore failed unexpectedly")
        return
    for domain in report.get("domains", []):
        log.warning("power restore: %s: %s", domain.get("domain"), domain.get("error") or domain.get("action"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hvextd", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--connect", metavar="URI", dest="uri", help="libvirt URI (as for hvext)")
    parser.add_argument("--config", type=Path, help="TOML file with policy loops, e.g. [reclaim]")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        reclaim = ReclaimConfig.load(args.config) if args.config else None
        power_config = PowerConfig.load(args.config) if args.config else PowerConfig()
        metrics_config = MetricsConfig.load(args.config) if args.config else MetricsConfig()
    except HvextError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    qmp.use_monitor("daemon")  # the CLI keeps the other one: `hvext qmp` works while hvextd holds this one
    loop = aio.loop()

    async def start() -> Daemon:
        return Daemon(args.uri, reclaim)
    daemon = aio.run(start())
    server = None
    if metrics_config.enabled:
        try:
            server = metrics.serve(metrics_config, lambda: daemon.host)
        except HvextError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    stop = lambda *_: loop.call_soon_threadsafe(daemon.stopping.set)  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    power_failing = threading.Event()
    signal.signal(signal.SIGPWR, lambda *_: power_failing.set())
    on_start_restore(args.uri)
    future = asyncio.run_coroutine_threadsafe(daemon.serve(), loop)
    while not future.done():  # the main thread stays free to receive signals
        if power_failing.is_set():
            power_failing.clear()
            on_power_loss(args.uri, power_config.budget)
        try:
            future.result(timeout=0.5)
        except TimeoutError:
            continue
    future.result()
    if server is not None:
        server.shutdown()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
