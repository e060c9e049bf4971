"""Processes of the lab, found by recorded PIDs or by their network namespace, checked through /proc (never `ps`).

A PID alone can be reused by an unrelated process, so a lab process is its
PID plus its start time (field 22 of /proc/PID/stat) plus its command name;
all three must match before hvext signals it. Daemons of the machine's own
libvirt run in the root network namespace; a lab process never does, and
:func:`kill_all`, :func:`signal_one` and :func:`in_netns` refuse any process there.

Everything a lab host runs (its daemons, the QEMUs its libvirtd starts,
whatever later code starts in it) runs in the host's network namespace, so
:func:`in_netns` finds all of it, also processes nobody recorded.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from hvext.lab.plan import LabError, ProcessRef

PROC = Path("/proc")


def parse_stat(text: str) -> tuple[str, str, int]:
    """(comm, state, start_ticks) from the text of /proc/PID/stat.

    The command name is in parentheses and may itself contain spaces or
    parentheses, so the fields after it are split from the last ``)``.
    """
    try:
        head, _, tail = text.rpartition(")")
        comm = head.split("(", 1)[1]
        fields = tail.split()
        return comm, fields[0], int(fields[19])
    except (IndexError, ValueError) as err:
        raise ValueError(f"unparsable /proc stat line: {text[:80]!r}") from err


def read_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, start_ticks) of a live PID, or None when no such process exists."""
    try:
        return parse_stat((PROC / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError):  # gone, or exited while being read
        return None


def identify(pid: int) -> ProcessRef | None:
    """The :class:`ProcessRef` of a running (not zombie) PID, or None."""
    stat = read_stat(pid)
    if stat is None or stat[1] in ("Z", "X"):
        return None
    return ProcessRef(pid=pid, start_ticks=stat[2], comm=stat[0])


def is_alive(ref: ProcessRef) -> bool:
    """Whether the recorded process still runs (same PID, start time and name; not a zombie)."""
    return identify(ref.pid) == ref


def read_pid_file(path: Path) -> int | None:
    """The PID in a daemon's pid file, or None when the file is absent or empty."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    try:
        pid = int(text)
    except ValueError as err:
        raise LabError(f"pid file {path} holds {text[:40]!r}, not a PID") from err
    if pid <= 1:
        raise LabError(f"pid file {path} holds PID {pid}; refusing to use it")
    return pid


def netns_inode(pid: int | str) -> int | None:
    """The network namespace inode of a process (``self`` for this one), or None if it is gone."""
    try:
        return os.stat(PROC / str(pid) / "ns" / "net").st_ino
    except FileNotFoundError:
        return None


def mntns_id(pid: int) -> str | None:
    try:
        return os.readlink(PROC / str(pid) / "ns" / "mnt")
    except FileNotFoundError:
        return None


def in_netns(inode: int) -> list[ProcessRef]:
    """Every running process whose network namespace is *inode* (a lab host's, see
    :func:`hvext.lab.net.netns_inode`). Refuses the root namespace's inode."""
    if inode == netns_inode("self"):
        raise LabError("refusing to list the root network namespace's processes: they are not a lab host's")
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry / "ns" / "net").st_ino != inode:
                continue
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        ref = identify(int(entry.name))
        if ref is not None:
            found.append(ref)
    return found


def _refuse_root_namespace(refs: list[ProcessRef]) -> None:
    root_ns = netns_inode("self")
    for ref in refs:
        if netns_inode(ref.pid) == root_ns:
            raise LabError(f"refusing to signal PID {ref.pid} ({ref.comm}): it runs in the root network "
                           "namespace, so it is not a lab process")


def signal_one(ref: ProcessRef, sig: signal.Signals) -> None:
    """Send *sig* to one recorded lab process; LabError when it no longer runs or is not a lab process."""
    if not is_alive(ref):
        raise LabError(f"{ref.comm} (PID {ref.pid}) is not running")
    _refuse_root_namespace([ref])
    try:
        os.kill(ref.pid, sig)
    except ProcessLookupError as err:
        raise LabError(f"{ref.comm} (PID {ref.pid}) exited before {sig.name}") from err


def kill_now(refs: list[ProcessRef], timeout: float = 10.0) -> list[ProcessRef]:
    """SIGKILL recorded lab processes at once, as a power cut would; returns the ones that were running.

    Same refusals as :func:`kill_all`; LabError if one still runs after *timeout* s.
    """
    running = [ref for ref in refs if is_alive(ref)]
    _refuse_root_namespace(running)
    for ref in running:
        try:
            os.kill(ref.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left = list(running)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        left = [ref for ref in left if is_alive(ref)]
        if left:
            time.sleep(0.02)
    if left:
        raise LabError("survived SIGKILL: " + ", ".join(f"{r.comm} (PID {r.pid})" for r in left))
    return running


def kill_all(refs: list[ProcessRef], timeout: float = 10.0) -> list[ProcessRef]:
    """Stop recorded lab processes together: SIGTERM, then SIGKILL to those left after *timeout* s.

    Returns the ones that were running. Raises :class:`LabError` (signalling
    none) if a PID now belongs to a process in the root network namespace (the
    machine's own daemons), or if one survives SIGKILL.
    """
    running = [ref for ref in refs if is_alive(ref)]
    _refuse_root_namespace(running)
    left = list(running)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for ref in left:
            try:
                os.kill(ref.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = [ref for ref in left if is_alive(ref)]
        if not left:
            return running
    raise LabError("survived SIGKILL: " + ", ".join(f"{r.comm} (PID {r.pid})" for r in left))
