"""Pure decisions of PMEM replication (C16) beside the actor (:mod:`hvext.ha.replication`): which hosts
replicate a domain, which replicas may claim it after its owner died, what ``ha status`` says about lag.

No I/O here: every input is a value (tests/unit/test_replication_policy.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from typing import Any

#: Seconds between two epoch cuts unless ``[ha] epoch_interval`` says otherwise.
DEFAULT_EPOCH_INTERVAL_S = 1.0
MAX_REPLICAS = 8


def choose_replicas(domain: str, me: str, live_hosts: Iterable[str], n: int) -> list[str]:
    """*n* live hosts other than *me* for *domain*'s replicas, by rendezvous hashing (stable: the same
    hosts as long as they live). ValueError when fewer than *n* others are alive."""
    if not 1 <= n <= MAX_REPLICAS:
        raise ValueError(f"replicas must be 1 to {MAX_REPLICAS}, not {n}")
    others = sorted(set(live_hosts) - {me})
    if len(others) < n:
        raise ValueError(f"{n} replica(s) wanted but only {len(others)} other live host(s): "
                         f"{', '.join(others) or 'none'}")
    ranked = sorted(others, key=lambda h: hashlib.sha256(f"{domain}\0{h}".encode()).digest(), reverse=True)
    return ranked[:n]


def claimers(replicas: Collection[str], acked: Mapping[str, int], live_hosts: Iterable[str]) -> set[str]:
    """The live replicas that may claim a replicated domain whose owner died: those holding the newest
    epoch any live replica acknowledged (*acked*: host -> epoch). No ack recorded yet: every live
    replica (they all hold nothing newer than the others). No live replica: nobody (the domain's
    PMEM exists nowhere else; it waits, and ``ha status`` says so)."""
    live = set(live_hosts) & set(replicas)
    if not live:
        return set()
    newest = max((acked.get(h, 0) for h in live), default=0)
    return {h for h in live if acked.get(h, 0) == newest}


def replica_states(replicas: Collection[str], acked: Mapping[str, dict[str, Any]], live_hosts: Iterable[str],
                   local_epoch: int, local_at: float) -> list[dict[str, Any]]:
    """``ha status`` rows per replica: epoch acknowledged, lag in epochs, bytes and seconds, and its state.

    *acked*: host -> {"epoch", "cut_at" (when the owner cut that epoch), "pending_bytes", "error"?};
    *local_epoch* and *local_at*: the owner's last epoch written locally and when it was cut (Unix time)."""
    live = set(live_hosts)
    rows = []
    for host in sorted(replicas):
        ack = acked.get(host, {})
        epoch = int(ack.get("epoch", 0) or 0)
        behind = max(0, local_epoch - epoch)
        if host not in live:
            state = "dead (host lease gone): protection continues with the others"
        elif ack.get("error"):
            state = f"unreachable: {str(ack['error'])[:120]}"
        elif local_epoch == 0:
            state = "waiting for the first epoch"
        elif behind == 0:
            state = "in sync"
        else:
            state = "behind"
        rows.append({"host": host, "acked_epoch": epoch, "lag_epochs": behind,
                     "lag_bytes": int(ack.get("pending_bytes", 0) or 0),
                     # how much older the replica's newest epoch is than the owner's (None: nothing acked)
                     "lag_seconds": 0.0 if not behind else
                     round(max(0.0, local_at - float(ack["cut_at"])), 3) if ack.get("cut_at") else None,
                     "state": state})
    return rows
