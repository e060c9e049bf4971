"""Benchmark: reclaim 40 % of a guest's memory with balloon only, swap only and auto, in three guest states.

States: mostly free memory (the workload's working set is small and the rest
was touched and freed), mostly clean page cache (a large file was read), mostly
hot anonymous memory (the workload's working set fills most of RAM). In each,
a key-value workload (hvext_agent.kv) reports its own ops/s; the benchmark
reports the time to reach the target, the memory the QEMU process really gave
back (RSS), and the workload's ops/s during and after the reclaim as a ratio to
its undisturbed rate measured just before, in the same run. A case that fails
is a row saying why; the exit status is 1 when one did.

Besides the table it draws bench/out/reclaim.png (see bench/plot.py): per
state, the QEMU process's RSS (sampled on the host) and the workload's ops/s
(its own once-a-second figure, logged in the guest) over time, one line per
method, from the undisturbed baseline to the end of the case.

    .venv/bin/python bench/reclaim.py [--quick | --smoke] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plot  # noqa: E402  (bench/plot.py, beside this script)
from hvext import aio, image  # noqa: E402
from hvext.agent.client import ExecResult  # noqa: E402
from hvext.errors import HvextError, UsageError  # noqa: E402
from hvext.host import Domain, DomainSpec, Host  # noqa: E402
from hvext.memory import reclaim, swap  # noqa: E402
from hvext.units import MIB  # noqa: E402

STATUS = "/run/hvext-kv.json"
STATUS_LOG = "/run/hvext-kv.log"  # the status, appended once a second: the ops/s over time
RSS_POLL_S = 0.5


def guest(domain: Domain, command: str, timeout: float = 300) -> str:
    async def run() -> ExecResult:
        async with domain.agent(timeout=timeout + 10) as agent:
            return await agent.exec(["sh", "-c", command], timeout=timeout)
    result = aio.run(run())
    if result.exitcode != 0:
        raise RuntimeError(f"guest command failed: {command}: {result.stderr}")
    return result.stdout


def ops(domain: Domain, seconds: float) -> float:
    """Mean ops/s the workload reported over the next *seconds*."""
    first = json.loads(guest(domain, f"cat {STATUS}"))
    time.sleep(seconds)
    last = json.loads(guest(domain, f"cat {STATUS}"))
    elapsed = max(1e-6, last["t"] - first["t"])
    return (last["total_ops"] - first["total_ops"]) / elapsed


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


def prepare(domain: Domain, state: str, memory: int) -> None:
    if state == "free":
        wss = memory // 10
        # the margin leaves room for the kv workload's working set that starts next
        touched = int(guest(domain, f"python3 -c '{TOUCH_AND_FREE}' {int(memory * 0.7)} {FREE_MARGIN_MIB}"))
        if touched < memory // 10:
            raise RuntimeError(f"only {touched} MiB of the guest's memory could be touched and freed")
    elif state == "cache":
        guest(domain, f"dd if=/dev/urandom of=/var/tmp/big bs=1M count={int(memory * 0.6)} status=none && "
                      "sync && cat /var/tmp/big > /dev/null")
        wss = memory // 10
    else:  # hot anonymous memory
        wss = int(memory * 0.6)
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


class RssSampler(threading.Thread):
    """The QEMU process's RSS every RSS_POLL_S seconds, (host wall time, bytes), until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.points: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(RSS_POLL_S):
            try:
                self.points.append((time.time(), swap.process_memory(self.pid)["rss"]))
            except HvextError:  # QEMU gone: the series ends
                return

    def stop(self) -> list[tuple[float, int]]:
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


