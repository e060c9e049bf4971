"""Benchmark: suspend to RAM (C7) against libvirt's save to disk, on the same guest in the same run.

One RAM-file guest (``hvext define --ram-file``) boots and fills --fill MiB of
its RAM with a pattern (a Python process keeps it). Each run then does, one
after the other on that guest:

* ``hvext managedsave --to-ram`` and ``hvext start``: only the device state
  is written (a private file), guest RAM stays in its file in /dev/shm;
* ``virsh save`` and ``virsh restore`` (libvirt's save image, all RAM to
  disk, in hvext's state directory), through libvirt's API.

Measured: seconds to save, seconds to resume (start call until the vCPUs run:
the agent is not waited for, it answers as soon as the guest runs), bytes
written. The table shows median (min-max) and the ratio save-to-disk /
suspend-to-RAM; after every resume the guest's pattern process must still be
alive (same process) or the row says so.

    .venv/bin/python bench/suspend.py [--quick | --smoke] [--runs 3] [--memory 1024] [--fill 512] [--plot-dir DIR]

Besides the table it draws bench/out/suspend.png (see bench/plot.py): save and
resume medians per method.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plot  # noqa: E402  (bench/plot.py, beside this script)
from migrate import spread  # noqa: E402  (bench/migrate.py's min/median/max column)
from hvext import aio, image, paths  # noqa: E402
from hvext.cli.agentcmd import guest_exec  # noqa: E402
from hvext.host import Domain, DomainSpec, Host  # noqa: E402
from hvext.memory import ramfile  # noqa: E402

METHODS = ["to RAM", "to disk"]
FILL = ("python3 -c \"import os,time\nb = bytearray(os.urandom(1 << 20)) * %d\nopen('/run/fill.ok','w').close()\n"
        "while True: time.sleep(1)\" </dev/null >/dev/null 2>&1 & echo $!")


@dataclass
class Row:
    method: str
    save_s: float | None = None
    resume_s: float | None = None
    written: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def sh(domain: Domain, command: str, timeout: float = 300) -> str:
    result = aio.run(guest_exec(domain, ["sh", "-c", command], timeout=timeout))
    if result.exitcode != 0:
        raise RuntimeError(f"guest command failed ({result.exitcode}): {result.stderr[:200]}")
    return result.stdout


def same_process(domain: Domain, pid: str) -> None:
    aio.run(domain.wait_agent(120))
    if sh(domain, f"kill -0 {pid} && echo alive").strip() != "alive":
        raise RuntimeError("the guest's pattern process is gone after the resume")


def to_ram(domain: Domain, pid: str) -> Row:
    result = ramfile.save_to_ram(domain)
    started = time.monotonic()
    ramfile.start(domain)
    row = Row("to RAM", result.seconds, time.monotonic() - started, result.state_bytes,
              extra={"ram_kept": result.ram_bytes})
    same_process(domain, pid)
    return row


def to_disk(host: Host, domain: Domain, pid: str, target: Path) -> Row:
    started = time.monotonic()
    domain.save(target)
    saved = time.monotonic() - started
    written = target.stat().st_size
    started = time.monotonic()
    try:
        host.restore(target)
    finally:
        target.unlink(missing_ok=True)
    row = Row("to disk", saved, time.monotonic() - started, written)
    same_process(domain, pid)
    return row


def report(rows: list[Row], memory: int, fill: int) -> None:
    print(f"\nsuspend to RAM vs save to disk, {memory} MiB guest with {fill} MiB filled "
          "(median (min-max); ratio = to disk / to RAM)")
    print(f"{'':>14} {'to RAM':>24} {'to disk':>24} {'ratio':>18}")
    for key, label, fmt in (("save_s", "save s", "{:.2f}"), ("resume_s", "resume s", "{:.2f}"),
                            ("written", "MiB written", "{:.1f}")):
        scale = (1 / (1 << 20)) if key == "written" else 1.0
        cols = {m: [getattr(r, key) * scale for r in rows if r.method == m and r.error is None] for m in METHODS}
        ratios = [d / r for d, r in zip(cols["to disk"], cols["to RAM"]) if r]
        print(f"{label:>14} {spread(cols['to RAM'], fmt):>24} {spread(cols['to disk'], fmt):>24} "
              f"{spread(ratios, '{:.1f}x'):>18}")
    for r in rows:
        if r.error:
            print(f"{r.method}: error: {r.error}")


def plot_rows(directory: Path, rows: list[Row], memory: int) -> None:
    bars = {}
    for m in METHODS:
        ok = [r for r in rows if r.method == m and r.error is None]
        if ok:
            bars[m] = {"save": statistics.median(r.save_s for r in ok), "resume": statistics.median(r.resume_s for r in ok)}
    notes = [f"{r.method}: {r.error}" for r in rows if r.error]
    written = {m: statistics.median(r.written for r in rows if r.method == m and r.error is None)
               for m in METHODS if any(r.method == m and r.error is None for r in rows)}
    notes += [f"{m}: {written[m] / (1 << 20):.1f} MiB written (median)" for m in written]
    if len(written) == 2 and written["to RAM"]:
        notes.append(f"bytes written, to disk / to RAM: {written['to disk'] / written['to RAM']:.0f}x")
    plot.stacked_bars(directory, "suspend", f"Suspend and resume of a {memory} MiB guest, medians", bars,
                      ["save", "resume"], xlabel="seconds", notes=notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run")
    parser.add_argument("--smoke", action="store_true", help="one run, a small guest (tests)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--memory", type=int, default=1024, help="guest RAM, MiB")
    parser.add_argument("--fill", type=int, default=512, help="MiB of guest RAM the guest fills")
    plot.add_option(parser)
    args = parser.parse_args(argv)
    runs = 1 if args.quick or args.smoke else args.runs
    memory, fill = (512, 128) if args.smoke else (args.memory, args.fill)
    rows: list[Row] = []
    domain: Domain | None = None
    try:
        image.build()
        with Host() as host:
            domain = host.define(DomainSpec(name=f"bench-suspend-{os.getpid()}", memory_mib=memory))
            try:
                ramfile.convert(domain)
                ramfile.start(domain)
                aio.run(domain.wait_agent(180))
                pid = sh(domain, FILL % fill).strip()
                sh(domain, "for i in $(seq 600); do [ -e /run/fill.ok ] && exit 0; sleep 0.5; done; exit 1")
                target = paths.domain_dir(domain.name) / "bench.save"
                for _ in range(runs):
                    for method in METHODS:
                        try:
                            rows.append(to_ram(domain, pid) if method == "to RAM" else
                                        to_disk(host, domain, pid, target))
                        except Exception as err:  # noqa: BLE001  a row saying why
                            rows.append(Row(method, error=f"{type(err).__name__}: {err}"[:160]))
                            if not domain.is_active():
                                raise
                        r = rows[-1]
                        print(f"{method}: " + (f"error: {r.error}" if r.error else
                                               f"save {r.save_s:.2f} s, resume {r.resume_s:.2f} s, "
                                               f"{r.written / (1 << 20):.1f} MiB written"), flush=True)
            finally:
                if domain.is_active():
                    domain.destroy()
                ramfile.discard(domain)
                domain.undefine()
    except Exception as err:  # noqa: BLE001  no image, no libvirt, ...: a row saying why, never a traceback
        rows.append(Row(METHODS[0], error=f"{type(err).__name__}: {err}"[:160]))
    report(rows, memory, fill)
    plot_rows(args.plot_dir, rows, memory)
    return 1 if any(r.error for r in rows) or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
