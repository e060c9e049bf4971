"""``hvext doctor``: what this host has, what is missing, and how to fix it."""

from __future__ import annotations

import argparse
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from hvext import accel, image
from hvext.cli import common
from hvext.errors import HvextError
from hvext.host import Host, emulator_path
from hvext import paths
from hvext.memory import hugepages, swapfile
from hvext.memory.host import meminfo
from hvext.pmem import placement
from hvext.paths import PATCHED_QEMU
from hvext.units import MIB


#: Verdicts, best first; the report's verdict is the worst of its checks.
STATUSES = ("ok", "warn", "fail")
USERFAULTFD_SYSCTL = Path("/proc/sys/vm/unprivileged_userfaultfd")
KSM_DIR = Path("/sys/kernel/mm/ksm")
KSM_STAT = Path("/proc/self/ksm_stat")
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@dataclass(frozen=True)
class Check:
    """One finding: a *value* a script can test, the verdict on it, and why (*reason*) apart from both."""

    name: str
    status: str  # "ok", "warn" (works with less), "fail" (hvext cannot work)
    value: Any  # the fact: "tcg", 4095 (MiB), {"path": ..., "version": ...}; None when unknown
    detail: str  # one line for people
    reason: str = ""  # why this verdict or this value (e.g. why TCG), without the fix
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "ok": self.status == "ok", "value": self.value,
                "reason": self.reason, "fix": self.fix, "detail": self.detail}


def report(checks: list[Check]) -> dict[str, Any]:
    """``doctor --json``: the verdict, the accelerator (the value scripts test most) and every check."""
    verdict = max((c.status for c in checks), key=STATUSES.index, default="ok")
    accelerator = next((c.value for c in checks if c.name == "accelerator"), None)
    return {"verdict": verdict, "ok": verdict != "fail", "accelerator": accelerator,
            "checks": [c.to_dict() for c in checks]}


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


def userfaultfd_check(setting: str | None) -> Check:
    """``vm.unprivileged_userfaultfd`` (the text of its /proc file, None when absent): the post-copy trade-off."""
    why = ("post-copy migration needs it: the destination QEMU (user libvirt-qemu, no capabilities) catches "
           "faults on guest RAM with userfaultfd(2), kernel faults included, which unprivileged processes may "
           "do only with this setting")
    risk = ("the price: every local user may then catch kernel page faults with userfaultfd, a known aid "
            "for exploiting kernel race bugs")
    try:
        value = int(setting) if setting is not None else None
    except ValueError:
        value = None
    if value is None:
        return Check("userfaultfd", "warn", None, "vm.unprivileged_userfaultfd unreadable",
                     f"{USERFAULTFD_SYSCTL} is missing or not a number", "`setup/host.sh sysctls`")
    if value:
        return Check("userfaultfd", "ok", value, "vm.unprivileged_userfaultfd = 1 (post-copy migration works)",
                     f"{why}; {risk}", "on a host with untrusted local users and no post-copy, "
                     "`sysctl vm.unprivileged_userfaultfd=0` and remove /etc/sysctl.d/60-hvext.conf")
    return Check("userfaultfd", "warn", value, "vm.unprivileged_userfaultfd = 0 (post-copy migration fails)",
                 f"{why}; without it a migration that switches to post-copy fails on the destination",
                 f"`setup/host.sh sysctls` sets it to 1 ({risk})")


