"""Benchmark: guest boot phases with hvext's boot path next to Debian's (same kernel, same root file system).

hvext's boot path is the kernel's vmlinux started at its PVH entry and hvext's
small initramfs; Debian's is the xz-compressed bzImage and Debian's 30 MB
initrd (every module, udev), which is how hvext booted before.

Each boot is timed from the host's start call to the agent's answer and split
into phases: qemu (libvirt and QEMU start), firmware (until the kernel's uptime
0, from the console lines that carry the guest's uptime), kernel (until "Run
/init"), initramfs (until the root disk is mounted), init (until hvext-init has
started the agent), agent (until the agent's "ready" line), host (until the
agent answers hvext's handshake). Guest times come from the guest's dmesg and
the ``up=`` markers hvext-init prints; host times from the console log's
arrival. The two initrds boot alternately in the same run, and the table
shows median (min-max) per phase and the ratio of the medians. The machine's
load is printed with them: other guests on the same cores slow every phase.
The guest's clock can fall behind in early boot when the host is busy (the
kernel's TSC calibration fails and it counts timer ticks): that time shows
up in "firmware", which is the host time not covered by the guest's clock;
the total is host time throughout.

Besides the table it draws bench/out/boot.png (see bench/plot.py): one
stacked bar per boot path, its phases' medians end to end.

    .venv/bin/python bench/boot.py [--quick | --smoke] [--runs 3] [--memory 512] [--plot-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plot  # noqa: E402  (bench/plot.py, beside this script)
from hvext import aio, image, paths  # noqa: E402
from hvext.cli.agentcmd import guest_exec  # noqa: E402
from hvext.errors import HvextError  # noqa: E402
from hvext.host import Domain, DomainSpec, Host  # noqa: E402

PHASES = ["qemu", "firmware", "kernel", "initramfs", "init", "agent", "host"]
UP_RE = re.compile(r"\bup=(\d+\.\d+)\s*$")
DMESG_RE = re.compile(r"^\[\s*(\d+\.\d+)\]\s(.*)$")
READY = "hvext-agent: ready"


@dataclass
class Boot:
    variant: str
    phases: dict[str, float] = field(default_factory=dict)
    total: float | None = None
    error: str | None = None
    load: float = 0.0


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def debian_boot_image(guest: image.GuestImage, directory: Path) -> Path:
    """An image directory (for HVEXT_IMAGE) with the same root file system booted the way it was
    before hvext had its own boot path: Debian's bzImage (same kernel) and Debian's initrd."""
    kernel, initrd = (Path(f"/boot/{name}-{guest.kernel_version}") for name in ("vmlinuz", "initrd.img"))
    for source in (kernel, initrd):
        if not source.is_file():
            raise HvextError(f"{source} is missing (package linux-image-{guest.kernel_version})")
    (directory / image.ROOTFS).symlink_to(guest.rootfs)
    shutil.copy2(kernel, directory / image.KERNEL)
    shutil.copy2(initrd, directory / image.INITRD)
    (directory / image.MANIFEST).write_text(json.dumps({"kernel_version": guest.kernel_version}))
    for path in directory.iterdir():
        if not path.is_symlink():
            path.chmod(0o644)
    directory.chmod(0o755)
    return directory


class ConsoleTail:
    """Lines of a growing console log, each with the host time it was first seen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.lines: list[tuple[float, str]] = []

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return
        now = time.monotonic()
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        self.lines += [(now, line.decode(errors="replace").rstrip("\r")) for line in complete]

    def find(self, text: str) -> tuple[float, str] | None:
        return next(((t, line) for t, line in self.lines if text in line), None)


def guest_uptime(tail: ConsoleTail, text: str) -> float | None:
    hit = tail.find(text)
    match = UP_RE.search(hit[1]) if hit else None
    return float(match.group(1)) if match else None


def dmesg_time(dmesg: str, text: str) -> float | None:
    for line in dmesg.splitlines():
        match = DMESG_RE.match(line)
        if match and text in match.group(2):
            return float(match.group(1))
    return None


