"""Benchmark: plain vs auto live migration for guests dirtying memory at 0 %, 50 % and 200 % of the link.

Runs on a 2-host lab (`hvext lab`), with the migration bandwidth capped so the
200 % case exists on one machine. One guest is booted and migrated back and
forth; before each migration the agent's stress workload is set to the case's
dirty rate. Each case runs --runs times (interleaved plain/auto); the table
shows min/median/max over the runs of total time, downtime and total time /
(RAM / bandwidth), the physical limit, each ratio computed in its own run, plus
how many runs converged (within --timeout) and switched to post-copy.

    .venv/bin/python bench/migrate.py [--quick] [--bandwidth 32] [--timeout 120] [--runs 3]
        [--cases 0,0.5,2] [--policies plain,auto] [--samples FILE] [--plot-dir DIR]

Besides the table it draws bench/out/migrate.png (see bench/plot.py): the RAM
still to send over time, one panel per dirty rate, one line per policy and run,
each ending at the downtime (marked with its length), the switch to post-copy
or the abort.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plot  # noqa: E402  (bench/plot.py, beside this script)

from hvext import aio, image  # noqa: E402
from hvext.errors import HvextError  # noqa: E402
from hvext.host import Domain, DomainSpec, Host  # noqa: E402
from hvext.lab import Lab  # noqa: E402
from hvext.migrate import orchestrate  # noqa: E402
from hvext.migrate.policy import Progress  # noqa: E402
from hvext.units import KIB, MIB  # noqa: E402


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """min/median/max of *values* (one value as itself, none as '-')."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return "/".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def link_rate(samples: list[dict]) -> float | None:
    """The link's rate in this run, MiB/s: the median of libvirt's sending rate while data moved."""
    rates = [s["bps"] / MIB for s in samples if s["bps"] > 0]
    return statistics.median(rates) if rates else None


def summarize(runs: list[dict]) -> dict[str, str]:
    """One table row from the runs of one case and policy."""
    done = [r for r in runs if r["converged"]]
    switched = sum(1 for r in done if r["postcopy"])
    notes = sorted({r["note"] for r in runs if r["note"]})
    if switched:
        notes.insert(0, f"post-copy in {switched}/{len(done)}")
    return {"converged": f"{len(done)}/{len(runs)}",
            "total": spread([r["total_s"] for r in done]),
            "wall": spread([r["wall_s"] for r in done]),
            "downtime": spread([r["downtime_ms"] for r in done if r["downtime_ms"] is not None], "{:.0f}"),
            "sent": spread([r["sent_mib"] for r in done if r["sent_mib"] is not None], "{:.0f}"),
            "link": spread([r["link_mib_s"] for r in done], "{:.1f}"),
            "ratio": spread([r["ratio"] for r in done], "{:.2f}x"),
            "note": "; ".join(notes)}


def working_set_mib(domain: Domain, memory_mib: int) -> int:
    """The workload's working set: 60 % of the guest's memory, at most 40 % of the memory its kernel
    sees (MemTotal, smaller than the domain's memory): a small guest's workload must fit beside its
    kernel, agent and page cache (the agent refuses more than 80 %; near that a 256 MiB guest
    swaps or OOM-kills the workload)."""
    seen_kib = domain.balloon_stats().get("available")
    wanted = int(memory_mib * 0.6)
    return min(wanted, int(seen_kib * KIB / MIB * 0.4)) if seen_kib else wanted


