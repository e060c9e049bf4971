"""Benchmark: large-page priority (C5) on a guest whose hot set is smaller than its RAM.

A swap-based reclaim (or any pageout) leaves a guest's memory to come back as
4 KiB pages: the 2 MiB regions QEMU had mapped large are split. Which of them
become large again, and when, is khugepaged's business (its own order, 4096
pages every 10 s by default) unless hvext collapses the hottest first
(``hvext hugepages DOMAIN --apply --budget N``: decaying scores from the dirty
page lists, ``MADV_COLLAPSE`` through ``process_madvise``). Per repetition, on
one guest running a random-access workload over a hot set:

1. ``4 KiB (khugepaged)``: page the guest's RAM out, let the workload fault its
   hot set back in, measure (khugepaged runs as it always does);
2. ``priority``: ``hvext hugepages --apply`` with a budget of the hot set's
   regions, measure;
3. ``all large``: collapse every region of guest RAM, measure (the upper bound).

The metric is the workload's operations per second of the QEMU process's own
CPU time (utime + stime from ``/proc/PID/stat``): it does not depend on how
much CPU a shared host gives the guest; plain ops/s is shown beside it. Each
case reports ``AnonHugePages`` of the QEMU process while it was measured. A
case that fails is a row saying why; the exit status is 1 when one did.

    .venv/bin/python bench/hugepages.py [--quick | --smoke] [--repetitions N] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plot  # noqa: E402  (bench/plot.py, beside this script)
from hvext import aio, image  # noqa: E402
from hvext.agent.client import ExecResult  # noqa: E402
from hvext.errors import HvextError  # noqa: E402
from hvext.host import Domain, DomainSpec, Host  # noqa: E402
from hvext.memory import hugepages, swap  # noqa: E402
from hvext.memory.sharing_policy import REGION_SIZE  # noqa: E402
from hvext.units import MIB  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STATUS = "/run/hvext-hotset.json"
CASES = ("4 KiB (khugepaged)", "priority", "all large")
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: The guest workload: touch a cold set once and keep it, then forever write one byte at a random
#: offset of a random 4 KiB page of the hot set (reading another), and publish the running total.
WORKLOAD = """
import json, os, random, sys, time
hot, cold = int(sys.argv[1]) << 20, int(sys.argv[2]) << 20
c = bytearray(cold)
c[::4096] = b"c" * len(c[::4096])
b = bytearray(hot)
b[::4096] = b"h" * len(b[::4096])
pages = hot // 4096
rnd = random.Random(1).randrange
total = 0
while True:
    for _ in range(20000):
        off = rnd(pages) << 12
        b[off + 100] = b[off + 2000] ^ 1
    total += 20000
    with open(sys.argv[3] + ".tmp", "w") as f:
        json.dump({"t": time.monotonic(), "total": total}, f)
    os.replace(sys.argv[3] + ".tmp", sys.argv[3])
"""


def guest(domain: Domain, argv: list[str], timeout: float = 120, stdin: str = "") -> str:
    async def run() -> ExecResult:
        async with domain.agent(timeout=timeout + 10) as agent:
            return await agent.exec(argv, timeout=timeout, stdin=stdin)
    result = aio.run(run())
    if result.exitcode != 0:
        raise RuntimeError(f"guest command failed: {argv}: {result.stderr.strip()[-200:]}")
    return result.stdout


def start_workload(domain: Domain, hot_mib: int, cold_mib: int) -> None:
    guest(domain, ["sh", "-c", "cat > /run/hvext-hotset.py"], stdin=WORKLOAD)
    guest(domain, ["sh", "-c", f"setsid python3 /run/hvext-hotset.py {hot_mib} {cold_mib} {STATUS} "
                               ">/run/hvext-hotset.log 2>&1 </dev/null &"])
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if guest(domain, ["sh", "-c", f"cat {STATUS} 2>/dev/null || true"]).strip():
            return
        time.sleep(1)
    raise RuntimeError("the workload did not start: " + guest(domain, ["cat", "/run/hvext-hotset.log"])[-200:])


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole QEMU process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def measure(domain: Domain, pid: int, ram: hugepages.GuestRAM, seconds: float) -> dict[str, float]:
    """The workload's ops per QEMU CPU second and per second over *seconds*, and AnonHugePages (MiB)."""
    first, cpu0 = json.loads(guest(domain, ["cat", STATUS])), cpu_seconds(pid)
    huge0 = hugepages.anon_huge_bytes(pid, ram.start)
    time.sleep(seconds)
    last, cpu1 = json.loads(guest(domain, ["cat", STATUS])), cpu_seconds(pid)
    huge1 = hugepages.anon_huge_bytes(pid, ram.start)
    done = last["total"] - first["total"]
    if done <= 0 or cpu1 <= cpu0:
        raise RuntimeError(f"the workload made no progress in {seconds:g} s")
    return {"ops_cpu_s": done / (cpu1 - cpu0), "ops_s": done / max(1e-6, last["t"] - first["t"]),
            "huge_mib_start": huge0 / MIB, "huge_mib_end": huge1 / MIB}


