"""A key-value loop over a working set of known size that measures its own operations per second.

``python3 -m hvext_agent.kv --wss-mib 300 --status /run/hvext-kv.json`` fills a
table of 4 KiB values, then forever reads and updates random entries, writing
``{"ops_s": ..., "total_ops": ..., "t": ...}`` (the last second's rate) to the
status file once a second. Used by bench/reclaim.py to see what reclaim costs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

VALUE = 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m hvext_agent.kv")
    parser.add_argument("--wss-mib", type=int, required=True)
    parser.add_argument("--status", required=True)
    args = parser.parse_args(argv)
    entries = args.wss_mib * (1 << 20) // VALUE
    table = [bytearray(os.urandom(16)) * (VALUE // 16) for _ in range(entries)]
    rng = random.Random(1)
    total = 0
    window_start = time.monotonic()
    window_ops = 0
    while True:
        for _ in range(256):
            value = table[rng.randrange(entries)]
            value[0] = (value[0] + 1) & 0xFF
            value[rng.randrange(VALUE)] ^= value[0]
        window_ops += 256
        now = time.monotonic()
        if now - window_start >= 1.0:
            total += window_ops
            tmp = args.status + ".tmp"
            with open(tmp, "w") as handle:
                json.dump({"ops_s": round(window_ops / (now - window_start)), "total_ops": total, "t": time.time()},
                          handle)
            os.replace(tmp, args.status)
            window_start, window_ops = now, 0


if __name__ == "__main__":
    sys.exit(main())
