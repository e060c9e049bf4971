#!/usr/bin/env python3
"""hvext.rvm against SQLite and LMDB, and the disk's fdatasync limit.

Transactions each change 1, 4 or 16 ranges of 64 B .. 4 KiB at random
offsets of a 64 MiB segment. Every system runs the same pre-generated
transactions in the same directory (so on the same disk), one after the
other for each case:

* fdatasync limit: as many bytes as hvext.rvm's log record of the
  transaction has (header, range table, data, padding), written
  sequentially into a preallocated file and made durable the cheapest way
  the OS offers: one pwritev with RWF_DSYNC where Python and the kernel
  have it (as hvext.rvm's lone committer uses), else pwrite + fdatasync
  (``--limit-sync`` chooses): the physical limit of a durable commit of
  those bytes;
* hvext.rvm: begin / set_range per range / copy the new bytes into the
  region / end_transaction(flush=True|False), restore mode (old values kept),
  a 128 MiB log (``--log-size``) truncated in the background at the default
  fill ratio;
* SQLite (WAL; synchronous=FULL for flush, OFF for no_flush): the segment is
  16384 rows of 4 KiB blobs, each range written with incremental blob I/O;
* LMDB (python ``lmdb``; sync=True / sync=False): 16384 keys of 4 KiB pages,
  each range a read-modify-put of the pages it touches.

Each case runs the systems in interleaved slices (so load drift on a shared
machine hits all of them alike). hvext.rvm is charged the time it waits for
its background truncation after each slice and a final truncation of all it
logged (segment writes + fdatasync); SQLite a final WAL checkpoint. The
"commit path" column is hvext.rvm without those charges.

    python bench/rvm.py            # about 1.5 min
    python bench/rvm.py --quick    # about 30 s

Prints a Markdown table of transactions/s and ratios, and a group-commit line
(``--threads N`` committing threads, flush mode, 4 ranges).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

# Measure the hvext.rvm of the checkout this script is in, not whatever
# hvext is installed (an editable install may point at another worktree).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import plot  # noqa: E402  (bench/plot.py, beside this script)
from hvext import rvm  # noqa: E402
from hvext.units import MIB  # noqa: E402

try:
    import lmdb
except ImportError:  # the table says so
    lmdb = None

SEG_SIZE = 64 << 20
PAGE = 4096
PAGES = SEG_SIZE // PAGE
_fdatasync = getattr(os, "fdatasync", os.fsync)
_RWF_DSYNC = getattr(os, "RWF_DSYNC", 0) if hasattr(os, "pwritev") else 0
LIMIT_SYNCS = ("auto", "dsync", "fdatasync")
RECORD_OVERHEAD = 24  # hvext.rvm record header (docs/rvm.md, log format)
RANGE_ENTRY = 16  # one range table entry


def make_txns(nranges: int, count: int, rng: random.Random) -> list[list[tuple[int, int, int]]]:
    """count transactions of nranges (offset, length, source offset) each."""
    txns = []
    for _ in range(count):
        ranges = []
        for _ in range(nranges):
            n = rng.randint(64, 4096)
            ranges.append((rng.randrange(SEG_SIZE - n), n, rng.randrange(MIB - n)))
        txns.append(ranges)
    return txns


class Meter:
    """Accumulated transactions and seconds of one system in one case."""

    def __init__(self) -> None:
        self.done = 0
        self.seconds = 0.0  # everything: commits, waits for truncation, final settle
        self.commit_seconds = 0.0  # only the loops running transactions
        self.i = 0

    @property
    def rate(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    @property
    def commit_rate(self) -> float:
        return self.done / self.commit_seconds if self.commit_seconds else 0.0


def run_slice(run_one: Callable[[list], None], txns: list, seconds: float, meter: Meter,
              settle: Callable[[], None] | None = None) -> None:
    """Run transactions for about ``seconds``; ``settle`` (timed too) waits for work left running."""
    n = len(txns)
    i = meter.i
    done = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for _ in range(4):
            run_one(txns[i % n])
            i += 1
        done += 4
        now = time.perf_counter()
        if now >= end:
            break
    if settle is not None:
        settle()
    meter.commit_seconds += now - t0
    meter.seconds += time.perf_counter() - t0
    meter.done += done
    meter.i = i


def zero_file(path: Path, size: int) -> None:
    """A fully allocated file of zeros (made durable)."""
    with open(path, "wb") as f:
        chunk = bytes(MIB)
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


class RawSync:
    name = "fdatasync limit"

    def __init__(self, d: Path, src: bytes, sync: str = "auto") -> None:
        self.path = d / "raw.dat"
        zero_file(self.path, SEG_SIZE)
        self.fd = os.open(self.path, os.O_RDWR)
        self.pos = 0
        self.src = memoryview(src)
        if sync == "dsync" and not _RWF_DSYNC:
            raise SystemExit("error: --limit-sync dsync: this Python or OS has no RWF_DSYNC")
        self.dsync = sync == "dsync" or (sync == "auto" and bool(_RWF_DSYNC))
        self.how = "pwritev RWF_DSYNC" if self.dsync else "pwrite + fdatasync"

    def runner(self, flush: bool) -> Callable[[list], None]:
        fd, src, dsync = self.fd, self.src, self.dsync

        def run(ranges: list) -> None:
            # The bytes hvext.rvm's record of this transaction has (header, range
            # table, data, padding to 8): the same bytes per sync.
            n = (RECORD_OVERHEAD + RANGE_ENTRY * len(ranges) + sum(r[1] for r in ranges) + 7) & ~7
            if self.pos + n > SEG_SIZE:
                self.pos = 0
            if dsync:  # one system call: the write is durable when it returns
                os.pwritev(fd, [src[:n]], self.pos, _RWF_DSYNC)
            else:
                os.pwrite(fd, src[:n], self.pos)
                _fdatasync(fd)
            self.pos += n

        return run

    def quiesce(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


class RVMBench:
    name = "hvext.rvm"

    def __init__(self, d: Path, src: bytes, log_size: int) -> None:
        seg = d / "rvm.seg"
        zero_file(seg, SEG_SIZE)
        rvm.create_log(d / "rvm.log", log_size)
        self.r = rvm.RVM(d / "rvm.log")
        self.region = self.r.map(seg, SEG_SIZE)
        self.mv = memoryview(self.region)
        self.src = memoryview(src)

    def runner(self, flush: bool) -> Callable[[list], None]:
        r, region, mv, src = self.r, self.region, self.mv, self.src
        begin, set_range, end = r.begin_transaction, r.set_range, r.end_transaction

        def run(ranges: list) -> None:
            tid = begin()
            for off, n, s in ranges:
                set_range(tid, region, off, n)
                mv[off : off + n] = src[s : s + n]
            end(tid, flush)

        return run

    def quiesce(self) -> None:
        """Wait for a background truncation still running (so it is charged to hvext.rvm)."""
        while self.r.query_options()["truncating"]:
            time.sleep(0.0005)

    def settle(self) -> None:
        """Apply everything logged so far to the segment (charged to hvext.rvm)."""
        self.r.truncate()

    def stats(self) -> dict:
        return self.r.query_options()

    def close(self) -> None:
        self.r.close()


class SQLiteBench:
    name = "SQLite"

    def __init__(self, d: Path, src: bytes) -> None:
        self.db = sqlite3.connect(d / "seg.sqlite", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE seg (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO seg VALUES (?, zeroblob(?))", ((i, PAGE) for i in range(PAGES)))
        self.db.execute("COMMIT")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.src = memoryview(src)

    def runner(self, flush: bool) -> Callable[[list], None]:
        db, src = self.db, self.src
        db.execute(f"PRAGMA synchronous={'FULL' if flush else 'OFF'}")
        execute, blobopen = db.execute, db.blobopen

        def run(ranges: list) -> None:
            execute("BEGIN")
            for off, n, s in ranges:
                while n:
                    page, in_page = divmod(off, PAGE)
                    k = min(n, PAGE - in_page)
                    with blobopen("seg", "data", page) as blob:
                        blob.seek(in_page)
                        blob.write(src[s : s + k])
                    off, n, s = off + k, n - k, s + k
            execute("COMMIT")

        return run

    def quiesce(self) -> None:
        pass

    def settle(self) -> None:
        """Checkpoint the WAL into the database (charged to SQLite)."""
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        self.db.close()


class LMDBBench:
    name = "LMDB"

    def __init__(self, d: Path, src: bytes) -> None:
        self.dir = d
        self.src = bytes(src)
        self.env = None
        self.flush = None
        self._open(True)
        with self.env.begin(write=True) as txn:
            zero = bytes(PAGE)
            for i in range(PAGES):
                txn.put(i.to_bytes(4, "big"), zero)
        self.env.sync(True)

    def _open(self, flush: bool) -> None:
        if self.env is not None and self.flush == flush:
            return
        if self.env is not None:
            self.env.close()
        self.env = lmdb.open(str(self.dir / "lmdb"), map_size=4 * SEG_SIZE, sync=flush, metasync=flush)
        self.flush = flush

    def runner(self, flush: bool) -> Callable[[list], None]:
        self._open(flush)
        begin, src = self.env.begin, self.src

        def run(ranges: list) -> None:
            with begin(write=True) as txn:
                for off, n, s in ranges:
                    while n:
                        page, in_page = divmod(off, PAGE)
                        k = min(n, PAGE - in_page)
                        key = page.to_bytes(4, "big")
                        buf = bytearray(txn.get(key))
                        buf[in_page : in_page + k] = src[s : s + k]
                        txn.put(key, buf)
                        off, n, s = off + k, n - k, s + k

        return run

    def quiesce(self) -> None:
        pass

    def settle(self) -> None:
        pass

    def close(self) -> None:
        self.env.close()


def threaded_run(bench: RVMBench, txns: list, nthreads: int, seconds: float) -> tuple[int, float]:
    """(transactions, seconds) of hvext.rvm flush mode with nthreads committers (group commit)."""
    stop = time.perf_counter() + seconds
    counts = [0] * nthreads
    per = len(txns) // nthreads

    def worker(k: int) -> None:
        run = bench.runner(True)
        mine = txns[k * per : (k + 1) * per]
        # Disjoint parts of the segment per thread: the application's own isolation.
        lo = k * (SEG_SIZE // nthreads)
        i = 0
        while time.perf_counter() < stop:
            ranges = [(lo + off % (SEG_SIZE // nthreads - 4096), n, s) for off, n, s in mine[i % per]]
            run(ranges)
            i += 1
        counts[k] = i

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


def _loadavg() -> str:
    """The machine's load averages (the benchmark shares the machine)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short measurements (about 30 s in all)")
    ap.add_argument("--seconds", type=float, help="measured seconds per system and case")
    ap.add_argument("--dir", default=None, help="directory on the disk to test (default: a temp dir in .)")
    ap.add_argument("--log-size", type=int, default=128 << 20, help="hvext.rvm log size in bytes")
    ap.add_argument("--ranges", default="1,4,16", help="ranges per transaction, comma separated")
    ap.add_argument("--threads", type=int, default=4, help="committer threads for the group-commit row (0: none)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit-sync", choices=LIMIT_SYNCS, default="auto",
                    help="how the limit makes each write durable (auto: RWF_DSYNC if offered, else fdatasync)")
    plot.add_option(ap)
    args = ap.parse_args(argv)
    seconds = args.seconds or (1.0 if args.quick else 3.0)
    rounds = 6 if args.quick else 12  # short interleaved slices: drift hits all systems alike
    warmup = 0.1 if args.quick else 0.3
    base = args.dir or os.getcwd()
    load_start = _loadavg()
    d = Path(tempfile.mkdtemp(prefix="rvm-bench-", dir=base))
    rng = random.Random(args.seed)
    src = rng.randbytes(MIB)
    counts = [int(x) for x in args.ranges.split(",")]
    print(f"# hvext.rvm from {Path(rvm.__file__).parent}; loadavg {_loadavg()}", file=sys.stderr)
    print(f"# setting up in {d} (64 MiB segment, rvm log {args.log_size // MIB} MiB) ...", file=sys.stderr)
    try:
        raw = RawSync(d, src, args.limit_sync)
        rb = RVMBench(d, src, args.log_size)
        sq = SQLiteBench(d, src)
        lm = LMDBBench(d, src) if lmdb is not None else None
        rows = []
        systems = [b for b in (raw, rb, sq, lm) if b is not None]
        for nr in counts:
            txns = make_txns(nr, 4096, rng)
            for flush in (True, False):
                active = [b for b in systems if flush or b is not raw]
                meters = {b.name: Meter() for b in active}
                runners = {b.name: b.runner(flush) for b in active}
                for b in active:  # warm up (and switch modes), then start clean; untimed
                    run_slice(runners[b.name], txns, warmup, Meter(), b.settle)
                before = rb.stats()["truncations"]
                for _round in range(rounds):  # interleaved, so drift hits all alike
                    for b in active:
                        run_slice(runners[b.name], txns, seconds / rounds, meters[b.name], b.quiesce)
                for b in active:  # deferred work (truncation, checkpoint) is charged too
                    t0 = time.perf_counter()
                    b.settle()
                    meters[b.name].seconds += time.perf_counter() - t0
                res: dict[str, float | None] = {name: m.rate for name, m in meters.items()}
                res["rvm commit path"] = meters[rb.name].commit_rate
                res.setdefault("LMDB", None)
                if not flush:
                    res[raw.name] = None
                res["truncations"] = rb.stats()["truncations"] - before
                for name, m in meters.items():
                    print(f"#  {nr:2d} ranges {'flush' if flush else 'no_flush':8s} {name:16s} "
                          f"{m.rate:10,.0f} tx/s  ({m.done} in {m.seconds:.2f} s, "
                          f"{m.commit_seconds:.2f} s committing)", file=sys.stderr)
                rows.append((nr, "flush" if flush else "no_flush", res))
        grp = None
        if args.threads > 1:  # interleaved too: 1 thread, N threads, 1 thread, ...
            rb.settle()
            txns = make_txns(4, 4096, rng)
            single, multi = Meter(), Meter()
            runner = rb.runner(True)
            for _round in range(3):
                run_slice(runner, txns, seconds / 3, single, rb.quiesce)
                done, secs = threaded_run(rb, txns, args.threads, seconds / 3)
                rb.quiesce()
                multi.done += done
                multi.seconds += secs
            rb.settle()
            grp = (args.threads, multi.rate, single.rate)
        for b in (raw, rb, sq, lm):
            if b is not None:
                b.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)

    print()
    print(f"command: python bench/rvm.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"loadavg at the start: {load_start}, at the end: {_loadavg()}")
    print(f"limit: {raw.how} per transaction")
    print()
    print("| ranges | mode | fdatasync limit | hvext.rvm | (commit path) | SQLite | LMDB "
          "| limit/rvm | limit/commit path | rvm/SQLite | rvm/LMDB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for nr, mode, res in rows:
        lim = res.get("fdatasync limit")
        rv, cp = res["hvext.rvm"], res["rvm commit path"]
        print(
            f"| {nr} | {mode} | {fmt(lim) if lim else '-'} | {fmt(rv)} | {fmt(cp)} | {fmt(res['SQLite'])} | "
            f"{fmt(res['LMDB'])} | {ratio(lim, rv) if lim else '-'} | {ratio(lim, cp) if lim else '-'} | "
            f"{ratio(rv, res['SQLite'])} | {ratio(rv, res['LMDB'])} |"
        )
    print()
    print("transactions/s; each case runs the systems in interleaved slices. hvext.rvm is charged its")
    print("waits for background truncation and a final truncation of all it logged (segment writes and")
    print("fdatasync), SQLite a final WAL checkpoint; '(commit path)' is hvext.rvm without those, i.e.")
    print("what committers see while truncation keeps up in the background.")
    print("Goals: limit/rvm <= 1.25 in flush mode, rvm/SQLite > 1 in no_flush mode.")
    print("hvext.rvm truncations: "
          + ", ".join(f"{nr} ranges {mode}: {res.get('truncations', 0)}" for nr, mode, res in rows))
    if grp:
        n, rate, single = grp
        print(f"group commit: hvext.rvm flush mode, 4 ranges, {n} threads: {rate:,.0f} tx/s "
              f"(1 thread: {single:,.0f} tx/s, {rate / single:.2f}x)")
    plot.lines(args.plot_dir, "rvm", "hvext.rvm, SQLite and LMDB: transactions/s vs ranges per transaction",
               [plot.Panel(mode, "ranges per transaction", "transactions/s",
                           {name: [(nr, res.get(name)) for nr, m, res in rows if m == mode]
                            for name in ("fdatasync limit", "hvext.rvm", "rvm commit path", "SQLite", "LMDB")},
                           logx=True, logy=True) for mode in ("flush", "no_flush")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
