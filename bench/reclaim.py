"""Benchmark: reclaim 40 % of a guest's memory by a MOM-like balloon policy, host swap and auto, in three states.

States: mostly free memory (the workload's working set is small and the rest
was touched and freed), mostly clean page cache (a large file was read), mostly
hot anonymous memory (the workload's working set fills most of RAM). In each, a
key-value workload (hvext_agent.kv) runs in the guest, and each method is asked
to take 40 % of the guest's RAM back:

* ``mom``: the baseline, a balloon-only controller with oVirt MOM's rules
  (``hvext.memory.policy.mom_step``: act while the host is below 20 % free,
  keep 20 % of the guest free, move at most 5 % per interval), one step every
  MOM_INTERVAL_S seconds. The host here is not short of memory, so the benchmark
  says it is (below 20 % free) until the guest's balloon has given the 40 %, and
  lets the controller hold from then on.
* ``swap``: host swapping only (``hvext reclaim --method swap``).
* ``auto``: hvext's policy (``hvext reclaim``, the default).
* ``balloon`` (only with ``--methods``): hvext's balloon at once, to the target.

What is measured over a fixed window from the start of the reclaim does not
depend on how fast the shared host schedules the guest: the **major faults**
the workload paid for (the guest's own, /proc/vmstat ``pgmajfault``: pages it
had to read back from its disk; plus the **host swap-ins**: guest pages the
host had paged out and the guest touched again, i.e. the fall of the ``Swap``
of QEMU's guest-RAM mapping in /proc/PID/smaps from its peak in the window;
QEMU's own ``majflt`` misses most of them, as pages just paged out on a host
with free memory stay in the swap cache and come back as minor faults), the
**memory still out** at the end of the window (the drop of the ``Rss`` of
that mapping: pages faulted back count against it; TCG's buffers and the rest
of QEMU do not), and the guest's **memory stall**
(/proc/pressure/memory ``some`` total: time the guest spent in reclaim, e.g.
dropping its cache for the balloon; shown, not deciding: it is wall time, and
host swap-ins are invisible to it). The workload's ops over the window, as a
ratio to its rate just before, is shown too, but it swings with the host's
load. The fault counts do not, as long as the workload touches its whole
working set within the window (the column "wss touched" estimates how much
of it it did): then what it faults back is the part of its working set that
was taken, whatever its rate. Each
case runs ``--reps`` times (repetitions interleaved, so a load change
hits every method alike); the table gives the median and [min, max].

Verdict per state (the issue's goal): auto is "not worse" than a baseline when
its median faults are at most 5 % (plus FAULT_FLOOR pages) above the
baseline's and its median memory still out is at least 95 % of the
baseline's; "ahead" when, beyond those margins, it has fewer faults or more
memory out and no repetition of auto is as bad as one of the baseline's in
that figure (the ranges do not overlap); "trade-off" when it is ahead in one
figure and worse in the other. A failed or refused baseline counts as auto ahead.

Besides the table it draws bench/out/reclaim.png (see bench/plot.py): per
state, the guest RAM resident on the host, the workload's ops/s and the
guest RAM in host swap over time, one line per method (the first repetition), and
writes every repetition's figures to bench/out/reclaim.json.

    .venv/bin/python bench/reclaim.py [--quick | --smoke] [--reps N] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plot  # noqa: E402  (bench/plot.py, beside this script)
from hvext import aio, image  # noqa: E402
from hvext.agent.client import ExecResult  # noqa: E402
from hvext.errors import HvextError, UsageError  # noqa: E402
from hvext.host import Domain, DomainSpec, Host  # noqa: E402
from hvext.memory import balloon, policy, reclaim, swap  # noqa: E402
from hvext.units import KIB, MIB  # noqa: E402

STATUS = "/run/hvext-kv.json"
STATUS_LOG = "/run/hvext-kv.log"  # the status, appended once a second: the ops/s over time
RSS_POLL_S = 0.5
MOM_INTERVAL_S = 2.0  # MOM's default policy interval is 10 s; shorter here so that 40 % fits the window
RECLAIM_FRACTION = 0.4
FAULT_FLOOR = 256  # pages (1 MiB): below this a difference in faults is not a difference
STATES = ("free", "cache", "hot")
METHODS = ("mom", "swap", "auto")
ALL_METHODS = (*METHODS, "balloon")


def guest(domain: Domain, command: str, timeout: float = 300) -> str:
    async def run() -> ExecResult:
        async with domain.agent(timeout=timeout + 10) as agent:
            return await agent.exec(["sh", "-c", command], timeout=timeout)
    result = aio.run(run())
    if result.exitcode != 0:
        raise RuntimeError(f"guest command failed: {command}: {result.stderr}")
    return result.stdout


def host_majflt(pid: int) -> int:
    """Major faults of process *pid* (all its threads), from /proc/PID/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as err:
        raise HvextError(f"process {pid} vanished: {err}") from err
    return int(stat.rpartition(")")[2].split()[9])  # field 12; the fields after the name start at 3 (state)


