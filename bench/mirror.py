"""Benchmark: memory mirroring's overhead (C19): a guest workload's throughput with its RAM mirrored at a
100 ms and a 1 s interval vs not mirrored, same guest, same run, case order rotated per repetition.

The guest's RAM is hvext's RAM file (hvext.memory.ramfile: /dev/shm/hvext). A mirrored case starts the
mirror (``hvext.ha.mirror.start``: dirty log on, first full copy, not measured), runs hvextd's mirror loop
(``hvext.daemon.mirror_loop.run``, on this process's event loop as in hvextd) during the measurement, and
stops the mirror afterwards. The mirror's records and copy live in a temporary directory, so a running
hvextd does not sync them as well. Two guest workloads, each counting its own operations after a warm-up:

* ``writes``: one byte written to each 4 KiB page of a working set in turn, in a loop: every operation
  dirties a page, the worst case for a dirty-page mirror (the whole working set is copied every interval);
* ``compute``: SHA-256 of a 1 MiB buffer whose first bytes change each time: mostly CPU, 1 MiB written.

The anchor is kMemvisor's reported overhead, 30% on average and 55% at worst; the goal is at most 15%
(>= 0.85x of unmirrored throughput) at the 1 s interval. Ratios are paired per repetition (same minute).
A case that fails is a row saying why; the exit status is 1 when one did.

    .venv/bin/python bench/mirror.py [--quick | --smoke] [--reps N] [--window S] [--wss-mib N] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plot  # noqa: E402  (bench/plot.py, beside this script)
from migrate import spread  # noqa: E402  (bench/migrate.py's min/median/max column)
from hugepages import cpu_seconds  # noqa: E402  (bench/hugepages.py: utime + stime of a process)

from hvext import aio, image  # noqa: E402
from hvext.daemon import mirror_loop  # noqa: E402
from hvext.ha import mirror  # noqa: E402
from hvext.host import Domain, DomainSpec, Host  # noqa: E402
from hvext.memory import ramfile, swap  # noqa: E402

CASES = ("none", "1000ms", "100ms")
INTERVALS = {"1000ms": 1000, "100ms": 100}
WORKLOADS = ("writes", "compute")
GOAL = 0.85
WARMUP_S = 2.0
PROGRAM = r'''
import hashlib, json, sys, time
workload, wss, window, warmup = sys.argv[1], int(sys.argv[2]) << 20, float(sys.argv[3]), float(sys.argv[4])
P = 4096
if workload == "writes":
    buf = bytearray(wss)
    pages = wss // P
    def step(i):
        for k in range(1024):
            buf[((i + k) % pages) * P] = k & 255
        return 1024
else:
    buf = bytearray(1 << 20)
    def step(i):
        buf[0:8] = i.to_bytes(8, "little")
        buf[-32:] = hashlib.sha256(buf).digest()
        return 1
ops, i = 0, 0
start = time.monotonic()
measuring = None
while True:
    now = time.monotonic()
    if measuring is None and now - start >= warmup:
        measuring, ops = now, 0
    if measuring is not None and now - measuring >= window:
        break
    n = step(i)
    i += n
    ops += n
print(json.dumps({"ops": ops, "seconds": time.monotonic() - measuring}))
'''


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_workload(domain: Domain, workload: str, wss_mib: int, window: float) -> dict[str, float]:
    """The guest workload's operations per second over *window* s (after its warm-up); the QEMU process's CPU
    share (CPU seconds per second, over the whole run) and this process's (the mirror's syncs)."""
    pid = swap.qemu_pid(domain.name)
    wall0, qemu0, own0 = time.monotonic(), cpu_seconds(pid), own_cpu()
    async def go() -> Any:
        async with domain.agent(timeout=window + WARMUP_S + 120) as agent:
            return await agent.exec(["python3", "-c", PROGRAM, workload, str(wss_mib), str(window), str(WARMUP_S)],
                                     timeout=window + WARMUP_S + 90)
    result = aio.run(go())
    if result.exitcode != 0:
        raise RuntimeError(f"guest workload failed: {result.stderr[-200:]}")
    wall = time.monotonic() - wall0
    qemu_share, own_share = (cpu_seconds(pid) - qemu0) / wall, (own_cpu() - own0) / wall
    out = json.loads(result.stdout.strip().splitlines()[-1])
    ops_s = out["ops"] / out["seconds"]
    return {"ops_s": ops_s, "qemu_cpu": qemu_share, "sync_cpu": own_share, "wall_s": wall,
            "ops_per_qemu_cpu_s": ops_s / qemu_share if qemu_share else 0.0}


def run_case(domain: Domain, case: str, workload: str, wss_mib: int, window: float) -> dict[str, Any]:
    if case == "none":
        return {"case": case, "workload": workload} | run_workload(domain, workload, wss_mib, window)
    mirror.start(domain.host, domain.name, [], INTERVALS[case])
    try:
        stopping: asyncio.Event | None = None

        async def start_loop() -> asyncio.Future[None]:
            nonlocal stopping
            stopping = asyncio.Event()
            return asyncio.ensure_future(mirror_loop.run(domain.host, stopping))
        task = aio.run(start_loop())
        before = mirror._load(domain.uuid())
        try:
            measured = run_workload(domain, workload, wss_mib, window)
        finally:
            async def stop_loop() -> None:
                assert stopping is not None
                stopping.set()
                await task
            aio.run(stop_loop())
        after = mirror._load(domain.uuid())
        assert before is not None and after is not None
        if after.state != "active":
            raise RuntimeError(f"the mirror stopped: {after.error}")
        syncs = after.syncs - before.syncs
        pages = after.pages_copied - before.pages_copied
        return {"case": case, "workload": workload, **measured, "syncs": syncs,
                "pages_per_sync": pages / syncs if syncs else 0.0, "syncs_s": syncs / measured["wall_s"],
                "mib_copied_s": pages * 4096 / (1 << 20) / measured["wall_s"]}
    finally:
        mirror.stop(domain.host, domain.name)


class Guest:
    """The benchmark's RAM-file guest (512 MiB), removed with its RAM file at the end."""

    def __init__(self, host: Host) -> None:
        self.domain = host.define(DomainSpec(f"hvext-bench-mirror-{os.getpid()}", memory_mib=512))
        self.ram: ramfile.RamFile | None = None
        try:
            self.ram = ramfile.convert(self.domain)
            self.domain.start()
            aio.run(self.domain.wait_agent(300))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.domain.is_active():
            self.domain.destroy()
        self.domain.undefine()
        if self.ram is not None:
            ramfile.remove(self.ram)
            try:  # its directory, /dev/shm/hvext/<domain>, if now empty
                self.ram.path.parent.rmdir()
            except OSError:
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 8 s")
    parser.add_argument("--smoke", action="store_true", help="1 repetition of 3 s, the writes workload only (tests)")
    parser.add_argument("--reps", type=int, help="repetitions per case (default 5; --quick 3; --smoke 1)")
    parser.add_argument("--window", type=float, help="seconds measured per case and repetition (default 15)")
    parser.add_argument("--wss-mib", type=int, default=None, help="working set of the writes workload (default 64)")
    plot.add_option(parser)
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.smoke else 3 if args.quick else 5)
    window = args.window or (3.0 if args.smoke else 8.0 if args.quick else 15.0)
    wss = args.wss_mib or (16 if args.smoke else 64)
    workloads = WORKLOADS[:1] if args.smoke else WORKLOADS
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hvext-bench-mirror-") as scratch:
        root = Path(scratch) / "mirror"
        mirror.mirror_root = lambda: root  # the bench's own mirrors: a running hvextd does not sync them too
        guest: Guest | None = None
        try:
            os.environ.setdefault("HVEXT_IMAGE", str(image.build().directory))
            with Host() as host:
                guest = Guest(host)
                try:
                    for rep in range(reps):
                        for workload in workloads:
                            order = CASES[rep % 3:] + CASES[:rep % 3]  # rotate: drift hits every case alike
                            for case in order:
                                try:
                                    rows.append(run_case(guest.domain, case, workload, wss, window) | {"rep": rep})
                                except Exception as err:  # noqa: BLE001  a failed case is a row
                                    rows.append({"case": case, "workload": workload, "rep": rep,
                                                 "error": f"{type(err).__name__}: {err}"[:160]})
                                print(rows[-1], flush=True)
                finally:
                    guest.close()
        except Exception as err:  # noqa: BLE001  no image, no libvirt, the guest failed: the cases left are rows
            done = {(r["case"], r["workload"], r["rep"]) for r in rows}
            rows += [{"case": c, "workload": w, "rep": rep, "error": f"not run: {type(err).__name__}: {err}"[:160]}
                     for rep in range(reps) for w in workloads for c in CASES if (c, w, rep) not in done]
    report(rows, workloads, reps, window, wss)
    plot_ratios(args.plot_dir, rows, workloads, wss)
    return 1 if any("error" in r for r in rows) else 0