async def set_stress(domain: Domain, rate_mib: float, wss_mib: int) -> None:
    """Run the case's workload, returning once it dirties at its pace.

    The workload first writes its whole working set once; a dirty rate
    measured meanwhile (auto's plan) would see that burst, not the case.
    """
    async with domain.agent(timeout=30) as agent:  # a guest under its own workload answers slowly
        await agent.stress_stop()
        if rate_mib > 0:
            await agent.stress_start(rate_mib, wss_mib)
            deadline = time.monotonic() + 120
            while (status := await agent.stress_status()).elapsed_s is None:  # none before the pacing starts
                if not status.running:
                    raise HvextError(f"the stress workload ({wss_mib} MiB) exited before it started pacing")
                if time.monotonic() > deadline:
                    raise HvextError("the stress workload did not start within 120 s")
                await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB guest, a 60 s timeout, one run per case")
    parser.add_argument("--smoke", action="store_true", help="one case (0 %%, auto) as in --quick (tests)")
    parser.add_argument("--bandwidth", type=int, default=32, help="migration bandwidth cap, MiB/s")
    parser.add_argument("--timeout", type=float, default=120.0, help="converged = done within this")
    parser.add_argument("--memory", type=int, default=512, help="guest RAM, MiB")
    parser.add_argument("--runs", type=int, help="runs per case (default 3, 1 with --quick)")
    parser.add_argument("--cases", default="0,0.5,2", help="dirty rates as fractions of the bandwidth")
    parser.add_argument("--policies", default="plain,auto", help="policies to compare")
    parser.add_argument("--samples", help="write every run's result and progress samples here (JSON)")
    plot.add_option(parser)
    args = parser.parse_args(argv)
    short = args.quick or args.smoke
    memory = 256 if short else args.memory
    timeout = 60.0 if short else args.timeout
    runs = args.runs or (1 if short else 3)
    fractions = [0.0] if args.smoke else [float(f) for f in args.cases.split(",")]
    policies = ["auto"] if args.smoke else args.policies.split(",")
    limit_s = memory / args.bandwidth
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    name = f"hvext-bench-migrate-{os.getpid()}"
    rows: list[dict] = []
    errors = 0
    existing, lab, hosts = None, None, []
    try:
        # one image for the whole run, even if the guest files change meanwhile
        os.environ["HVEXT_IMAGE"] = str(image.build().directory)
        existing = Lab.load()
        lab = Lab.up(2)
        hosts = [Host(h.uri_unix) for h in lab.hosts]
        uris = [h.uri_tls for h in lab.hosts]
        domain = hosts[0].define(DomainSpec(name, memory_mib=memory))
        domain.start()
        aio.run(domain.wait_agent(240))
        wss = working_set_mib(domain, memory)
        where = 0
        for fraction in fractions:
            for run in range(runs):
                for policy in policies:
                    rate = fraction * args.bandwidth
                    aio.run(set_stress(domain, rate, wss))
                    time.sleep(3)
                    started = time.monotonic()
                    row = _row(fraction, policy, run)
                    progress = row["progress"]

                    def record(sample: Progress, phase: str) -> None:  # called while this run's job runs
                        if sample.iteration or sample.remaining:  # not the job's set-up (remaining 0)
                            progress.append((round(sample.elapsed_s, 2), sample.remaining, phase))
                    try:
                        result = aio.run(orchestrate.migrate(domain, uris[1 - where], policy=policy,
                                                             bandwidth_mib=args.bandwidth, timeout_s=timeout,
                                                             on_progress=record))
                        where = 1 - where
                        domain = hosts[where].lookup(name)
                        link = link_rate(result.samples) or args.bandwidth
                        row.update(converged=True, postcopy=bool(result.postcopy_switch), total_s=result.total_s,
                                   downtime_ms=result.downtime_ms, sent_mib=(result.bytes_sent or 0) / MIB,
                                   link_mib_s=link, ratio=result.total_s / (memory / link),
                                   wall_s=time.monotonic() - started,
                                   ratio_cap=result.total_s / limit_s, result=result.to_dict())
                    except HvextError as err:
                        row.update(total_s=time.monotonic() - started,
                                   note=f"aborted at {timeout:.0f} s, the source kept running"
                                   if "did not converge" in str(err) else str(err)[:80])
                        domain = hosts[where].lookup(name)
                    rows.append(row)
                    print({k: v for k, v in row.items() if k not in ("result", "progress")}, flush=True)
    except Exception as err:  # noqa: BLE001  no lab, no guest, ...: the cases not run are rows saying why
        errors += 1
        done = {(r["fraction"], r["policy"], r["run"]) for r in rows}
        for fraction in fractions:
            for run in range(runs):
                for policy in policies:
                    if (fraction, policy, run + 1) not in done:
                        rows.append(_row(fraction, policy, run, f"not run: {type(err).__name__}: {err}"[:100]))
    finally:
        for host in hosts:
            try:
                dom = host.lookup(name)
                if dom.is_active():
                    dom.destroy()
                dom.undefine()
            except HvextError:
                pass
            host.close()
        if lab is not None and existing is None:
            try:
                lab.down()
            except HvextError as err:
                print(f"lab down failed: {err}", file=sys.stderr)
                errors += 1
    if args.samples:
        Path(args.samples).write_text(json.dumps(rows, indent=1))
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    print(f"\nguest {memory} MiB, bandwidth cap {args.bandwidth} MiB/s, physical limit RAM/bandwidth "
          f"{limit_s:.1f} s, converged = done within {timeout:.0f} s, {runs} run(s) per case, "
          f"values min/median/max over converged runs; load average {' '.join(load_before)} before, "
          f"{' '.join(load_after)} after")
    print("total/limit: total time / (RAM / the link's median sending rate in the same run)")
    print("total: the migration job (with libvirt's set-up); wall: the whole call, with auto's dirty-rate "
          "measurement before the job")
    print(f"{'dirty/bw':>8} {'policy':>6} {'conv':>5} {'total s':>16} {'wall s':>16} {'downtime ms':>13} "
          f"{'sent MiB':>13} {'link MiB/s':>16} {'total/limit':>17}  note")
    for fraction in fractions:
        for policy in policies:
            case = [r for r in rows if r["fraction"] == fraction and r["policy"] == policy]
            if not case:
                continue
            row = summarize(case)
            print(f"{fraction:>8.0%} {policy:>6} {row['converged']:>5} {row['total']:>16} {row['wall']:>16} "
                  f"{row['downtime']:>13} "
                  f"{row['sent']:>13} {row['link']:>16} {row['ratio']:>17}  {row['note']}")
    plot_progress(args.plot_dir, rows, fractions, memory, args.bandwidth)
    return 1 if errors else 0


