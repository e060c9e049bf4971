"""Benchmark: a guest reading a hot set on its file-backed PMEM under host memory pressure, with and without
hot-PMEM placement (C15, hvext.pmem.placement), same guest, same run, alternating, several repetitions.

The guest has an NVDIMM backed by a file on disk (the slower tier), DAX-mounted, with a hot file it
declares ``hot`` (hvext_agent.hints) and a cold one. Its workload reads one byte of a random 4 KiB page of
the hot file in a loop (a DAX mapping: each read is a load from QEMU's mapping of the backing) and
reports its own operation count; the benchmark takes ops/s over a window.

Pressure: every ``--pressure-interval`` seconds the host evicts the backing's page cache, as reclaim does
under a memory hog: ``process_madvise(MADV_PAGEOUT)`` of QEMU's whole mapping of the backing and
``POSIX_FADV_DONTNEED`` of the file (pages read ahead but not yet mapped). The same in both cases.
Placement: every ``--interval`` seconds what one round of hvextd's ``[placement]`` loop does for this
domain (``MADV_WILLNEED`` on the hot ranges, ``MADV_COLD`` on the rest; the hints are fetched once
per case). Without it, the guest's reads fault the evicted pages back one by one from the disk.

What this shows is how much re-reading the hot ranges ahead, after the host took them, gives back to
the guest; it depends on how often pressure evicts and placement runs (both given in the output). A
case that fails is a row saying why; the exit status is 1 when one did.

    .venv/bin/python bench/pmem_placement.py [--quick | --smoke] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plot  # noqa: E402  (bench/plot.py, beside this script)
from hvext import aio, image  # noqa: E402
from hvext.agent.client import ExecResult  # noqa: E402
from hvext.errors import HvextError  # noqa: E402
from hvext.host import Domain, DomainSpec, Host  # noqa: E402
from hvext.memory import swap  # noqa: E402
from hvext.pmem import devices, hints, placement  # noqa: E402
from hvext.pmem.placement_policy import Params, total  # noqa: E402
from hvext.units import MIB  # noqa: E402

STATUS = "/run/hvext-pmem-reader.json"
CASES = ("none", "placement")
READER = r'''
import json, mmap, os, random, sys, time
path, status = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDONLY)
size = os.fstat(fd).st_size
m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
pages, rnd, done, last = size // 4096, random.Random(1), 0, time.monotonic()
while True:
    for _ in range(64):
        m[rnd.randrange(pages) * 4096]
    done += 64
    now = time.monotonic()
    if now - last >= 0.25:
        with open(status + ".tmp", "w") as out:
            json.dump({"t": now, "total_ops": done}, out)
        os.rename(status + ".tmp", status)
        last = now
'''
WRITE = r'''
import os, sys
for name, mib in (("hot", int(sys.argv[1])), ("cold", int(sys.argv[2]))):
    fd = os.open(f"/mnt/pm/{name}", os.O_RDWR | os.O_CREAT)
    for _ in range(mib):
        os.write(fd, os.urandom(1 << 20))
    os.fsync(fd)
    os.close(fd)
'''


def guest(domain: Domain, command: str, timeout: float = 300, stdin: str = "") -> str:
    async def run() -> ExecResult:
        async with domain.agent(timeout=timeout + 10) as agent:
            return await agent.exec(["sh", "-c", command], stdin=stdin, timeout=timeout)
    result = aio.run(run())
    if result.exitcode != 0:
        raise RuntimeError(f"guest command failed: {command[:60]}: {result.stderr[:200]}")
    return result.stdout


def major_faults(pid: int) -> int:
    """QEMU's major page faults so far (/proc/PID/stat): reads of the backing that waited for the disk."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[9])  # majflt, field 12 of stat


def status(domain: Domain) -> dict[str, float]:
    return json.loads(guest(domain, f"cat {STATUS}"))


