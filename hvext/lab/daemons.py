"""Each lab host's private libvirt tree and its daemons: virtlogd, libvirtd and hvextd.

A host's daemons run inside its network namespace and in their own mount
and UTS namespaces (``ip netns exec NS unshare --mount --uts``), where
/etc/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt and
/run/libvirt are bind mounts of the host's own directories. Everything else
(/var/lib/hvext, /var/cache/hvext, guest images) is the machine's, so a disk
path means the same file on every host, as shared storage would. hvextd
(hvext's daemon, watching the host's own libvirtd) therefore shares hvext's
state, the power registry included; its log and pid file are in the host's
run directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import libvirt

import hvext
import hvext.host  # noqa: F401  (installs the handler that keeps libvirt from printing errors itself)
from hvext.lab import net, pki, plan, procs
from hvext.lab.plan import LabError, LabHost, ProcessRef


MACHINE_LIBVIRT_CONF = Path("/etc/libvirt")
MACHINE_CAPS_CACHE = Path("/var/cache/libvirt/qemu/capabilities")
START_TIMEOUT_S = 60.0
_DIR_MODES = {"etc": 0o755, "lib": 0o755, "log": 0o755, "cache": 0o711}


def prepare(host: LabHost, count: int, run_dir: Path, data_dir: Path, hvextd_config: Path | None = None) -> None:
    """Create host's run and data directories, its config files and start script (hvextd runs with
    *hvextd_config* when given: a cluster lab's)."""
    hrun = plan.host_run_dir(run_dir, host.index)
    hdata = plan.host_data_dir(data_dir, host.index)
    try:
        (hrun / "libvirt").mkdir(parents=True, exist_ok=True)
        for sub, mode in _DIR_MODES.items():
            (hdata / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(hdata / sub, mode)
        etc = hdata / "etc"
        # The machine's daemon configs, but none of its domains, networks or autostart links.
        for item in MACHINE_LIBVIRT_CONF.iterdir():
            if item.is_file() and item.suffix == ".conf":
                shutil.copy2(item, etc / item.name)
        if (MACHINE_LIBVIRT_CONF / "nwfilter").is_dir():
            shutil.copytree(MACHINE_LIBVIRT_CONF / "nwfilter", etc / "nwfilter", dirs_exist_ok=True)
        (etc / "qemu").mkdir(exist_ok=True)
        (etc / "libvirtd.conf").write_text(plan.libvirtd_conf(host.index, host.uuid, data_dir))
        machine_qemu = MACHINE_LIBVIRT_CONF / "qemu.conf"
        base_qemu = machine_qemu.read_text() if machine_qemu.exists() else ""
        (etc / "qemu.conf").write_text(plan.qemu_conf(base_qemu, host.index))
        pki.make_host_credentials(data_dir, host.index)
        (hdata / "hosts").write_text(plan.hosts_file(Path("/etc/hosts").read_text(), count))
        # QEMU capability probing costs seconds per emulator; libvirt re-validates a seeded
        # cache (binary ctimes, libvirt and kernel versions) and re-probes if it is stale.
        if MACHINE_CAPS_CACHE.is_dir():
            shutil.copytree(MACHINE_CAPS_CACHE, hdata / "cache" / "qemu" / "capabilities", dirs_exist_ok=True)
        for daemon in plan.DAEMONS:
            (hrun / f"{daemon}.pid").unlink(missing_ok=True)
        (hrun / "hvextd.log").unlink(missing_ok=True)
        (hrun / "start.sh").write_text(plan.start_script(host.index, run_dir, data_dir, hvextd_path(),
                                                         str(Path(hvext.__file__).resolve().parents[1]),
                                                         hvextd_config))
    except OSError as err:
        raise LabError(f"preparing {host.name}'s directories under {hrun} and {hdata}: {err}") from err


def hvextd_path() -> str:
    """The ``hvextd`` console script beside this Python (its processes are then named ``hvextd``)."""
    beside = Path(sys.executable).parent / "hvextd"
    found = str(beside) if beside.is_file() else shutil.which("hvextd")
    if not found:
        raise LabError(f"hvextd is not installed (neither {beside} nor on PATH); `make setup` installs it")
    return found


def launch(host: LabHost, run_dir: Path) -> None:
    """Run host's start script in its network namespace and new mount and UTS namespaces."""
    hrun = plan.host_run_dir(run_dir, host.index)
    argv = ["ip", "netns", "exec", host.netns,
            "unshare", "--mount", "--uts", "--propagation", "private", "--",
            "/bin/sh", str(hrun / "start.sh")]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}
    # hvextd shares hvext's state with the caller (the same HVEXT_STATE_DIR and such).
    env |= {k: v for k, v in os.environ.items() if k.startswith("HVEXT_")}
    # Output goes to a file, not a pipe: the daemons must not inherit a pipe we wait on.
    with open(hrun / "start.log", "wb") as out:
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  env=env, timeout=START_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise LabError(f"starting {host.name}'s daemons ({' '.join(argv)}): {err}") from err
    if done.returncode != 0:
        raise LabError(f"starting {host.name}'s daemons failed (exit {done.returncode}): "
                       f"{_tail(hrun / 'start.log')}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no output)"
    return " | ".join(text[-lines:]) or "(no output)"


def daemon_ref(host: LabHost, daemon: str, run_dir: Path) -> ProcessRef | None:
    """The running *daemon* of *host* from its pid file, checked to be that daemon in that netns."""
    pid = procs.read_pid_file(plan.host_run_dir(run_dir, host.index) / f"{daemon}.pid")
    if pid is None:
        return None
    ref = procs.identify(pid)
    if ref is None or ref.comm != daemon:
        return None
    ns = net.netns_inode(host.netns)
    if ns is None or procs.netns_inode(pid) != ns:
        return None
    return ref


def wait_ready(host: LabHost, run_dir: Path, data_dir: Path,
               timeout: float = START_TIMEOUT_S) -> dict[str, ProcessRef]:
    """Wait until host's daemons wrote their pid files, libvirtd answers on its socket and hvextd
    watches it (then hvextd's signal handlers are set: SIGPWR would kill it before)."""
    deadline = time.monotonic() + timeout
    refs: dict[str, ProcessRef] = {}
    last_error = "no pid files yet"
    while time.monotonic() < deadline:
        for daemon in plan.DAEMONS:
            if daemon not in refs and (ref := daemon_ref(host, daemon, run_dir)) is not None:
                refs[daemon] = ref
        if len(refs) == len(plan.DAEMONS):
            probe = probe_libvirt(host.uri_unix)
            if probe.ok and hvextd_ready(host, run_dir):
                return refs
            last_error = probe.error if not probe.ok else f"hvextd has not logged {plan.HVEXTD_READY!r} yet"
            if not all(procs.is_alive(ref) for ref in refs.values()):
                last_error = "a daemon exited: " + ", ".join(d for d, r in refs.items() if not procs.is_alive(r))
                break
        time.sleep(0.1)
    hlog = plan.host_data_dir(data_dir, host.index) / "log" / "libvirtd.log"
    hrun = plan.host_run_dir(run_dir, host.index)
    raise LabError(f"{host.name}: its daemons were not ready within {timeout:.0f} s ({last_error}); "
                   f"see {hlog}, {hrun / 'hvextd.log'} and {hrun / 'start.log'}")


def hvextd_ready(host: LabHost, run_dir: Path) -> bool:
    """Whether host's hvextd logged that it watches the host's libvirtd."""
    try:
        text = (plan.host_run_dir(run_dir, host.index) / "hvextd.log").read_text(errors="replace")
    except FileNotFoundError:
        return False
    return plan.HVEXTD_READY in text


@dataclass
class Probe:
    """The result of asking a libvirtd who it is."""

    ok: bool
    hostname: str = ""
    version: str = ""
    domains: int = 0
    error: str = ""


def probe_libvirt(uri: str, tcp: tuple[str, int] | None = None) -> Probe:
    """Connect to *uri* and ask hostname, version and domain count.

    For a TCP URI, pass (address, port): a plain connect with a short timeout
    first, so a host that is gone answers "unreachable" at once rather than
    after libvirt's own connect timeout.
    """
    if tcp is not None:
        try:
            with socket.create_connection(tcp, timeout=1.0):
                pass
        except OSError as err:
            return Probe(False, error=f"{tcp[0]}:{tcp[1]}: {err}")
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        return Probe(False, error=err.get_error_message() or str(err))
    try:
        version = conn.getLibVersion()
        return Probe(True, hostname=conn.getHostname(),
                     version=f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}",
                     domains=len(conn.listAllDomains(0)))
    except libvirt.libvirtError as err:
        return Probe(False, error=err.get_error_message() or str(err))
    finally:
        conn.close()