def plot_progress(directory: Path, rows: list[dict], fractions: list[float], memory: int, bandwidth: int) -> None:
    """Remaining RAM over time, a panel per dirty rate, a line per policy and run; failed runs are notes."""
    runs = max((r["run"] for r in rows), default=1)
    panels = []
    for fraction in fractions:
        panel = plot.Panel(f"dirtying at {fraction:.0%} of the link", "seconds since the job started",
                           "RAM still to send, MiB")
        for r in (r for r in rows if r["fraction"] == fraction):
            label = r["policy"] if runs == 1 else f"{r['policy']} #{r['run']}"
            points = [(t, left / MIB) for t, left, _phase in r["progress"]]
            marks = []
            switch = next(((t, left / MIB) for t, left, phase in r["progress"] if phase == "post-copy"), None)
            if switch:
                marks.append(plot.Mark(*switch, "post-copy"))
            if r["converged"]:
                points.append((r["total_s"], 0.0))
                downtime = "?" if r["downtime_ms"] is None else f"{r['downtime_ms']:.0f} ms"
                marks.append(plot.Mark(r["total_s"], 0.0, f"downtime {downtime}"))
            elif points:
                marks.append(plot.Mark(*points[-1], "aborted" if "aborted" in r["note"] else "failed"))
            if not r["converged"]:
                panel.notes.append(f"{label}: {r['note'] or 'did not converge'}")
            if points:
                panel.series[label] = points
                panel.marks[label] = marks
        panels.append(panel)
    plot.lines(directory, "migrate", f"Live migration of a {memory} MiB guest at {bandwidth} MiB/s: "
               "plain vs auto", panels, cols=3)


def _row(fraction: float, policy: str, run: int, note: str = "") -> dict:
    """A result row before (or instead of) its migration."""
    return {"fraction": fraction, "policy": policy, "run": run + 1, "converged": False, "postcopy": False,
            "total_s": 0.0, "downtime_ms": None, "sent_mib": None, "ratio": None, "note": note,
            "progress": []}  # (seconds, bytes remaining, phase) per sample of the job


if __name__ == "__main__":
    sys.exit(main())