def ratios(rows: list[dict[str, Any]], workload: str, case: str, key: str = "ops_s") -> list[float]:
    """Per repetition: the mirrored case's *key* / the unmirrored one's (paired, same repetition)."""
    by = {(r["case"], r["rep"]): r[key] for r in rows if r["workload"] == workload and "error" not in r}
    return [by[(case, rep)] / by[("none", rep)] for (c, rep) in by if c == case and by.get(("none", rep))]


def report(rows: list[dict[str, Any]], workloads: tuple[str, ...], reps: int, window: float, wss: int) -> None:
    print(f"\nguest 512 MiB (RAM file in /dev/shm), whole RAM mirrored on this host; {reps} x {window:g} s per case, "
          f"order rotated; writes: one byte per page over {wss} MiB; compute: SHA-256 of 1 MiB")
    print("| workload | case | reps | ops/s min/median/max | ratio to none min/median/max | ops per QEMU CPU s, "
          "ratio | QEMU CPU | sync CPU | syncs/s | pages/sync | MiB copied/s | goal (1 s: >= 0.85x) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for workload in workloads:
        for case in CASES:
            good = [r for r in rows if r["workload"] == workload and r["case"] == case and "error" not in r]
            for r in rows:
                if r["workload"] == workload and r["case"] == case and "error" in r:
                    print(f"| {workload} | {case} | rep {r['rep']} | error: {r['error']} | | | | | | | | |")
            if not good:
                continue
            paired = ratios(rows, workload, case) if case != "none" else [1.0] * len(good)
            per_cpu = ratios(rows, workload, case, "ops_per_qemu_cpu_s") if case != "none" else [1.0] * len(good)
            goal = "" if case != "1000ms" else ("met" if paired and statistics.median(paired) >= GOAL else "MISSED")
            mirrored = case != "none"
            print(f"| {workload} | {case} | {len(good)} | {spread([r['ops_s'] for r in good], '{:.0f}')} | "
                  f"{spread(paired, '{:.3f}')}x | {spread(per_cpu, '{:.3f}')}x | "
                  f"{spread([r['qemu_cpu'] for r in good], '{:.2f}')} | {spread([r['sync_cpu'] for r in good], '{:.2f}')} | "
                  f"{spread([r['syncs_s'] for r in good], '{:.1f}') if mirrored else '-'} | "
                  f"{spread([r['pages_per_sync'] for r in good], '{:.0f}') if mirrored else '-'} | "
                  f"{spread([r['mib_copied_s'] for r in good], '{:.1f}') if mirrored else '-'} | {goal} |")
    print("anchor: kMemvisor 0.70x average, 0.45x worst (30% / 55% overhead); goal >= 0.85x at 1 s (median "
          "of the paired ratios); CPU columns: CPU seconds per second of the QEMU process and of the mirror's "
          "syncs (this process) -- on a shared host the ratio per QEMU CPU second is the steadier one")


def plot_ratios(directory: Path, rows: list[dict[str, Any]], workloads: tuple[str, ...], wss: int) -> None:
    panels = []
    for workload in workloads:
        panel = plot.Panel(f"{workload}: throughput mirrored / not", "repetition", "ratio")
        for case in CASES[1:]:
            by = {(r["case"], r["rep"]): r["ops_s"] for r in rows if r["workload"] == workload and "error" not in r}
            panel.series[f"mirror {case}"] = [(float(rep), by[(case, rep)] / by[("none", rep)])
                                               for (c, rep) in sorted(by) if c == case and by.get(("none", rep))]
        panel.series["goal 0.85x"] = [(0.0, GOAL), (float(max([r["rep"] for r in rows] or [0])), GOAL)]
        panel.notes += [f"{r['case']} rep {r['rep']}: {r['error']}" for r in rows
                        if r["workload"] == workload and "error" in r]
        panels.append(panel)
    plot.lines(directory, "mirror", f"Memory mirroring overhead (writes over {wss} MiB; compute)", panels)


if __name__ == "__main__":
    sys.exit(main())