class Periodic(threading.Thread):
    """Calls *action* every *interval* seconds until stopped; remembers the first error."""

    def __init__(self, interval: float, action: Any, first_after: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.interval, self.action, self.first_after = interval, action, first_after
        self.done = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        if self.done.wait(self.first_after):
            return
        while True:
            try:
                self.action()
            except Exception as err:  # noqa: BLE001  reported as the case's error
                self.error = self.error or f"{type(err).__name__}: {err}"[:100]
            if self.done.wait(self.interval):
                return

    def stop(self) -> None:
        self.done.set()
        self.join()


class Setup:
    """One guest with a file-backed NVDIMM, its hot and cold files written, the reader running."""

    def __init__(self, host: Host, hot_mib: int, cold_mib: int) -> None:
        self.name = f"hvext-bench-pmemplace-{os.getpid()}"
        self.domain = host.define(DomainSpec(self.name, memory_mib=512))
        size = max(64, (hot_mib + cold_mib) * 2 // 16 * 16 + 32)
        self.device = devices.attach(self.domain, size * MIB)
        self.domain.start()
        aio.run(self.domain.wait_agent(240))

        async def mount() -> None:
            async with self.domain.agent(timeout=300) as agent:
                await agent.pmem_mount("pmem0", "/mnt/pm", format=True)
        aio.run(mount())
        guest(self.domain, f"cat > /run/write.py && python3 /run/write.py {hot_mib} {cold_mib} && "
                           "python3 -m hvext_agent.hints declare /mnt/pm/hot hot && "
                           "python3 -m hvext_agent.hints declare /mnt/pm/cold persistent", stdin=WRITE)
        fd = devices.open_backing(self.device.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # the guest's DAX writes: clean pages from here on (the workload only reads)
        finally:
            os.close(fd)
        self.pid = swap.qemu_pid(self.name)
        self.hints = aio.run(hints.fetch(self.domain))
        self.found = placement.devices_of(self.pid, self.hints, set())
        (self.item,) = self.found
        if self.item.skipped:
            raise RuntimeError(f"placement skips the device: {self.item.skipped}")
        self.hot = list(self.hints.devices[str(self.device.path)].ranges["hot"])
        if total(self.hot) < hot_mib * MIB:
            raise RuntimeError(f"the guest's hints give {total(self.hot)} hot bytes, not {hot_mib} MiB")
        guest(self.domain, f"cat > /run/reader.py && (setsid python3 /run/reader.py /mnt/pm/hot {STATUS} "
                           ">/dev/null 2>&1 </dev/null &)", stdin=READER)
        deadline = time.monotonic() + 120
        while not guest(self.domain, f"cat {STATUS} 2>/dev/null || true").strip():
            if time.monotonic() > deadline:
                raise RuntimeError("the reader did not start")
            time.sleep(1)

    def evict(self) -> None:
        """What reclaim under a host memory hog does to the backing's page cache."""
        placement.advise(self.pid, [(v.start, v.end - v.start) for v in self.item.vmas], placement.MADV_PAGEOUT)
        fd = devices.open_backing(self.device.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def place(self) -> None:
        placement.place(self.name, self.pid, self.found, 1 << 40, None, Params(), cold="cold", act=True,
                        measured=False)

    def hot_resident(self) -> float:
        return placement.resident(self.device.path, self.hot) / max(1, total(self.hot))

    def close(self) -> None:
        try:
            if self.domain.is_active():
                self.domain.destroy()
            self.domain.undefine()
        except HvextError:
            pass


def run_case(setup: Setup, case: str, window: float, pressure_s: float, interval_s: float) -> dict[str, Any]:
    setup.evict()  # every case starts from the same state
    pressure = Periodic(pressure_s, setup.evict, first_after=pressure_s)
    placer = Periodic(interval_s, setup.place) if case == "placement" else None
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    sampler = Periodic(0.5, lambda: samples.append((round(time.monotonic() - started, 2), setup.hot_resident())))
    for thread in (pressure, placer, sampler):
        if thread:
            thread.start()
    try:
        first, faults = status(setup.domain), major_faults(setup.pid)
        time.sleep(window)
        last, faults = status(setup.domain), major_faults(setup.pid) - faults
    finally:
        for thread in (pressure, placer, sampler):
            if thread:
                thread.stop()
    error = pressure.error or (placer.error if placer else None)
    if error:
        raise RuntimeError(error)
    ops = (last["total_ops"] - first["total_ops"]) / max(1e-6, last["t"] - first["t"])
    return {"case": case, "ops_s": ops, "majflt_s": faults / window, "resident": statistics.fmean(v for _, v in samples) if samples else 0.0,
            "series": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 10 s, a 48 MiB hot set")
    parser.add_argument("--smoke", action="store_true", help="1 repetition of 4 s, a 16 MiB hot set (tests)")
    parser.add_argument("--reps", type=int, help="repetitions per case (default 5; --quick 3; --smoke 1)")
    parser.add_argument("--window", type=float, help="seconds measured per case and repetition (default 20)")
    parser.add_argument("--hot-mib", type=int, help="hot set, MiB (default 96)")
    parser.add_argument("--pressure-interval", type=float, default=2.0, help="seconds between evictions")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between placement rounds")
    plot.add_option(parser)
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.smoke else 3 if args.quick else 5)
    window = args.window or (4.0 if args.smoke else 10.0 if args.quick else 20.0)
    hot_mib = args.hot_mib or (16 if args.smoke else 48 if args.quick else 96)
    cold_mib = hot_mib
    rows: list[dict[str, Any]] = []
    setup: Setup | None = None
    try:
        os.environ["HVEXT_IMAGE"] = str(image.build().directory)
        with Host() as host:
            setup = Setup(host, hot_mib, cold_mib)
            try:
                for rep in range(reps):
                    order = CASES if rep % 2 == 0 else CASES[::-1]  # alternate: drift hits both alike
                    for case in order:
                        try:
                            rows.append(run_case(setup, case, window, args.pressure_interval, args.interval)
                                        | {"rep": rep})
                        except Exception as err:  # noqa: BLE001  a failed case is a row, never a traceback
                            rows.append({"case": case, "rep": rep, "error": f"{type(err).__name__}: {err}"[:100]})
                        print({k: v for k, v in rows[-1].items() if k != "series"}, flush=True)
            finally:
                setup.close()
    except Exception as err:  # noqa: BLE001  no image, no libvirt, the guest failed: the cases left are rows
        done = {(r["case"], r["rep"]) for r in rows}
        rows += [{"case": case, "rep": rep, "error": f"not run: {type(err).__name__}: {err}"[:100]}
                 for rep in range(reps) for case in CASES if (case, rep) not in done]
    print(f"\nguest 512 MiB, NVDIMM file on disk, hot set {hot_mib} MiB read at random 4 KiB pages (DAX); "
          f"pressure evicts the backing's page cache every {args.pressure_interval:g} s; placement round every "
          f"{args.interval:g} s; {reps} x {window:g} s per case, alternating")
    print(f"{'case':>10} {'reps':>5} {'median ops/s':>13} {'min':>9} {'max':>9} {'QEMU majflt/s':>14} "
          f"{'hot resident':>13}")
    medians: dict[str, float] = {}
    for case in CASES:
        good = [r for r in rows if r["case"] == case and "error" not in r]
        for r in rows:
            if r["case"] == case and "error" in r:
                print(f"{case:>10} rep {r['rep']}  error: {r['error']}")
        if good:
            values = [r["ops_s"] for r in good]
            medians[case] = statistics.median(values)
            print(f"{case:>10} {len(good):>5} {medians[case]:13.0f} {min(values):9.0f} {max(values):9.0f} "
                  f"{statistics.median(r['majflt_s'] for r in good):14.0f} "
                  f"{100 * statistics.fmean(r['resident'] for r in good):12.0f}%")
    by_rep = {(r["case"], r["rep"]): r for r in rows if "error" not in r}
    paired = [by_rep[("placement", rep)]["ops_s"] / by_rep[("none", rep)]["ops_s"] for rep in range(reps)
              if ("placement", rep) in by_rep and ("none", rep) in by_rep and by_rep[("none", rep)]["ops_s"]]
    if paired:
        print(f"placement / none, ops/s per repetition (paired, same minute): median {statistics.median(paired):.2f}x, "
              f"min {min(paired):.2f}x, max {max(paired):.2f}x")
    plot_cases(args.plot_dir, rows, hot_mib)
    return 1 if any("error" in r for r in rows) else 0


def plot_cases(directory: Path, rows: list[dict[str, Any]], hot_mib: int) -> None:
    """Ops/s per repetition, and the hot set's residency over the last repetition, one line per case."""
    ops = plot.Panel("guest reads of the hot set", "repetition", "ops/s")
    resident = plot.Panel("hot set resident in host DRAM (last repetition)", "seconds", "%")
    for case in CASES:
        good = [r for r in rows if r["case"] == case and "error" not in r]
        ops.series[case] = [(float(r["rep"]), r["ops_s"]) for r in good]
        if good:
            resident.series[case] = [(t, 100 * v) for t, v in good[-1]["series"]]
        ops.notes += [f"{case} rep {r['rep']}: {r['error']}" for r in rows if r["case"] == case and "error" in r]
    plot.lines(directory, "pmem_placement", f"Hot PMEM in DRAM: a {hot_mib} MiB hot set under pressure", [ops, resident])


if __name__ == "__main__":
    sys.exit(main())