def sharing_checks(ksm_dir: Path = KSM_DIR, ksm_stat: Path = KSM_STAT, thp: Path = THP_ENABLED) -> list[Check]:
    """What `hvext sharing` (C4) needs: KSM, its general_profit counter, /proc/PID/ksm_stat, THP's mode."""
    checks = []
    run = _read_sysctl(ksm_dir / "run")
    if run is None:
        checks.append(Check("KSM", "warn", None, "absent", f"no {ksm_dir}/run: the kernel lacks CONFIG_KSM",
                            "a kernel with CONFIG_KSM=y (`hvext sharing` cannot merge anything without it)"))
    else:
        state = {"0": "stopped", "1": "running", "2": "stopped, unmerging"}.get(run, run)
        checks.append(Check("KSM", "ok", run, f"run = {run} ({state}); `hvext sharing --apply` sets 1"))
    profit = _read_sysctl(ksm_dir / "general_profit")
    checks.append(Check("KSM general_profit", "ok" if profit is not None else "warn", profit,
                        f"{profit} bytes" if profit is not None else "absent",
                        "" if profit is not None else f"no {ksm_dir}/general_profit (added in Linux 6.4)",
                        "" if profit is not None else "Linux 6.4 or later"))
    stat = ksm_stat.exists()
    checks.append(Check("ksm_stat", "ok" if stat else "warn", stat,
                        "/proc/PID/ksm_stat present" if stat else "absent",
                        "" if stat else "no /proc/PID/ksm_stat: `hvext sharing --wait` cannot show a VM's "
                                        "merged pages and profit (Linux 6.1 adds it, 6.4 its profit)",
                        "" if stat else "Linux 6.4 or later"))
    mode = _read_sysctl(thp)
    current = mode.split("[")[1].split("]")[0] if mode and "[" in mode else None
    checks.append(Check("transparent huge pages", "ok" if current else "warn", current,
                        (f"{current} (QEMU asks for them on guest RAM)" if current != "never" else "never (no large pages)")
                        if current else "absent",
                        "" if current else f"{thp} is missing: no large pages, nothing to break for sharing",
                        "" if current else "a kernel with CONFIG_TRANSPARENT_HUGEPAGE"))
    return checks


def hugepage_checks(damon_admin: Path | None = None) -> list[Check]:
    """What `hvext hugepages` (C5) could count with: DAMON's sysfs interface, if free for hvext."""
    status = hugepages.damon_status(damon_admin)
    if status.state == "free":
        return [Check("DAMON", "ok", status.state, "sysfs interface free (not used yet: `hvext hugepages` "
                                                  "counts writes from the dirty page list)")]
    return [Check("DAMON", "warn", status.state, status.state, status.detail,
                  "`hvext hugepages` counts written pages from the patched QEMU's dirty page list instead"
                  + ("" if status.state == "busy" else "; a kernel with CONFIG_DAMON_SYSFS and CONFIG_DAMON_VADDR"))]


def placement_checks(support: dict[str, str | None] | None = None) -> list[Check]:
    """What `hvext pmem-placement` (C15, hot PMEM in DRAM) needs: process_madvise with WILLNEED, COLD, PAGEOUT."""
    support = placement.madvise_support() if support is None else support
    missing = {name: why for name, why in support.items() if why}
    if not missing:
        return [Check("process_madvise", "ok", sorted(support), "MADV_WILLNEED, MADV_COLD and MADV_PAGEOUT "
                                                                "accepted (pmem-placement, swap reclaim)")]
    return [Check("process_madvise", "warn", sorted(set(support) - set(missing)),
                  "missing: " + ", ".join(sorted(missing)),
                  "; ".join(f"{name}: {why}" for name, why in sorted(missing.items())),
                  "Linux 5.10 or later (process_madvise with MADV_WILLNEED): without it `hvext pmem-placement "
                  "--apply` and hvextd's [placement] refuse, and `hvext reclaim --method swap` fails")]


#: virtio-mem came in libvirt 7.9, ``<qemu:override>`` (which puts hvext's NVM RAM on its file) in 8.2.
NVM_RAM_LIBVIRT = (8, 2, 0)