@dataclass(frozen=True)
class Counters:
    """The workload's and the guest's counters at one moment, and the QEMU process's."""

    t: float  # guest clock of the workload's last status
    ops: int
    guest_majflt: int
    stall_some_us: int | None  # /proc/pressure/memory "some" total; None without PSI
    stall_full_us: int | None
    host_majflt: int
    ram_rss: int  # resident bytes of the QEMU mapping of guest RAM (not TCG's buffers and the rest)
    ram_swap: int  # bytes of that mapping in host swap


GUEST_COUNTERS = (f"cat {STATUS}; echo; grep '^pgmajfault ' /proc/vmstat; "
                  "cat /proc/pressure/memory 2>/dev/null || true")


def ram(pid: int, ram_bytes: int) -> tuple[int, int]:
    """(resident, swapped) bytes of the QEMU process's guest RAM mapping."""
    mappings = swap.guest_ram_mappings(pid, ram_bytes)
    return sum(m.rss for m in mappings), sum(m.swap for m in mappings)


def counters(domain: Domain, pid: int, ram_bytes: int) -> Counters:
    """Read every counter once (the guest's in one exec)."""
    lines = guest(domain, GUEST_COUNTERS).splitlines()
    status = json.loads(lines[0])
    values: dict[str, int] = {}
    for line in lines[1:]:
        words = line.split()
        if words[:1] == ["pgmajfault"]:
            values["majflt"] = int(words[1])
        elif words[:1] in (["some"], ["full"]):
            values[words[0]] = int(dict(w.split("=", 1) for w in words[1:])["total"])
    return Counters(t=float(status["t"]), ops=int(status["total_ops"]), guest_majflt=values["majflt"],
                    stall_some_us=values.get("some"), stall_full_us=values.get("full"),
                    host_majflt=host_majflt(pid), **dict(zip(("ram_rss", "ram_swap"), ram(pid, ram_bytes))))


#: Touches then frees up to 70 % of RAM, but never more than the guest has available
#: less a margin: a fixed 70 % (358 MiB of a 512 MiB guest) is more than the guest
#: has free after boot, and the guest OOM-killed the preparation.
TOUCH_AND_FREE = """
import sys
info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
avail = int(info["MemAvailable"].split()[0]) << 10
size = max(0, min(int(sys.argv[1]) << 20, avail - (int(sys.argv[2]) << 20)))
b = bytearray(size)
b[::4096] = b"x" * len(b[::4096])
print(size >> 20)
"""
FREE_MARGIN_MIB = 48


def wss_mib(state: str, memory: int) -> int:
    """The kv workload's working set in a guest of *memory* MiB in *state*."""
    return int(memory * 0.6) if state == "hot" else memory // 10


def touched(row: dict[str, Any], memory: int) -> float:
    """The share of the working set the workload can be expected to have touched in the window (uniform random
    accesses: 1 - e^-(ops / entries)). Near 1, the faults it took count every taken page of its working set, so
    they do not depend on how fast the host ran it; well below 1, they undercount by up to that much."""
    ops = row["ops_ratio"] * row["base_ops_s"] * row["window_s"]
    return 1 - math.exp(-ops / (wss_mib(row["state"], memory) * MIB / 4096))