def run_case(host: Host, state: str, method: str, memory: int, settle: float) -> dict[str, Any]:
    name = f"hvext-bench-reclaim-{os.getpid()}"
    domain = host.define(DomainSpec(name, memory_mib=memory))
    try:
        domain.start()
        aio.run(domain.wait_agent(240))
        prepare(domain, state, memory)
        time.sleep(settle)
        sampler = RssSampler(swap.qemu_pid(name))
        sampler.start()
        sampled_from = time.time()
        try:
            base = ops(domain, settle)
            before = json.loads(guest(domain, f"cat {STATUS}"))
            started, started_wall = time.monotonic(), time.time()
            try:
                report = aio.run(reclaim.reclaim(domain, int(memory * 0.4) * MIB, method))
            except UsageError as err:  # a result, not a failure: e.g. the balloon's safety floor in the hot state
                return {"state": state, "method": method, "refused": str(err)[:100]}
            during_s = time.monotonic() - started
            time.sleep(1.5)  # the workload writes its status once a second
            done = json.loads(guest(domain, f"cat {STATUS}"))
            during = (done["total_ops"] - before["total_ops"]) / max(1e-6, done["t"] - before["t"])
            after = ops(domain, settle)
        finally:
            rss = sampler.stop()
        rss_later = swap.process_memory(swap.qemu_pid(name))["rss"]
        return {"state": state, "method": method, "chosen": report.method, "seconds": report.seconds,
                "returned_mib": report.returned / MIB, "kept_mib": (report.rss_before - rss_later) / MIB,
                "host_gain_mib": (report.host_available_after - report.host_available_before) / MIB,
                "base_ops": base, "during_ratio": during / base if base else 0.0,
                "after_ratio": after / base if base else 0.0, "during_s": during_s,
                "rss_series": [(round(t - started_wall, 2), b / MIB) for t, b in rss],
                "ops_series": [p for p in ops_series(domain, started_wall) if p[0] >= sampled_from - started_wall]}
    finally:
        try:
            if domain.is_active():
                domain.destroy()
            domain.undefine()
        except HvextError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 MiB guests, shorter measurements")
    parser.add_argument("--smoke", action="store_true", help="one case (free memory, balloon), short (tests)")
    parser.add_argument("--case", action="append", metavar="STATE/METHOD",
                        help="run only this case (repeatable), e.g. hot/balloon")
    parser.add_argument("--memory", type=int, default=768, help="guest RAM, MiB")
    plot.add_option(parser)
    args = parser.parse_args(argv)
    memory = 512 if args.quick or args.smoke else args.memory
    settle = 1.0 if args.smoke else 3.0 if args.quick else 6.0
    cases = [("free", "balloon")] if args.smoke else \
        [(state, method) for state in ("free", "cache", "hot") for method in ("balloon", "swap", "auto")]
    if args.case:
        chosen = [tuple(c.split("/", 1)) for c in args.case]
        if not set(chosen) <= set(cases):
            parser.error("--case: use STATE/METHOD with STATE in free, cache, hot and METHOD in balloon, swap, auto")
        cases = [c for c in cases if c in chosen]
    rows = []
    try:
        # one image for the whole run, even if the guest files change meanwhile
        os.environ["HVEXT_IMAGE"] = str(image.build().directory)
        with Host() as host:
            for state, method in cases:
                try:
                    rows.append(run_case(host, state, method, memory, settle))
                except Exception as err:  # noqa: BLE001  a failed case is a row, never a traceback
                    rows.append({"state": state, "method": method, "error": f"{type(err).__name__}: {err}"[:100]})
                print({k: v for k, v in rows[-1].items() if not k.endswith("_series")}, flush=True)
    except Exception as err:  # noqa: BLE001  no image, no libvirt, ...: every case left is a row saying so
        rows += [{"state": state, "method": method, "error": f"not run: {type(err).__name__}: {err}"[:100]}
                 for state, method in cases[len(rows):]]
    print(f"\nguest {memory} MiB, reclaim 40 % = {int(memory * 0.4)} MiB; returned = QEMU RSS drop at the end "
          f"of the reclaim, still out = RSS drop {settle:.0f} s later (pages faulted back count against it); "
          "ops ratio = kv ops/s during / after the reclaim over before it (same guest, same run)")
    print(f"{'state':>6} {'method':>8} {'chosen':>13} {'time s':>7} {'returned MiB':>13} {'still out MiB':>14} "
          f"{'ops during':>11} {'ops after':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['state']:>6} {r['method']:>8}  error: {r['error']}")
            continue
        if "refused" in r:
            print(f"{r['state']:>6} {r['method']:>8} {'refused':>13} {'-':>7} {'-':>13} {'-':>14} {'-':>11} {'-':>10}"
                  f"  ({r['refused'][:60]}...)")
            continue
        print(f"{r['state']:>6} {r['method']:>8} {r['chosen']:>13} {r['seconds']:7.1f} {r['returned_mib']:13.0f} "
              f"{r['kept_mib']:14.0f} {r['during_ratio']:10.2f}x {r['after_ratio']:9.2f}x")
    plot_cases(args.plot_dir, rows, memory)
    return 1 if any("error" in r for r in rows) else 0


def plot_cases(directory: Path, rows: list[dict[str, Any]], memory: int) -> None:
    """Per state, QEMU RSS and the workload's ops/s over time, a line per method; refused and failed cases are notes."""
    panels = []
    for state in dict.fromkeys(r["state"] for r in rows):
        rss = plot.Panel(f"{state}: QEMU RSS", "seconds since the reclaim started", "MiB", vlines=[(0.0, "reclaim")])
        ops_s = plot.Panel(f"{state}: workload", "seconds since the reclaim started", "ops/s",
                           vlines=[(0.0, "reclaim")])
        for r in (r for r in rows if r["state"] == state):
            if "error" in r or "refused" in r:
                ops_s.notes.append(f"{r['method']}: {'refused' if 'refused' in r else 'error'}: "
                                   f"{r.get('error') or r.get('refused')}")
                continue
            label = r["method"]
            rss.series[label] = r["rss_series"]
            ops_s.series[label] = r["ops_series"]
            end = [p for p in r["rss_series"] if p[0] >= r["during_s"]][:1]
            chose = f" ({r['chosen']})" if r["chosen"] != r["method"] else ""
            if end:
                rss.marks[label] = [plot.Mark(*end[0], f"done{chose} {r['during_s']:.1f} s")]
        panels += [rss, ops_s]
    plot.lines(directory, "reclaim", f"Reclaiming 40 % of a {memory} MiB guest: balloon, swap, auto", panels)


if __name__ == "__main__":
    sys.exit(main())