def nvm_ram_check(libvirt_version: str | None, guest_kernel_config: str | None) -> Check:
    """NVM RAM (`hvext nvm-ram`): libvirt new enough, and a guest kernel with virtio-mem and hot remove."""
    missing = []
    try:
        if libvirt_version is not None and tuple(int(x) for x in libvirt_version.split(".")) < NVM_RAM_LIBVIRT:
            missing.append(f"libvirt {libvirt_version} < {'.'.join(map(str, NVM_RAM_LIBVIRT))} (no <qemu:override>)")
    except ValueError:
        missing.append(f"libvirt version {libvirt_version!r} unreadable")
    if guest_kernel_config is None:
        missing.append("guest kernel config unreadable")
    else:
        options = dict(line.split("=", 1) for line in guest_kernel_config.splitlines() if line.startswith("CONFIG_")
                       and "=" in line)
        for option in ("CONFIG_VIRTIO_MEM", "CONFIG_MEMORY_HOTPLUG", "CONFIG_MEMORY_HOTREMOVE"):
            if options.get(option) not in ("y", "m"):
                missing.append(f"guest kernel without {option}")
    if missing:
        return Check("NVM RAM (virtio-mem)", "warn", False, "; ".join(missing), "; ".join(missing),
                     "`hvext nvm-ram` needs libvirt >= 8.2 and a guest kernel with virtio-mem and memory hot remove")
    return Check("NVM RAM (virtio-mem)", "ok", True, "libvirt and the guest kernel support it (docs/memory.md)")
def swapfile_checks(backing_dir: Path | None = None, state_dir: Path | None = None) -> list[Check]:
    """What per-VM swap files (C6) need: libvirt's memory_backing_dir on a file system that reports extents
    and punches holes, the reservation (STATE_DIR) on the same one, and ext4 with e4defrag for --defrag."""
    backing = backing_dir or swapfile.memory_backing_dir()
    state = state_dir or paths.STATE_DIR
    where, state_where = swapfile.existing_parent(backing), swapfile.existing_parent(state)
    fstype = swapfile.filesystem_type(where)
    checks = [Check("swap files", "ok" if fstype in swapfile.PUNCHING_FILESYSTEMS else "warn",
                    {"directory": str(backing), "fstype": fstype},
                    f"guest RAM of --swap-file domains in {backing} ({fstype})",
                    "" if fstype in swapfile.PUNCHING_FILESYSTEMS else
                    f"{fstype} may not report extents (FIEMAP) or punch holes",
                    "" if fstype in swapfile.PUNCHING_FILESYSTEMS else
                    "set memory_backing_dir in /etc/libvirt/qemu.conf to a directory on ext4 or xfs")]
    same = where.stat().st_dev == state_where.stat().st_dev
    checks.append(Check("swap reservation", "ok" if same else "warn",
                        {"path": str(state / swapfile.SWAP_DIR_NAME / swapfile.RESERVATION_NAME),
                         "same_filesystem": same},
                        f"reservation under {state}, " + ("the same file system as the swap files" if same else
                                                          "another file system than the swap files"),
                        "" if same else "the reservation only balances VM files on its own file system",
                        "" if same else "put HVEXT_STATE_DIR and memory_backing_dir on one file system"))
    why = swapfile.defrag_support(where)
    checks.append(Check("online defragmentation", "warn" if why else "ok", not why,
                        why or "ext4 and e4defrag: `hvext swapfile DOMAIN --defrag`", why,
                        "" if not why else ("`apt-get install e2fsprogs`" if "e4defrag" in why else
                                            "swap files on ext4 (memory_backing_dir in qemu.conf)")))
    return checks