def prepare(domain: Domain, state: str, memory: int) -> None:
    wss = wss_mib(state, memory)
    if state == "free":
        # the margin leaves room for the kv workload's working set that starts next
        freed = int(guest(domain, f"python3 -c '{TOUCH_AND_FREE}' {int(memory * 0.7)} {FREE_MARGIN_MIB}"))
        if freed < memory // 10:
            raise RuntimeError(f"only {freed} MiB of the guest's memory could be touched and freed")
    elif state == "cache":
        guest(domain, f"dd if=/dev/urandom of=/var/tmp/big bs=1M count={int(memory * 0.6)} status=none && "
                      "sync && cat /var/tmp/big > /dev/null")
    guest(domain, f"rm -f {STATUS} {STATUS_LOG}; "
                  f"setsid python3 -m hvext_agent.kv --wss-mib {wss} --status {STATUS} >/dev/null 2>&1 </dev/null &")
    guest(domain, f"setsid sh -c 'while sleep 1; do cat {STATUS} 2>/dev/null && echo; done >> {STATUS_LOG}' "
                  ">/dev/null 2>&1 </dev/null &")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if guest(domain, f"cat {STATUS} 2>/dev/null || true").strip():
            return
        time.sleep(2)
    raise RuntimeError("the kv workload did not start")