def destroy_domains(host: LabHost, run_dir: Path) -> list[str]:
    """Stop every running domain of *host* through its libvirtd (so libvirt cleans up after QEMU)."""
    try:
        conn = libvirt.open(host.uri_unix)
    except libvirt.libvirtError as err:
        raise LabError(f"{host.name}: cannot connect to stop its domains: {err.get_error_message()}") from err
    stopped = []
    try:
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            dom.destroy()
            stopped.append(f"domain {dom.name()} on {host.name}")
    except libvirt.libvirtError as err:
        raise LabError(f"{host.name}: stopping its domains: {err.get_error_message()}") from err
    finally:
        conn.close()
    return stopped


def leftover_qemus(host: LabHost, run_dir: Path) -> list[ProcessRef]:
    """QEMUs of *host* that outlived its libvirtd, from the pid files libvirt wrote.

    Only processes running in the host's own network namespace count.
    """
    qemu_run = plan.host_run_dir(run_dir, host.index) / "libvirt" / "qemu"
    ns = net.netns_inode(host.netns)
    found: list[ProcessRef] = []
    if ns is None or not qemu_run.is_dir():
        return found
    for pid_file in qemu_run.glob("*.pid"):
        pid = procs.read_pid_file(pid_file)
        ref = procs.identify(pid) if pid is not None else None
        if ref is not None and ref.comm.startswith("qemu") and procs.netns_inode(ref.pid) == ns:
            found.append(ref)
    return found


def remove_dirs(host_index: int, run_dir: Path, data_dir: Path) -> list[str]:
    removed = []
    for path in (plan.host_run_dir(run_dir, host_index), plan.host_data_dir(data_dir, host_index)):
        if path.exists():
            try:
                shutil.rmtree(path)
            except OSError as err:
                raise LabError(f"removing {path}: {err}") from err
            removed.append(f"dir {path}")
    return removed