def boot_once(host: Host, variant: str, image_dir: Path, memory: int, timeout: float) -> Boot:
    result = Boot(variant, load=loadavg())
    os.environ["HVEXT_IMAGE"] = str(image_dir)
    name = f"hvext-bench-boot-{os.getpid()}-{variant}"
    domain: Domain | None = None
    try:
        domain = host.define(DomainSpec(name, memory_mib=memory))
        tail = ConsoleTail(paths.console_log(name, host.host_id))
        started = time.monotonic()
        domain.start()
        created = time.monotonic()
        deadline = started + timeout
        while tail.find(READY) is None:
            if time.monotonic() > deadline:
                last = tail.lines[-1][1] if tail.lines else "(no console output)"
                raise HvextError(f"no agent within {timeout:.0f} s; console ends with: {last[:60]}")
            time.sleep(0.02)
            tail.poll()
        ready_host = tail.find(READY)[0]  # type: ignore[index]
        aio.run(domain.wait_agent(30))
        answered = time.monotonic()
        dmesg = aio.run(guest_exec(domain, ["dmesg"], 30)).stdout
        # host time of the guest's uptime 0: the earliest (arrival - uptime) over lines that carry both
        stamped = [t - float(m.group(1)) for t, line in tail.lines if (m := UP_RE.search(line))]
        run_init = dmesg_time(dmesg, "Run /init as init process")
        root_mounted = dmesg_time(dmesg, "EXT4-fs (vda): mounted filesystem")
        agent_started = guest_uptime(tail, "hvext-init: agent started")
        if not stamped or None in (run_init, root_mounted, agent_started):
            raise HvextError("boot markers missing from the console or dmesg (is hvext-init current?)")
        zero = min(stamped)
        ready = ready_host - zero
        result.phases = {"qemu": created - started, "firmware": zero - created, "kernel": run_init,
                         "initramfs": root_mounted - run_init,  # type: ignore[operator]
                         "init": agent_started - root_mounted,  # type: ignore[operator]
                         "agent": ready - agent_started, "host": answered - ready_host}
        result.total = answered - started
    except (HvextError, OSError) as err:
        result.error = str(err)[:100]
    finally:
        if domain is not None:
            try:
                if domain.is_active():
                    domain.destroy()
                domain.undefine()
            except HvextError as err:
                result.error = result.error or f"cleanup: {err}"[:100]
    return result


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def report(boots: list[Boot], memory: int, variants: list[str]) -> None:
    ok = {v: [b for b in boots if b.variant == v and b.error is None] for v in variants}
    loads = [b.load for b in boots]
    print(f"\nguest {memory} MiB, {len(boots)} boots; seconds, median (min-max); "
          f"load average {min(loads):.1f}-{max(loads):.1f} over the run ({os.cpu_count()} CPUs)")
    width = 22
    print(f"{'phase':>10} " + " ".join(f"{v:>{width}}" for v in variants)
          + ("   ratio" if len(variants) == 2 else ""))
    for phase in PHASES + ["total"]:
        cells, medians = [], []
        for v in variants:
            values = [b.total if phase == "total" else b.phases[phase] for b in ok[v]]
            values = [x for x in values if x is not None]
            cells.append(spread(values))
            medians.append(statistics.median(values) if values else None)
        ratio = ""
        if len(variants) == 2 and all(m is not None and m > 0 for m in medians):
            ratio = f"{medians[1] / medians[0]:7.2f}x"  # type: ignore[operator]
        print(f"{phase:>10} " + " ".join(f"{c:>{width}}" for c in cells) + ("  " + ratio if ratio else ""))
    for b in boots:
        if b.error:
            print(f"{b.variant:>10} error: {b.error}")
    print("firmware = from QEMU's start to the guest clock's zero (includes early-boot time the guest clock "
          "lost on a busy host)")
    if len(variants) == 2:
        print(f"ratio = {variants[1]} / {variants[0]} (medians)")


def plot_phases(directory: Path, boots: list[Boot], memory: int, variants: list[str]) -> None:
    """A stacked bar of the phases' medians per boot path; failed boots are notes."""
    bars = {}
    for v in variants:
        ok = [b for b in boots if b.variant == v and b.error is None]
        if ok:
            bars[f"{v} ({len(ok)} boot{'s' if len(ok) > 1 else ''})"] = \
                {p: statistics.median(b.phases[p] for b in ok) for p in PHASES}
    notes = [f"{b.variant}: {b.error}" for b in boots if b.error]
    plot.stacked_bars(directory, "boot", f"Boot phases of a {memory} MiB guest, medians", bars, PHASES,
                      xlabel="seconds from the host's start call to the agent's answer", notes=notes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one boot of each initrd")
    parser.add_argument("--smoke", action="store_true", help="one boot with hvext's initramfs only (tests)")
    parser.add_argument("--runs", type=int, default=3, help="boots of each initrd, alternating")
    parser.add_argument("--memory", type=int, default=512, help="guest RAM, MiB")
    parser.add_argument("--timeout", type=float, default=180.0, help="per boot, seconds")
    plot.add_option(parser)
    args = parser.parse_args(argv)
    runs = 1 if args.quick or args.smoke else args.runs
    variants = ["hvext"] if args.smoke else ["hvext", "debian"]
    boots: list[Boot] = []
    scratch: Path | None = None
    try:
        scratch = Path(tempfile.mkdtemp(prefix="bench-boot-", dir=paths.CACHE_DIR))
        guest = image.build()
        dirs = {"hvext": guest.directory}
        if "debian" in variants:
            try:
                dirs["debian"] = debian_boot_image(guest, scratch)
            except (HvextError, OSError) as err:
                print(f"debian: skipped: {err}", file=sys.stderr)
                variants.remove("debian")
        with Host() as host:
            for _ in range(runs):
                for variant in variants:
                    boots.append(boot_once(host, variant, dirs[variant], args.memory, args.timeout))
                    b = boots[-1]
                    print(f"{variant}: " + (f"error: {b.error}" if b.error else
                                            f"{b.total:.1f} s " + " ".join(f"{p}={b.phases[p]:.2f}" for p in PHASES))
                          + f" (load {b.load:.1f})", flush=True)
    except Exception as err:  # noqa: BLE001  no image, no libvirt, ...: a row saying why, never a traceback
        boots.append(Boot(variants[0], error=f"{type(err).__name__}: {err}"[:100], load=loadavg()))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    report(boots, args.memory, variants)
    plot_phases(args.plot_dir, boots, args.memory, variants)
    return 1 if any(b.error for b in boots) else 0


if __name__ == "__main__":
    sys.exit(main())
