"""An hvext.rvm workload with a checkable model, run inside a guest (or on the host).

``run DIR`` commits transactions forever: transaction *i* writes *i* into the
first 8 bytes of the segment and fills a few ranges chosen by a seeded RNG.
Every third commit is no_flush; after each flush commit, *i* goes to the
progress file (all of 1..i are then durable). ``check DIR`` opens the log
(crash recovery), reads the counter *j* and compares the whole segment with
the model after *j* transactions: the prefix property of issue C20.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

from hvext import rvm

SEGMENT_SIZE = 1 << 20
LOG_SIZE = 256 << 10  # small, so automatic truncation runs often


def ranges(seed: int, i: int) -> list[tuple[int, int, int]]:
    """(offset, length, fill byte) of transaction *i*."""
    rng = random.Random(seed * 1_000_003 + i)
    return [(rng.randrange(8, SEGMENT_SIZE - 512), rng.randrange(1, 512), (i * 7 + k) % 256)
            for k in range(rng.randrange(1, 9))]


def apply(buffer: bytearray | memoryview, seed: int, i: int) -> None:
    buffer[0:8] = i.to_bytes(8, "little")
    for offset, length, fill in ranges(seed, i):
        buffer[offset:offset + length] = bytes([fill]) * length


def run(directory: str, seed: int, progress: str, count: int) -> None:
    log = os.path.join(directory, "rvm.log")
    if not os.path.exists(log):
        rvm.create_log(log, LOG_SIZE)
    with rvm.RVM(log) as r:
        region = r.map(os.path.join(directory, "rvm.seg"), SEGMENT_SIZE)
        start = int.from_bytes(region[0:8], "little") + 1
        progress_fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for i in range(start, start + count if count else sys.maxsize):
            flush = i % 3 != 0
            tid = r.begin_transaction(restore=False)
            r.set_range(tid, region, 0, 8)
            for offset, length, _ in ranges(seed, i):
                r.set_range(tid, region, offset, length)
            apply(memoryview(region), seed, i)
            r.end_transaction(tid, flush=flush)
            if flush:
                os.pwrite(progress_fd, f"{i:20d}\n".encode(), 0)


def check(directory: str, seed: int) -> dict[str, object]:
    with rvm.RVM(os.path.join(directory, "rvm.log")) as r:
        region = r.map(os.path.join(directory, "rvm.seg"), SEGMENT_SIZE)
        recovered = int.from_bytes(region[0:8], "little")
        model = bytearray(SEGMENT_SIZE)
        for i in range(1, recovered + 1):
            apply(model, seed, i)
        mismatch = next((k for k in range(0, SEGMENT_SIZE, 4096) if region[k:k + 4096] != model[k:k + 4096]), None)
    return {"recovered": recovered, "ok": mismatch is None, "first_bad_page": mismatch}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m hvext_agent.rvm_workload")
    parser.add_argument("action", choices=["run", "check"])
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--progress", default="/run/rvm-progress")
    parser.add_argument("--count", type=int, default=0, help="transactions to run (0: until killed)")
    args = parser.parse_args(argv)
    if args.action == "run":
        run(args.directory, args.seed, args.progress, args.count)
    else:
        print(json.dumps(check(args.directory, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