class HostSampler(threading.Thread):
    """Every RSS_POLL_S seconds, (host wall time, resident and swapped bytes of guest RAM) of a QEMU process."""

    def __init__(self, pid: int, ram_bytes: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.ram_bytes = ram_bytes
        self.points: list[tuple[float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(RSS_POLL_S):
            try:
                self.points.append((time.time(), *ram(self.pid, self.ram_bytes)))
            except HvextError:  # QEMU gone: the series ends
                return

    def stop(self) -> list[tuple[float, int, int]]:
        self.done.set()
        self.join()
        return self.points


def ops_series(domain: Domain, since: float) -> list[tuple[float, float]]:
    """The workload's logged ops/s as (seconds since host wall time *since*, ops/s).

    The log is stamped with the guest's clock; its offset to the host's is
    measured here (to within the exec's round trip)."""
    sent = time.time()
    guest_now = float(guest(domain, "date +%s.%N"))
    offset = (sent + time.time()) / 2 - guest_now
    points = {}
    for line in guest(domain, f"cat {STATUS_LOG}").splitlines():
        try:
            status = json.loads(line)
            points[float(status["t"])] = float(status["ops_s"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the copy loop
    return [(round(t + offset - since, 2), ops_s) for t, ops_s in sorted(points.items())]


async def guest_free(domain: Domain) -> int:
    """The guest's MemFree in bytes, from its agent (MOM reads the same figure from the balloon driver, 2 s older)."""
    async with domain.agent(timeout=20) as agent:
        value = (await agent.meminfo()).meminfo_kb.get("MemFree")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HvextError(f"the guest sent no usable MemFree ({value!r})")
    return value * KIB


def run_mom(domain: Domain, amount: int, until: float) -> dict[str, Any]:
    """The MOM-like controller, one step per MOM_INTERVAL_S, until monotonic time *until*.

    The host counts as under pressure (below 20 % free) while the balloon has
    given less than *amount*; then the controller holds. Returns when the
    balloon first reached *amount* (seconds from the start, or None), its steps
    and why it stopped moving, if it did."""
    started = time.monotonic()
    maximum = balloon.boot_memory(domain)
    first = aio.run(balloon.read_balloon(domain))[0]
    reached: float | None = None
    steps: list[int] = []
    held = ""
    while time.monotonic() < until:
        tick = time.monotonic()
        actual = aio.run(balloon.read_balloon(domain))[0]
        if first - actual >= amount:
            reached = reached if reached is not None else round(tick - started, 2)
        else:
            target = policy.mom_step(0.10, actual, maximum, aio.run(guest_free(domain)))
            if target is None:
                held = "keeps 20 % of the guest free"
            else:
                try:
                    aio.run(balloon.apply_target(domain, max(target, first - amount)))
                    steps.append(target)
                except UsageError as err:  # hvext's safety floor: the guest cannot give that much
                    held = f"refused: {err}"[:100]
        time.sleep(max(0.0, MOM_INTERVAL_S - (time.monotonic() - tick)))
    return {"seconds": reached, "steps": len(steps), "held": held if reached is None else ""}


def run_case(host: Host, state: str, method: str, memory: int, settle: float, window: float) -> dict[str, Any]:
    name = f"hvext-bench-reclaim-{os.getpid()}"
    domain = host.define(DomainSpec(name, memory_mib=memory))
    amount = int(memory * RECLAIM_FRACTION) * MIB
    try:
        domain.start()
        aio.run(domain.wait_agent(240))
        prepare(domain, state, memory)
        time.sleep(settle)
        pid = swap.qemu_pid(name)
        ram_bytes = balloon.boot_memory(domain)
        sampler = HostSampler(pid, ram_bytes)
        sampler.start()
        sampled_from = time.time()
        try:
            base_start = counters(domain, pid, ram_bytes)
            time.sleep(window / 2)
            start = counters(domain, pid, ram_bytes)
            started, started_wall = time.monotonic(), time.time()
            chosen, notes = method, ""
            if method == "mom":
                mom = run_mom(domain, amount, started + window)
                seconds: float | None = mom["seconds"]
                notes = f"{mom['steps']} steps" + (f"; held: {mom['held']}" if mom["held"] else "")
            else:
                try:
                    report = aio.run(reclaim.reclaim(domain, amount, method))
                except UsageError as err:  # a result, not a failure: e.g. the balloon's safety floor in the hot state
                    return {"state": state, "method": method, "refused": str(err)[:100]}
                seconds, chosen = report.seconds, report.method
                time.sleep(max(0.0, started + window - time.monotonic()))
            end = counters(domain, pid, ram_bytes)
        finally:
            points = sampler.stop()
        # pages that came back from host swap in the window: the most it held then, less what it holds at the end
        # (a guest touching a page the host paged out faults it back in, from the swap cache or the disk)
        peak_swap = max([end.ram_swap, *(s for t, _, s in points if t >= started_wall)])
        swapins = max(0, peak_swap - end.ram_swap) // 4096
        base_rate = (start.ops - base_start.ops) / max(1e-6, start.t - base_start.t)
        rate = (end.ops - start.ops) / max(1e-6, end.t - start.t)
        stall = None if end.stall_some_us is None or start.stall_some_us is None else \
            (end.stall_some_us - start.stall_some_us) / 1000
        return {"state": state, "method": method, "chosen": chosen, "seconds": seconds, "notes": notes,
                "window_s": round(time.monotonic() - started, 1),
                "still_out_mib": (start.ram_rss - end.ram_rss) / MIB,
                "guest_majflt": end.guest_majflt - start.guest_majflt, "host_swapins": swapins,
                "host_majflt": end.host_majflt - start.host_majflt,
                "faults": end.guest_majflt - start.guest_majflt + swapins,
                "base_faults": start.guest_majflt - base_start.guest_majflt,
                "stall_ms": stall, "base_ops_s": base_rate, "ops_ratio": rate / base_rate if base_rate else 0.0,
                "rss_series": [(round(t - started_wall, 2), b / MIB) for t, b, _ in points],
                "swap_series": [(round(t - started_wall, 2), b / MIB) for t, _, b in points],
                "ops_series": [p for p in ops_series(domain, started_wall) if p[0] >= sampled_from - started_wall]}
    finally:
        try:
            if domain.is_active():
                domain.destroy()
            domain.undefine()
        except HvextError:
            pass


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """'median [min, max]' of *values*; one value as itself, none as '-'."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def summarise(rows: list[dict[str, Any]], state: str, method: str) -> dict[str, Any]:
    """The repetitions of one case: counts, and every figure's values (done repetitions only)."""
    mine = [r for r in rows if r["state"] == state and r["method"] == method]
    done = [r for r in mine if "error" not in r and "refused" not in r]
    reached = [r["seconds"] for r in done if r["seconds"] is not None]
    return {"state": state, "method": method, "runs": len(mine), "done": len(done),
            "refused": sum("refused" in r for r in mine), "errors": [r["error"] for r in mine if "error" in r],
            "chosen": sorted({r["chosen"] for r in done}), "reached": len(reached), "seconds": reached,
            **{key: [r[key] for r in done if r[key] is not None]
               for key in ("still_out_mib", "faults", "guest_majflt", "host_swapins", "stall_ms", "ops_ratio")}}


def verdict(auto: dict[str, Any], base: dict[str, Any]) -> tuple[str, str]:
    """('ahead' | 'not worse' | 'worse' | '-', why) of auto against one baseline in one state (see the module doc)."""
    if not auto["done"]:
        return "-", "auto has no result"
    if not base["done"]:
        return "ahead", f"{base['method']} {'refused' if base['refused'] else 'failed'}"
    fa, fb = med(auto["faults"]), med(base["faults"])
    oa, ob = med(auto["still_out_mib"]), med(base["still_out_mib"])
    assert fa is not None and fb is not None and oa is not None and ob is not None
    why = f"faults {fa:.0f} vs {fb:.0f}, still out {oa:.0f} vs {ob:.0f} MiB"
    # ahead: beyond the 5 % (and the floor) on the medians, and no repetition of auto as bad as one of the baseline's
    fewer_faults = fa * 1.05 + FAULT_FLOOR < fb and max(auto["faults"]) < min(base["faults"])
    more_out = oa > ob * 1.05 + 1 and min(auto["still_out_mib"]) > max(base["still_out_mib"])
    if fa > fb * 1.05 + FAULT_FLOOR or oa < ob * 0.95 - 1:
        return ("trade-off" if fewer_faults or more_out else "worse"), why
    return ("ahead" if fewer_faults or more_out else "not worse"), why


def print_table(rows: list[dict[str, Any]], states: list[str], methods: list[str], memory: int, reps: int,
                window: float, argv: list[str]) -> list[dict[str, Any]]:
    """The summary table (markdown), then the verdicts; returns the summaries."""
    print(f"\nguest {memory} MiB, reclaim {RECLAIM_FRACTION:.0%} = {int(memory * RECLAIM_FRACTION)} MiB, "
          f"window {window:.0f} s from the start of the reclaim, {reps} repetition(s) per case; "
          f"median [min, max]; command: bench/reclaim.py {' '.join(argv)}".rstrip())
    print("| state | method | chosen | done | time to target s | still out MiB | major faults | "
          "(guest / host swap-ins) | wss touched | stall ms | ops ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summaries = []
    for state in states:
        for method in methods:
            s = summarise(rows, state, method)
            summaries.append(s)
            if not s["done"]:
                why = "refused" if s["refused"] else f"error: {s['errors'][0] if s['errors'] else '?'}"
                print(f"| {state} | {method} | {why} | 0/{s['runs']} | - | - | - | - | - | - | - |")
                continue
            cover = [100 * touched(r, memory) for r in rows
                     if r["state"] == state and r["method"] == method and "ops_ratio" in r]
            time_s = spread(s["seconds"], "{:.1f}") + (f" ({s['reached']}/{s['done']} reached)"
                                                       if s["reached"] < s["done"] else "")
            print(f"| {state} | {method} | {'/'.join(s['chosen'])} | {s['done']}/{s['runs']} | {time_s} | "
                  f"{spread(s['still_out_mib'])} | {spread(s['faults'])} | "
                  f"{spread(s['guest_majflt'])} / {spread(s['host_swapins'])} | "
                  f"{spread(cover, '{:.0f}%')} | "
                  f"{spread(s['stall_ms'])} | "
                  f"{spread(s['ops_ratio'], '{:.2f}')} |")
    if "auto" in methods:
        print("\nauto against each baseline (faults within 5 % + 256 pages and still out within 5 %: "
              "not worse; better in either beyond that: ahead):")
        words: dict[tuple[str, str], str] = {}
        for state in states:
            auto = next(s for s in summaries if s["state"] == state and s["method"] == "auto")
            for base in (s for s in summaries if s["state"] == state and s["method"] != "auto"):
                word, why = verdict(auto, base)
                words[state, base["method"]] = word
                print(f"  {state:>5} auto vs {base['method']:>7}: {word:>9}  ({why})")
        print(goal(words))
    return summaries


def goal(words: dict[tuple[str, str], str]) -> str:
    """The issue's goal from the verdicts: auto worse than no baseline in any state, and ahead of each in one."""
    behind = sorted(f"{state} vs {base} ({word})" for (state, base), word in words.items()
                    if word in ("worse", "trade-off"))
    bases = dict.fromkeys(base for _, base in words)
    never_ahead = [base for base in bases if not any(w == "ahead" for (_, b), w in words.items() if b == base)]
    if not words:
        return "goal: no baseline ran"
    if not behind and not never_ahead:
        return "goal met: auto is nowhere worse than a baseline and ahead of each in at least one state"
    return ("goal missed: " + "; ".join(([f"auto is behind in {', '.join(behind)}"] if behind else [])
                                         + ([f"never ahead of {', '.join(never_ahead)}"] if never_ahead else [])))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 MiB guests, shorter windows, one repetition")
    parser.add_argument("--smoke", action="store_true", help="one case (free memory, auto), short (tests)")
    parser.add_argument("--case", action="append", metavar="STATE/METHOD",
                        help="run only this case (repeatable), e.g. hot/mom")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(ALL_METHODS)} (default {','.join(METHODS)})")
    parser.add_argument("--reps", type=int, help="repetitions per case (default 3; 1 with --quick or --smoke)")
    parser.add_argument("--window", type=float, help="seconds measured from the start of the reclaim "
                        "(default 30; 12 with --quick, 6 with --smoke)")
    parser.add_argument("--memory", type=int, default=768, help="guest RAM, MiB")
    parser.add_argument("--rows", type=Path, metavar="JSON",
                        help="run nothing: the table, verdicts and plot again from a reclaim.json this wrote")
    plot.add_option(parser)
    args = parser.parse_args(argv)
    if args.rows:
        return reprint(args.rows, args.plot_dir)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or not set(methods) <= set(ALL_METHODS):
        parser.error(f"--methods: use a comma-separated list of {', '.join(ALL_METHODS)}")
    memory = 512 if args.quick or args.smoke else args.memory
    settle = 1.0 if args.smoke else 3.0
    window = args.window or (6.0 if args.smoke else 12.0 if args.quick else 30.0)
    reps = args.reps or (1 if args.quick or args.smoke else 3)
    if reps < 1 or window < 2:
        parser.error("--reps must be at least 1 and --window at least 2 seconds")
    cases = [("free", "auto")] if args.smoke else [(state, method) for state in STATES for method in methods]
    if args.case:
        chosen = [tuple(c.split("/", 1)) for c in args.case]
        if not set(chosen) <= {(s, m) for s in STATES for m in ALL_METHODS}:
            parser.error(f"--case: use STATE/METHOD with STATE in {', '.join(STATES)} "
                         f"and METHOD in {', '.join(ALL_METHODS)}")
        cases = [c for c in ((s, m) for s in STATES for m in ALL_METHODS) if c in chosen]
    runs = [(rep, state, method) for rep in range(reps) for state, method in cases]  # interleaved repetitions
    rows: list[dict[str, Any]] = []
    run = {"memory": memory, "reps": reps, "window": window, "argv": argv}
    try:
        # one image for the whole run, even if the guest files change meanwhile
        os.environ["HVEXT_IMAGE"] = str(image.build().directory)
        with Host() as host:
            for rep, state, method in runs:
                began = time.monotonic()
                try:
                    rows.append(run_case(host, state, method, memory, settle, window))
                except Exception as err:  # noqa: BLE001  a failed case is a row, never a traceback
                    rows.append({"state": state, "method": method, "error": f"{type(err).__name__}: {err}"[:100]})
                rows[-1].update(rep=rep, case_s=round(time.monotonic() - began, 1))
                print({k: v for k, v in rows[-1].items() if not k.endswith("_series")}, flush=True)
                save(args.plot_dir, rows, [], run)  # after each case: an interrupted run keeps what it measured
    except Exception as err:  # noqa: BLE001  no image, no libvirt, ...: every case left is a row saying so
        rows += [{"state": state, "method": method, "rep": rep, "error": f"not run: {type(err).__name__}: {err}"[:100]}
                 for rep, state, method in runs[len(rows):]]
    states = list(dict.fromkeys(s for s, _ in cases))
    summaries = print_table(rows, states, list(dict.fromkeys(m for _, m in cases)), memory, reps, window, argv)
    save(args.plot_dir, rows, summaries, run)
    plot_cases(args.plot_dir, rows, memory)
    return 1 if any("error" in r for r in rows) else 0


def reprint(path: Path, directory: Path) -> int:
    """The table, verdicts and plot of a finished run, from its reclaim.json."""
    try:
        saved = json.loads(path.read_text())
        rows, meta = saved["rows"], saved["run"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"error: {path}: not a reclaim.json of this benchmark ({type(err).__name__}: {err})", file=sys.stderr)
        return 1
    states = list(dict.fromkeys(r["state"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print_table(rows, states, methods, meta["memory"], meta["reps"], meta["window"], meta["argv"])
    plot_cases(directory, rows, meta["memory"])
    return 1 if any("error" in r for r in rows) else 0


def save(directory: Path, rows: list[dict[str, Any]], summaries: list[dict[str, Any]],
         run: dict[str, Any]) -> None:
    """Every repetition's figures and the summaries as JSON beside the plot (a failure is a line on stderr)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "reclaim.json").write_text(json.dumps({"run": run, "rows": rows, "summaries": summaries},
                                                           indent=1))
    except OSError as err:
        print(f"reclaim.json not written: {err}", file=sys.stderr)


def plot_cases(directory: Path, rows: list[dict[str, Any]], memory: int) -> None:
    """Per state, guest RAM resident, the workload's ops/s and guest RAM in swap over time, a line per method (first
    repetition that ran); refused and failed cases are notes."""
    panels = []
    for state in dict.fromkeys(r["state"] for r in rows):
        vline = [(0.0, "reclaim")]
        rss = plot.Panel(f"{state}: guest RAM resident on the host", "seconds since the reclaim started", "MiB",
                         vlines=vline)
        ops_s = plot.Panel(f"{state}: workload", "seconds since the reclaim started", "ops/s", vlines=vline)
        swapped = plot.Panel(f"{state}: guest RAM in host swap", "seconds since the reclaim started", "MiB",
                             vlines=vline)
        for r in (r for r in rows if r["state"] == state):
            label = r["method"]
            if "error" in r or "refused" in r:
                ops_s.notes.append(f"{label} (rep {r.get('rep', 0) + 1}): {'refused' if 'refused' in r else 'error'}"
                                   f": {r.get('error') or r.get('refused')}")
                continue
            if label in rss.series:
                continue
            rss.series[label] = r["rss_series"]
            ops_s.series[label] = r["ops_series"]
            swapped.series[label] = r["swap_series"]
            chose = f" ({r['chosen']})" if r["chosen"] != r["method"] else ""
            end = [p for p in r["rss_series"] if r["seconds"] is not None and p[0] >= r["seconds"]][:1]
            if end:
                rss.marks[label] = [plot.Mark(*end[0], f"done{chose} {r['seconds']:.1f} s")]
        panels += [rss, ops_s, swapped]
    plot.lines(directory, "reclaim", f"Reclaiming 40 % of a {memory} MiB guest: MOM-like balloon, swap, auto",
               panels, cols=3)


if __name__ == "__main__":
    sys.exit(main())
