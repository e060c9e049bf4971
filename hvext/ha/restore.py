"""Restore a claimed domain's PMEM before it starts on the claimer (docs/ha.md, C13 and C16).

hvextd's HA loop (:mod:`hvext.daemon.ha_loop`) calls :func:`restore_pmem` after it won a protected
domain and before it defines and starts it there. The protection record's ``pmem`` field says how
the PMEM is protected; :data:`MODES` maps its ``mode`` to the function that restores it, imported
only when needed:

* ``"shared-store"`` (C13): :func:`hvext.ha.shared_store.restore_from_shared_store`, from the
  power-loss stores in a directory every host reaches;
* ``"replicas"`` (C16): :func:`hvext.ha.replication.restore_from_replica`, from this host's replica.

Each is called as ``fn(record, host_name, uri=..., final=...)`` (*final*: the owner's
``/hvext/final/<domain>`` record, or None) and returns a :class:`RestoreReport`. A restore that
fails yields a report with ``ok`` False: the loop then records it in ``/hvext/failover/<domain>``,
logs it and does **not** start the domain (never silently with empty or stale PMEM). After a
successful start, :func:`after_start` lets the mode protect the domain on its new host (a mode
module's optional ``after_start(record, host_name, uri, client)``) and removes the consumed final
record.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hvext.errors import DomainNotFound, HvextError
from hvext.ha.client import FAILOVER_PREFIX, FINAL_PREFIX, Client, Protection
from hvext.host import Host

log = logging.getLogger(__name__)

#: pmem protection mode -> (module, function) that restores it on the claimer.
MODES: dict[str, tuple[str, str]] = {
    "shared-store": ("hvext.ha.shared_store", "restore_from_shared_store"),
    "replicas": ("hvext.ha.replication", "restore_from_replica"),
}


@dataclass(frozen=True)
class RestoreReport:
    """What a claimer did about a domain's PMEM before starting it.

    *performed*: PMEM was written here (False: restart only, or nothing to restore: the domain runs
    here, or its home re-adopted it with its own newer files). *complete*: the owner's final record
    was present and the restored copy is at least as new (RPO 0); False: the last copy there was,
    writes after it are lost; None: not applicable. *generation* (C13: device backing -> store
    generation) or *epoch* (C16) says what was restored.
    """

    domain: str
    host: str
    mode: str | None
    ok: bool
    performed: bool
    action: str
    generation: dict[str, int] | None = None
    epoch: int | None = None
    complete: bool | None = None
    final_host: str | None = None
    error: str | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def failover_record(self, at: float | None = None) -> dict[str, Any]:
        """``/hvext/failover/<domain>``: {"host", "restored_generation"|"restored_epoch"|"error", "at", ...}."""
        record: dict[str, Any] = {"host": self.host, "mode": self.mode, "at": round(time.time() if at is None
                                                                                  else at, 3)}
        if not self.ok:
            record["error"] = self.error or "restore failed"
        else:
            if self.generation is not None:
                record["restored_generation"] = self.generation
            if self.epoch is not None:
                record["restored_epoch"] = self.epoch
            record["action"] = self.action
        record.update(complete=self.complete, final_host=self.final_host, seconds=self.seconds)
        return record


def failed(record: Protection, host_name: str, mode: str | None, error: str) -> RestoreReport:
    return RestoreReport(record.domain, host_name, mode, ok=False, performed=False, action="not restored",
                         error=error)


def _function(mode: str) -> Callable[..., RestoreReport]:
    """The restore function of *mode*; HvextError when hvext has none (unknown mode, module missing)."""
    if mode not in MODES:
        raise HvextError(f"unknown pmem protection mode {mode!r:.40} (known: {', '.join(sorted(MODES))})")
    module_name, name = MODES[mode]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise HvextError(f"pmem protection mode {mode!r} is not available in this hvext ({err})") from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise HvextError(f"pmem protection mode {mode!r}: {module_name}.{name} is missing")
    return fn  # type: ignore[no-any-return]


def restore_pmem(record: Protection, host_name: str, *, uri: str | None = None,
                 client: Client | None = None) -> RestoreReport:
    """Restore *record*'s PMEM on this host (*host_name*, libvirt *uri*) as its mode says (blocking).

    Never raises: a failure, whatever it is, is a report with ``ok`` False (the caller must not start
    the domain then). *client* reads the owner's final record (None: not read)."""
    pmem = record.pmem
    if pmem is None:
        return RestoreReport(record.domain, host_name, None, ok=True, performed=False, action="restart only")
    mode = pmem.get("mode")
    started = time.perf_counter()
    try:
        if _runs_here(record.domain, uri):  # e.g. its home adopting it after `ha protect`: its PMEM is live
            return _timed(RestoreReport(record.domain, host_name, str(mode), ok=True, performed=False,
                                        action="kept (the domain runs on this host)"), started)
        fn = _function(str(mode))
        final = client.record(FINAL_PREFIX, record.domain) if client is not None else None
        report = fn(record, host_name, uri=uri, final=final)
        if not isinstance(report, RestoreReport):
            raise HvextError(f"pmem protection mode {mode!r} returned {type(report).__name__}, not a RestoreReport")
    except (HvextError, OSError) as err:
        return _timed(failed(record, host_name, str(mode), str(err)), started)
    except Exception as err:  # a bug in a mode must not start the domain with unknown PMEM
        log.exception("restoring the pmem of %s failed unexpectedly", record.domain)
        return _timed(failed(record, host_name, str(mode), f"unexpected {type(err).__name__}: {err}"), started)
    return report


def _runs_here(domain: str, uri: str | None) -> bool:
    """Whether *domain* is active on this host's libvirtd (its PMEM files are then the newest copy)."""
    with Host(uri) as host:
        try:
            return host.lookup(domain).is_active()
        except DomainNotFound:
            return False


def _timed(report: RestoreReport, started: float) -> RestoreReport:
    return RestoreReport(**{**report.to_dict(), "seconds": round(time.perf_counter() - started, 4)})


def record_failover(client: Client, report: RestoreReport) -> None:
    """Store the report as ``/hvext/failover/<domain>`` and log it (HAError when etcd refuses)."""
    client.put_record(FAILOVER_PREFIX, report.domain, report.failover_record())
    if not report.ok:
        log.error("protected domain %s: pmem not restored on this host, so it is not started: %s",
                  report.domain, report.error)
    else:
        log.warning("protected domain %s: pmem %s (%s)%s", report.domain, report.action,
                    report.generation if report.generation is not None else report.epoch,
                    "" if report.complete else "; no final save of the previous owner was recorded: "
                                               "writes after the restored copy are lost")


def after_start(record: Protection, host_name: str, uri: str | None, client: Client) -> None:
    """After the claimed domain started here: let its mode protect it on this host, and drop the final
    record just consumed (a later failover needs a newer one). Blocking; raises HvextError."""
    mode = (record.pmem or {}).get("mode")
    if mode not in MODES:
        return
    client.delete_record(FINAL_PREFIX, record.domain)  # consumed: the domain runs with it
    module = importlib.import_module(MODES[str(mode)][0])
    hook = getattr(module, "after_start", None)
    if callable(hook):
        hook(record, host_name, uri, client)
