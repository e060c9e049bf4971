#!/usr/bin/env python3
"""Purge time of the two NVMRegion strategies as the number of snapshots grows.

Every run uses the same data: fill BLOCKS blocks, take S snapshots of that
state, overwrite OVERWRITE blocks (spread over the region) in the running
point, then time ``purge()``.  So every run moves the same OVERWRITE
non-active blocks to mass storage; only the number of snapshots holding them
changes.  Pointer-elimination visits every L1 entry of every snapshot and
rewrites S entries per moved block; virtblocks rewrites one virtblock entry
per moved block, whatever S is.

    python bench/purge.py            # under a minute on 2 cores
    python bench/purge.py --quick    # about a second
    python bench/purge.py --smoke    # one small case of each strategy (tests)

A cell that fails is a row saying why; the exit status is then 1.
Besides the tables it draws bench/out/purge.png (``--plot-dir``, see
bench/plot.py): purge time against the number of snapshots, a line per strategy.

The NVM tier goes to /dev/shm (tmpfs, like a pmem device: no I/O wait) and
the mass tier to /var/tmp (disk) unless --nvm-dir / --mass-dir say otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import plot  # bench/plot.py, beside this script

try:
    from hvext.pmem.region import STRATEGIES, NVMRegion
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hvext.pmem.region import STRATEGIES, NVMRegion


def default_nvm_base() -> str:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


def one_run(
    strategy: str, snapshots: int, blocks: int, overwrite: int, bs: int, nvm_base: str, mass_base: str, data: bytes
) -> dict:
    """Build the scenario in fresh directories and time one purge."""
    nvm = tempfile.mkdtemp(prefix="hvext-purge-nvm-", dir=nvm_base)
    mass = tempfile.mkdtemp(prefix="hvext-purge-mass-", dir=mass_base)
    try:
        with NVMRegion.create(nvm, mass, blocks * bs, block_size=bs, strategy=strategy) as reg:
            reg.write(0, data)
            for i in range(snapshots):
                reg.snapshot(f"s{i}")
            stride = blocks // overwrite
            fresh = b"\xa5" * bs
            for j in range(overwrite):
                reg.write(j * stride * bs, fresh)
            result = reg.purge()
            stats = reg.stats()
            # Sanity: only active blocks stay on NVM, snapshots read back intact.
            if stats["nvm_blocks"] != blocks or stats["mass_blocks"] != overwrite:
                raise RuntimeError(f"unexpected stats after purge: {stats}")
            if reg.read_snapshot(f"s{snapshots - 1}", 0, bs) != data[:bs]:
                raise RuntimeError("snapshot data wrong after purge")
            return result
    finally:
        shutil.rmtree(nvm, ignore_errors=True)
        shutil.rmtree(mass, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller region, one repetition")
    parser.add_argument("--smoke", action="store_true", help="256 blocks, 1 snapshot, one repetition (tests)")
    parser.add_argument("--snapshots", default="1,4,16,64", help="snapshot counts (default 1,4,16,64)")
    parser.add_argument("--blocks", type=int, help="region size in blocks (default 16384, quick 1024)")
    parser.add_argument("--overwrite", type=int, help="blocks overwritten after the snapshots (default blocks/4)")
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, help="runs per cell, median reported (default 5, quick 1)")
    parser.add_argument("--nvm-dir", default=default_nvm_base(), help="where NVM tiers go (default /dev/shm)")
    parser.add_argument("--mass-dir", default="/var/tmp", help="where mass tiers go (default /var/tmp)")
    plot.add_option(parser)
    args = parser.parse_args(argv)

    blocks = args.blocks or (256 if args.smoke else 1024 if args.quick else 16384)
    overwrite = args.overwrite or blocks // 4
    repeat = args.repeat or (1 if args.quick or args.smoke else 5)
    counts = [1] if args.smoke else [int(x) for x in args.snapshots.split(",")]
    if not 0 < overwrite <= blocks or min(counts) < 1:
        parser.error("need 0 < overwrite <= blocks and snapshot counts >= 1")
    bs = args.block_size
    data = random.Random(1).randbytes(blocks * bs)

    print(
        f"purge benchmark: {blocks} blocks of {bs} B ({blocks * bs // 1024} KiB), {overwrite} blocks overwritten"
        f" after the snapshots, median of {repeat}; NVM tier in {args.nvm_dir}, mass tier in {args.mass_dir}"
    )
    started = time.perf_counter()
    rows: dict[tuple[int, str], dict] = {}
    for snaps in counts:
        for strategy in STRATEGIES:  # side by side: same data, same run
            try:
                runs = [
                    one_run(strategy, snaps, blocks, overwrite, bs, args.nvm_dir, args.mass_dir, data)
                    for _ in range(repeat)
                ]
            except Exception as err:  # noqa: BLE001  a failed cell is a row, never a traceback
                rows[(snaps, strategy)] = {"error": f"{type(err).__name__}: {err}"[:100]}
                continue
            best = dict(runs[0])
            best["seconds"] = statistics.median(r["seconds"] for r in runs)
            rows[(snaps, strategy)] = best

    header = f"{'snapshots':>9}  {'strategy':<19}  {'purge ms':>9}  {'scanned':>8}  {'rewritten':>9}  {'moved':>6}"
    print()
    print(header)
    print("-" * len(header))
    for snaps in counts:
        for strategy in STRATEGIES:
            r = rows[(snaps, strategy)]
            if "error" in r:
                print(f"{snaps:>9}  {strategy:<19}  error: {r['error']}")
                continue
            print(
                f"{snaps:>9}  {strategy:<19}  {r['seconds'] * 1000:>9.1f}  {r['entries_scanned']:>8}"
                f"  {r['entries_rewritten']:>9}  {r['blocks_moved']:>6}"
            )

    pe, vb = "pointer-elimination", "virtblocks"
    first = counts[0]
    print()
    print(f"{'snapshots':>9}  {'PE/VB time':>10}  {'PE vs ' + str(first) + ' snap':>14}  {'VB vs ' + str(first) + ' snap':>14}")
    for snaps in counts:
        if any("error" in rows[(n, x)] for n in (snaps, first) for x in (pe, vb)):
            print(f"{snaps:>9}  {'-':>10}  {'-':>14}  {'-':>14}")
            continue
        t_pe, t_vb = rows[(snaps, pe)]["seconds"], rows[(snaps, vb)]["seconds"]
        print(
            f"{snaps:>9}  {t_pe / t_vb:>9.2f}x  {t_pe / rows[(first, pe)]['seconds']:>13.2f}x"
            f"  {t_vb / rows[(first, vb)]['seconds']:>13.2f}x"
        )
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    failed = [f"{snaps} snapshots, {strategy}: {r['error']}" for (snaps, strategy), r in rows.items() if "error" in r]
    panel = plot.Panel(f"{overwrite} of {blocks} blocks moved to mass storage", "snapshots", "purge ms",
                       {s: [(n, rows[(n, s)]["seconds"] * 1000) for n in counts if "error" not in rows[(n, s)]]
                        for s in STRATEGIES}, notes=failed, logx=True, logy=True)
    plot.lines(args.plot_dir, "purge", "NVMRegion purge time vs snapshots", [panel], cols=1, size=(7.0, 4.0))
    return 1 if any("error" in r for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
