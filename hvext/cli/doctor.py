"""``hvext doctor``: what this host has, what is missing, and how to fix it."""

from __future__ import annotations

import argparse
import pwd
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from hvext import accel, image
from hvext.cli import common
from hvext.errors import HvextError
from hvext.host import Host, emulator_path
from hvext.memory.host import meminfo
from hvext.paths import PATCHED_QEMU


@dataclass
class Check:
    name: str
    status: str  # "ok", "warn" (works with less), "fail" (hvext cannot work)
    detail: str
    fix: str = ""


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("doctor", help="check this host: accelerator, libvirt, QEMU, guest image")
    common.add_json(p)
    p.set_defaults(func=cmd_doctor)


def _qemu_version(binary: str | Path) -> str:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"not runnable ({err})"
    return out.splitlines()[0].removeprefix("QEMU emulator version ") if out else "unknown"


def _daemon_running(name: str) -> bool:
    """Whether the machine's own daemon *name* runs, from its pid file (not `ps`)."""
    try:
        pid = int(Path(f"/run/{name}.pid").read_text().strip())
        return Path(f"/proc/{pid}/comm").read_text().strip() == name
    except (OSError, ValueError):
        return False


def run_checks(uri: str | None) -> list[Check]:
    checks: list[Check] = []
    try:
        acc = accel.current()
        checks.append(Check("accelerator", "ok", f"{acc.name.upper()}: {acc.reason}",
                            "" if acc.is_kvm else "VMs run under TCG (slower); set HVEXT_ACCEL=kvm to force KVM"))
    except HvextError as err:
        checks.append(Check("accelerator", "fail", str(err), "unset HVEXT_ACCEL or set it to kvm or tcg"))
    try:
        with Host(uri) as host:
            versions = host.versions()
        checks.append(Check("libvirt", "ok", f"libvirt {versions['libvirt']} at {versions['uri']}, "
                                            f"QEMU driver for QEMU {versions['hypervisor']}"))
    except HvextError as err:
        checks.append(Check("libvirt", "fail", str(err), "`make libvirtd` (or `make setup`) starts libvirtd"))
    for daemon in ("virtlogd",):
        running = _daemon_running(daemon)
        checks.append(Check(daemon, "ok" if running else "fail", "running" if running else "not running",
                            "" if running else "`make libvirtd` starts it (domains with console logs need it)"))
    try:
        pwd.getpwnam("libvirt-qemu")
        checks.append(Check("libvirt-qemu user", "ok", "present"))
    except KeyError:
        checks.append(Check("libvirt-qemu user", "fail", "missing", "`make setup` installs libvirt-daemon-system"))
    swap_total = meminfo("SwapTotal")
    checks.append(Check("host swap", "ok" if swap_total else "warn",
                        f"{swap_total >> 20} MiB" if swap_total else "none",
                        "" if swap_total else "`make swap` creates a swap file (needed by reclaim --method swap)"))
    stock = shutil.which("qemu-system-x86_64")
    checks.append(Check("QEMU", "ok" if stock else "fail",
                        f"{stock}: {_qemu_version(stock)}" if stock else "qemu-system-x86_64 not found",
                        "" if stock else "`make setup` installs qemu-system-x86"))
    patched = emulator_path()
    checks.append(Check("patched QEMU", "ok" if patched else "warn",
                        f"{patched}: {_qemu_version(patched)}" if patched else f"not built ({PATCHED_QEMU})",
                        "" if patched else "`make qemu` builds it; without it dirty page lists and pmem "
                                           "flush events are unavailable"))
    try:
        guest = image.find_image()
        checks.append(Check("guest image", "ok" if guest else "fail",
                            f"{guest.directory} (kernel {guest.kernel_version})" if guest
                            else f"not built for the current inputs ({image.input_hash()})",
                            "" if guest else "`make image` builds it"))
    except HvextError as err:
        checks.append(Check("guest image", "fail", str(err), "`make setup`"))
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.uri)
    if args.json:
        common.print_json([asdict(c) for c in checks])
    else:
        colours = {"ok": "green", "warn": "yellow", "fail": "red"}
        for check in checks:
            mark = f"[{colours[check.status]}]{check.status.upper():<4}[/]"
            common.console.print(f"{mark} {check.name}: {check.detail}", soft_wrap=True)
            if check.fix:
                common.console.print(f"     -> {check.fix}", soft_wrap=True)
    return 1 if any(c.status == "fail" for c in checks) else 0
