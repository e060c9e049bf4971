"""hvextd's memory mirroring loop (C19): sync every active mirror (hvext.ha.mirror) at its interval.

Mirrors are registered by ``hvext ha mirror DOMAIN`` (records in ``STATE_DIR/mirror``); the loop reads
them each round and takes those of its own libvirt host (host UUID; the lab's hosts share one file system), so a new or stopped mirror takes effect without a reload. Each mirror is synced when
its interval has passed since its previous sync was due (fixed rate; a round that overruns makes the
next one due at once). A mirror whose sync fails is logged and tried at its next interval; one whose
domain stopped or whose copy went missing is marked stopped by the sync and skipped from then on: one
guest never stops the mirroring of another. A mirror busy with a CLI sync or a repair is skipped this
round (its lock is tried, never waited for, on the shared loop).
"""

from __future__ import annotations

import asyncio
import logging
import time

from hvext.errors import HvextError
from hvext.ha import mirror
from hvext.host import Host

log = logging.getLogger("hvextd.mirror")

#: Seconds between looks at the registry when no mirror is due sooner.
IDLE_S = 1.0


async def run(host: Host, stopping: asyncio.Event, *, idle_s: float = IDLE_S) -> None:
    """Sync rounds until *stopping* is set."""
    due: dict[str, float] = {}
    own = await asyncio.to_thread(lambda: host.host_uuid)
    while not stopping.is_set():
        now = time.monotonic()
        try:
            active = [r for r in await asyncio.to_thread(mirror.records) if r.state == "active" and r.host_uuid == own]
        except HvextError as err:
            log.error("cannot read the mirror records: %s", err)
            active = []
        for gone in set(due) - {r.uuid for r in active}:
            del due[gone]
        for record in active:
            if due.get(record.uuid, 0.0) > now:
                continue
            due[record.uuid] = max(due.get(record.uuid, now) + record.interval_ms / 1000, now)
            try:
                await mirror.sync_record(host, record.uuid, wait=0)
            except mirror.MirrorStopped as err:
                log.error("%s", err)
            except HvextError as err:
                log.warning("mirror of %s: sync failed: %s", record.domain, err)
            except Exception:
                log.exception("mirror of %s: sync failed unexpectedly", record.domain)
        wake = min([now + idle_s, *due.values()])
        try:
            await asyncio.wait_for(stopping.wait(), max(0.0, wake - time.monotonic()))
        except asyncio.TimeoutError:
            pass
