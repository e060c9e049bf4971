"""hvextd's volatile-state loop: keep each baselined domain's dirty set since its baseline current (C18),
and each standby copy refreshed (C17, :func:`hvext.ha.standby.sync` every ``--sync-interval``).

``hvext ha baseline DOMAIN --dir DIR`` registers a domain on this host (state in
``STATE_DIR/ha/volatile/<host id>``); the loop reads the states each round, refreshes a domain's dirty
set every ``refresh_s`` (its next dirty list added, :func:`hvext.ha.volatile.refresh`) and takes a new
baseline every ``baseline_s`` when that is set (:func:`hvext.ha.volatile.due`). A failure is logged and
tried again at the next round; one domain never stops another's refreshes. A domain busy with a CLI
baseline or a hand-over is skipped this round (its lock is tried, never waited for).
"""

from __future__ import annotations

import asyncio
import logging
import time

from hvext.errors import HvextError
from hvext.ha import standby, volatile, volatile_policy
from hvext.host import Host

log = logging.getLogger("hvextd.volatile")

#: Seconds between looks at the states when nothing is due sooner.
IDLE_S = 0.25


def _round(host: Host) -> None:
    now = time.time()
    for state in volatile.states(host.host_id):
        action = volatile.due(state, now)
        try:
            if action == "refresh":
                volatile.refresh(host, state.domain, wait=0)
            elif action == "baseline":
                volatile.take_baseline(host, state.domain, state.dir, state.source_host or "unknown")
        except volatile_policy.Busy:
            continue  # a CLI baseline or a hand-over holds it: the next round
        except HvextError as err:
            log.warning("baseline of %s: %s failed: %s", state.domain, action, err)
        except Exception:
            log.exception("baseline of %s: %s failed unexpectedly", state.domain, action)
    for record in standby.records(host.host_id):
        if not standby.due(record, time.time()):
            continue
        try:
            standby.sync(host, record.domain, wait=0)
        except volatile_policy.Busy:
            continue
        except HvextError as err:
            log.warning("standby copy of %s: %s", record.domain, err)
        except Exception:
            log.exception("standby copy of %s: refresh failed unexpectedly", record.domain)


async def run(host: Host, stopping: asyncio.Event, *, idle_s: float = IDLE_S) -> None:
    """Refresh rounds until *stopping* is set."""
    while not stopping.is_set():
        try:
            await asyncio.to_thread(_round, host)
        except HvextError as err:
            log.error("cannot read the baseline states: %s", err)
        try:
            await asyncio.wait_for(stopping.wait(), idle_s)
        except asyncio.TimeoutError:
            pass