def _read_sysctl(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _qemu(binary: str | Path) -> dict[str, str]:
    return {"path": str(binary), "version": _qemu_version(binary)}


def run_checks(uri: str | None) -> list[Check]:
    checks: list[Check] = []
    try:
        acc = accel.current()
        checks.append(Check("accelerator", "ok", acc.name, f"{acc.name.upper()}: {acc.reason}", acc.reason,
                            "" if acc.is_kvm else "VMs run under TCG (slower); set HVEXT_ACCEL=kvm to force KVM"))
    except HvextError as err:
        checks.append(Check("accelerator", "fail", None, str(err), str(err),
                            "unset HVEXT_ACCEL or set it to kvm or tcg"))
    versions: dict[str, str] | None = None
    try:
        with Host(uri) as host:
            versions = host.versions()
        checks.append(Check("libvirt", "ok", {"version": versions["libvirt"], "uri": versions["uri"],
                                              "qemu": versions["hypervisor"]},
                            f"libvirt {versions['libvirt']} at {versions['uri']}, "
                            f"QEMU driver for QEMU {versions['hypervisor']}"))
    except HvextError as err:
        checks.append(Check("libvirt", "fail", None, str(err), str(err),
                            "`make libvirtd` (or `make setup`) starts libvirtd"))
    for daemon in ("virtlogd",):
        running = _daemon_running(daemon)
        checks.append(Check(daemon, "ok" if running else "fail", running, "running" if running else "not running",
                            "" if running else f"no live {daemon} process from /run/{daemon}.pid",
                            "" if running else "`make libvirtd` starts it (domains with console logs need it)"))
    try:
        uid: int | None = pwd.getpwnam("libvirt-qemu").pw_uid
        checks.append(Check("libvirt-qemu user", "ok", uid, "present"))
    except KeyError:
        uid = None
        checks.append(Check("libvirt-qemu user", "fail", None, "missing", "no user libvirt-qemu (QEMU runs as it)",
                            "`make setup` installs libvirt-daemon-system"))
    swap_mib = meminfo("SwapTotal") // MIB
    checks.append(Check("host swap", "ok" if swap_mib else "warn", swap_mib,
                        f"{swap_mib} MiB" if swap_mib else "none",
                        "" if swap_mib else "SwapTotal is 0 in /proc/meminfo",
                        "" if swap_mib else "`make swap` creates a swap file (needed by reclaim --method swap)"))
    stock = shutil.which("qemu-system-x86_64")
    checks.append(Check("QEMU", "ok" if stock else "fail", _qemu(stock) if stock else None,
                        f"{stock}: {_qemu_version(stock)}" if stock else "qemu-system-x86_64 not found",
                        "" if stock else "qemu-system-x86_64 is not on PATH",
                        "" if stock else "`make setup` installs qemu-system-x86"))
    patched = emulator_path()
    checks.append(Check("patched QEMU", "ok" if patched else "warn", _qemu(patched) if patched else None,
                        f"{patched}: {_qemu_version(patched)}" if patched else f"not built ({PATCHED_QEMU})",
                        "" if patched else f"no executable {PATCHED_QEMU}; without it dirty page lists and "
                                           "pmem flush events are unavailable",
                        "" if patched else "`make qemu` builds it"))
    try:
        guest = image.find_image()
        checks.append(Check("guest image", "ok" if guest else "fail",
                            {"directory": str(guest.directory), "kernel": guest.kernel_version} if guest else None,
                            f"{guest.directory} (kernel {guest.kernel_version})" if guest
                            else f"not built for the current inputs ({image.input_hash()})",
                            "" if guest else f"no image for the current inputs ({image.input_hash()})",
                            "" if guest else "`make image` builds it"))
    except HvextError as err:
        checks.append(Check("guest image", "fail", None, str(err), str(err), "`make setup`"))
    checks.append(userfaultfd_check(_read_sysctl(USERFAULTFD_SYSCTL)))
    try:
        kernel_config: str | None = (Path("/boot") / f"config-{image.host_kernel_version()}").read_text()
    except (HvextError, OSError):
        kernel_config = None
    checks += sharing_checks()
    checks += hugepage_checks()
    checks.append(nvm_ram_check(versions["libvirt"] if versions else None, kernel_config))
    checks += swapfile_checks()
    checks += placement_checks()
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.uri)

    def text() -> None:  # details come from outside (libvirt errors, paths): printed literally, never as markup
        colours = {"ok": "green", "warn": "yellow", "fail": "red"}
        for check in checks:
            mark = f"[{colours[check.status]}]{check.status.upper():<4}[/]"
            common.console.print(f"{mark} {escape(check.name)}: {escape(check.detail)}", soft_wrap=True)
            if check.reason and check.reason not in check.detail:
                common.console.print(f"     why: {escape(check.reason)}", soft_wrap=True)
            if check.fix:
                common.console.print(f"     -> {escape(check.fix)}", soft_wrap=True)

    common.print_result(args.json, report(checks), text)
    return 1 if any(c.status == "fail" for c in checks) else 0
