"""Deterministic random RVM workload for the crash tests, and its model.

The same seed gives the same operations in the process that runs them (and
is killed) and in the test that checks the recovered state, so the test can
compute the state after every prefix of the committed transactions.

Progress is reported as lines on a file descriptor (written with one
``os.write`` each, so a kill never leaves half a line that matters):
``S<k>`` before commit number k starts, ``D<k>`` when it returned, and
``F<k>`` when commits 0..k-1 are known durable (a flushed commit, ``flush()``
or ``truncate()`` returned).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Iterator

from hvext import rvm

# (segment file, offset in the segment, length): two disjoint ranges of one
# segment and one range of another.
REGIONS = [("a.seg", 0, 32 * 1024), ("a.seg", 40 * 1024, 24 * 1024), ("b.seg", 4096, 16 * 1024)]
LOG_SIZE = 128 * 1024  # small, so the ring wraps and truncation runs often


@dataclass
class Op:
    kind: str  # commit | abort | truncate | flush
    restore: bool = True
    flush: bool = False
    writes: list = field(default_factory=list)  # [(region index, offset, bytes)]


def ops(seed: int) -> Iterator[Op]:
    """The endless operation sequence of a seed."""
    rng = random.Random(seed)
    while True:
        x = rng.random()
        if x < 0.05:
            yield Op("truncate")
            continue
        if x < 0.10:
            yield Op("flush")
            continue
        kind = "abort" if x < 0.22 else "commit"
        restore = kind == "abort" or rng.random() < 0.8
        writes = []
        for _ in range(rng.choice((1, 1, 2, 3, 5, 8))):
            ri = rng.randrange(len(REGIONS))
            length = REGIONS[ri][2]
            n = rng.randint(1, 20 * 1024) if rng.random() < 0.04 else rng.randint(1, 2048)
            n = min(n, length)
            off = rng.randrange(length - n + 1)
            writes.append((ri, off, rng.randbytes(n)))
        yield Op(kind, restore, rng.random() < 0.3, writes)


def map_regions(r: rvm.RVM, directory: str) -> list:
    return [r.map(os.path.join(directory, name), length, offset) for name, offset, length in REGIONS]


def read_state(log: str, directory: str, **options) -> list[bytes]:
    """Open the RVM (running recovery) and return the mapped contents."""
    with rvm.RVM(log, **options) as r:
        return [bytes(region) for region in map_regions(r, directory)]


def run(r: rvm.RVM, regions: list, seed: int, report) -> None:
    """Run the seed's operations on r until an exception stops it."""
    commits = 0
    for op in ops(seed):
        if op.kind == "truncate":
            r.truncate()
            report(b"F%d\n" % commits)
            continue
        if op.kind == "flush":
            r.flush()
            report(b"F%d\n" % commits)
            continue
        tid = r.begin_transaction(restore=op.restore)
        before = [bytes(region) for region in regions] if op.kind == "abort" else None
        for ri, off, data in op.writes:
            r.set_range(tid, regions[ri], off, len(data))[:] = data
        if op.kind == "abort":
            r.abort_transaction(tid)
            if [bytes(region) for region in regions] != before:
                raise AssertionError("abort did not restore the old values")
            continue
        report(b"S%d\n" % commits)
        r.end_transaction(tid, flush=op.flush)
        commits += 1
        report(b"D%d\n" % commits)
        if op.flush:
            report(b"F%d\n" % commits)


def parse_progress(text: str) -> tuple[int, int, int]:
    """(started, returned, durable): commit counts from the progress lines.

    ``started`` counts commits whose end_transaction began, ``returned`` those
    that returned, ``durable`` those known durable.
    """
    started = returned = durable = 0
    for line in text.splitlines():
        if not line or line[0] not in "SDF" or not line[1:].isdigit():
            continue
        n = int(line[1:])
        if line[0] == "S":
            started = max(started, n + 1)
        elif line[0] == "D":
            returned = max(returned, n)
        else:
            durable = max(durable, n)
    return started, returned, durable


def find_prefix(base: list[bytes], seed: int, actual: list[bytes], lo: int, hi: int) -> int | None:
    """The k in [lo, hi] such that actual == state after the first k commits of seed, or None."""
    state = [bytearray(b) for b in base]
    k = 0
    if lo == 0 and [bytes(s) for s in state] == actual:
        return 0
    if k >= hi:
        return None
    for op in ops(seed):
        if op.kind != "commit":
            continue
        for ri, off, data in op.writes:
            state[ri][off : off + len(data)] = data
        k += 1
        if k >= lo and all(s == a for s, a in zip(state, actual)):
            return k
        if k >= hi:
            return None
    return None  # pragma: no cover - ops() is endless