def prioritise(name: str, budget: int) -> dict[str, Any]:
    """``hvext hugepages NAME --apply --budget N --json``: what a user runs."""
    done = subprocess.run([sys.executable, "-m", "hvext.cli.main", "hugepages", name, "--apply", "--budget",
                           str(budget), "--intervals", "3", "--json"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "hvext hugepages failed")
    return json.loads(done.stdout)["applied"]


def repetition(domain: Domain, ram: hugepages.GuestRAM, budget: int, window: float, settle: float,
               rows: list[dict[str, Any]], rep: int) -> None:
    """One pass through the three cases; each case's row is appended (a failed case is a row saying why)."""
    def case(label: str, prepare: Any) -> bool:
        try:
            extra = prepare() or {}
            rows.append({"case": label, "rep": rep, **measure(domain, ram.pid, ram, window), **extra})
            return True
        except Exception as err:  # noqa: BLE001  a failed case is a row, never a traceback
            rows.append({"case": label, "rep": rep, "error": f"{type(err).__name__}: {err}"[:120]})
            return False

    def split() -> dict[str, Any]:
        result = swap.page_out(ram.pid, ram.ram_bytes, ram.ram_bytes)
        time.sleep(settle)  # the workload faults its hot set back in: 4 KiB pages
        return {"paged_out_mib": (result.rss_before - result.rss_after) / MIB}

    def priority() -> dict[str, Any]:
        applied = prioritise(domain.name, budget)
        return {"collapsed": len(applied["collapsed"]), "chosen": len(applied["collapse"])}

    def everything() -> dict[str, Any]:
        errors = hugepages.collapse(ram.pid, [ram.start + i * REGION_SIZE for i in range(ram.regions)])
        return {"collapsed": sum(e is None for e in errors), "chosen": len(errors)}

    if case(CASES[0], split):
        case(CASES[1], priority)
        case(CASES[2], everything)


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case: repetitions, median and range of ops per CPU second, ratio of medians to the 4 KiB case."""
    out = []
    base = None
    for label in CASES:
        good = [r for r in rows if r["case"] == label and "error" not in r]
        errors = [r["error"] for r in rows if r["case"] == label and "error" in r]
        if not good:
            out.append({"case": label, "error": errors[0] if errors else "not run"})
            continue
        eff = [r["ops_cpu_s"] for r in good]
        med = statistics.median(eff)
        if label == CASES[0]:
            base = med
        out.append({"case": label, "n": len(good), "failed": len(errors), "median": med, "min": min(eff),
                    "max": max(eff), "ops_s": statistics.median(r["ops_s"] for r in good),
                    "huge_mib": statistics.median((r["huge_mib_start"] + r["huge_mib_end"]) / 2 for r in good),
                    "ratio": med / base if base else None})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller guest, one repetition, short windows")
    parser.add_argument("--smoke", action="store_true", help="as --quick, shorter still (tests)")
    parser.add_argument("--repetitions", type=int, help="passes through the three cases (default 5; quick 1)")
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM, MiB (default 1024)")
    plot.add_option(parser)
    args = parser.parse_args(argv)
    small = args.quick or args.smoke
    memory = 768 if small else args.memory
    hot, cold = (64, 192) if small else (memory * 3 // 16, memory * 3 // 8)
    window = 3.0 if args.smoke else 6.0 if args.quick else 15.0
    settle = 2.0 if small else 5.0
    reps = args.repetitions or (1 if small else 5)
    if reps < 1:
        parser.error("--repetitions must be at least 1")
    budget = hot * MIB // REGION_SIZE
    name = f"hvext-bench-hugepages-{os.getpid()}"
    rows: list[dict[str, Any]] = []
    try:
        os.environ["HVEXT_IMAGE"] = str(image.build().directory)  # one image for the whole run
        with Host() as host:
            domain = host.define(DomainSpec(name, memory_mib=memory))
            try:
                domain.start()
                aio.run(domain.wait_agent(240))
                start_workload(domain, hot, cold)
                ram = hugepages.GuestRAM(name, swap.qemu_pid(name), memory * MIB)
                time.sleep(settle)
                for rep in range(reps):
                    repetition(domain, ram, budget, window, settle, rows, rep)
                    print(rows[-1], flush=True)
            finally:
                try:
                    if domain.is_active():
                        domain.destroy()
                    domain.undefine()
                except HvextError:
                    pass
    except Exception as err:  # noqa: BLE001  no image, no libvirt, ...: the cases not run are rows saying so
        rows.append({"case": CASES[0], "rep": len(rows), "error": f"not run: {type(err).__name__}: {err}"[:120]})
    table = summary(rows)
    print(f"\nguest {memory} MiB, hot set {hot} MiB (budget {budget} regions of 2 MiB), cold set {cold} MiB; "
          f"{reps} repetition(s), {window:g} s windows; ops/CPU-s = workload ops per second of QEMU's CPU time "
          "(median, range); ratio = median over the 4 KiB case's, same run")
    print(f"{'case':>20} {'n':>3} {'ops/CPU-s':>10} {'range':>17} {'ratio':>6} {'ops/s':>8} {'AnonHuge MiB':>13}")
    for r in table:
        if "error" in r:
            print(f"{r['case']:>20}  error: {r['error']}")
            continue
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        print(f"{r['case']:>20} {r['n']:>3} {r['median']:10.0f} {r['min']:8.0f}-{r['max']:<8.0f} {ratio:>6} "
              f"{r['ops_s']:8.0f} {r['huge_mib']:13.0f}" + (f"  ({r['failed']} failed)" if r["failed"] else ""))
    for r in rows:
        if "error" in r:
            print(f"rep {r['rep']} {r['case']}: error: {r['error']}")
    bars = {r["case"]: {"ops per CPU second (thousands)": r["median"] / 1000} for r in table if "error" not in r}
    plot.stacked_bars(args.plot_dir, "hugepages", f"Large-page priority: a {hot} MiB hot set in a {memory} MiB guest",
                      bars, ["ops per CPU second (thousands)"], xlabel="workload ops per QEMU CPU second, thousands",
                      notes=[f"{r['case']}: {r['error']}" for r in table if "error" in r])
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
