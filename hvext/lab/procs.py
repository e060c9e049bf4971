"""Processes of the lab, found only by recorded PIDs and checked through /proc (never `ps`).

A PID alone can be reused by an unrelated process, so a lab process is its
PID plus its start time (field 22 of /proc/PID/stat) plus its command name;
all three must match before hvext signals it. Daemons of the machine's own
libvirt run in the root network namespace; a lab process never does, and
:func:`kill` refuses any process there.
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


def kill_all(refs: list[ProcessRef], timeout: float = 10.0) -> list[ProcessRef]:
    """Stop recorded lab processes together: SIGTERM, then SIGKILL to those left after *timeout* s.

    Returns the ones that were running. Raises :class:`LabError` (signalling
    none) if a PID now belongs to a process in the root network namespace (the
    machine's own daemons), or if one survives SIGKILL.
    """
    running = [ref for ref in refs if is_alive(ref)]
    root_ns = netns_inode("self")
    for ref in running:
        if netns_inode(ref.pid) == root_ns:
            raise LabError(f"refusing to signal PID {ref.pid} ({ref.comm}): it runs in the root network "
                           "namespace, so it is not a lab process")
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
