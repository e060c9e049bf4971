"""hvextd as a service where there is no systemd: started detached, found by a pid file, stopped.

``hvext daemon start|stop|restart|status`` (hvext/cli/daemon.py) is built on
this module; with systemd, the unit in ansible/roles/hvext_host does the same.

- The pid file lives in a root-owned 0755 directory under /run (created with
  mkdir 0755; an existing one must be a real directory owned by us and not
  writable by others), and is created with O_EXCL|O_NOFOLLOW, mode 0644, so
  a link planted there is never followed and two starts cannot both win.
- A PID read from it counts only if /proc/PID/cmdline is hvextd's (a PID
  reused by another process makes the file stale, and a stale file is
  removed, never acted upon).
- The daemon's stdout and stderr go to a log file (opened O_APPEND|O_NOFOLLOW).
- ``start`` is idempotent (already running: says so), and reports a daemon
  that exits during start-up (a bad config) as an error with its last log
  lines; it counts the daemon ready once it logs that it is watching libvirt.
- ``stop`` sends SIGTERM, waits for the process to exit and removes the pid file.
- ``start`` and ``stop`` hold a lock (``hvextd.lock`` beside the pid file),
  so two of them at once cannot both start a daemon.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hvext
from hvext import durable, paths
from hvext.errors import HvextError
from hvext.lab import procs

#: Where the pid file lives (root-owned, 0755; /run is a tmpfs emptied at boot).
RUN_DIR = Path(os.environ.get("HVEXT_RUN_DIR", "/run/hvext"))
PID_FILE = RUN_DIR / "hvextd.pid"
LOG_FILE = paths.LOG_DIR / "hvextd.log"
#: The configuration the Ansible role installs; used by ``start`` when it exists.
CONFIG_FILE = Path(os.environ.get("HVEXT_CONFIG", "/etc/hvext/hvextd.toml"))
#: hvextd logs this once it is connected to libvirt (hvext/daemon/main.py: "watching URI (N domains)").
READY_MARK = b" watching "
MODULE = "hvext.daemon.main"


class ServiceError(HvextError):
    """hvextd could not be started, found or stopped as asked."""


@dataclass(frozen=True)
class Status:
    """What the pid file says, checked against /proc."""

    pid_file: Path
    pid: int | None          # the running hvextd, or None
    stale: str | None = None  # why an existing pid file does not name a running hvextd

    @property
    def running(self) -> bool:
        return self.pid is not None

    def as_dict(self) -> dict[str, Any]:
        return {"running": self.running, "pid": self.pid, "pid_file": str(self.pid_file), "stale": self.stale}


def cmdline(pid: int) -> list[str] | None:
    """The argument vector of a process, or None when it is gone.

    Empty for kernel threads and zombies, and for a moment right after an
    exec (the kernel shows the new name before the arguments), so an empty
    one is read again a few times before it is believed.
    """
    for _ in range(10):
        try:
            raw = (procs.PROC / str(pid) / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return None
        if raw:
            break
        time.sleep(0.02)
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")] if raw else []


def is_hvextd(argv: list[str]) -> bool:
    """Whether an argument vector is hvextd's: the ``hvextd`` script or ``python -m hvext.daemon.main``."""
    head = argv[:3]
    return any(os.path.basename(a) == "hvextd" for a in head) or \
        any(a == "-m" and b == MODULE for a, b in zip(head, head[1:]))


def _read_pid(pid_file: Path) -> tuple[int | None, str | None]:
    """(PID, None) from a pid file, or (None, why not): absent, unreadable or not a PID."""
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as err:
        raise ServiceError(f"cannot read pid file {pid_file}: {err.strerror}") from err
    with os.fdopen(fd, "rb") as f:
        text = f.read(64).decode(errors="replace").strip()
    if not (text.isascii() and text.isdigit()) or int(text) <= 1:
        return None, f"holds {text[:20]!r}, not a PID"
    return int(text), None


def status(pid_file: Path = PID_FILE) -> Status:
    """The running hvextd named by *pid_file*, or why there is none."""
    pid, bad = _read_pid(pid_file)
    if pid is None:
        return Status(pid_file, None, bad)
    argv = cmdline(pid)
    if argv is None or procs.identify(pid) is None:  # gone, or a zombie
        return Status(pid_file, None, f"PID {pid} is not running")
    if not is_hvextd(argv):
        return Status(pid_file, None, f"PID {pid} is now another process ({' '.join(argv)[:80]})")
    return Status(pid_file, pid)


def ensure_run_dir(directory: Path) -> None:
    """Create *directory* 0755, or check that the existing one is ours and not writable by others."""
    try:
        os.mkdir(directory, 0o755)
        os.chmod(directory, 0o755)  # whatever the umask
    except FileExistsError:
        pass
    except OSError as err:
        raise ServiceError(f"cannot create {directory}: {err.strerror}") from err
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise ServiceError(f"{directory} is not a directory (a link?); refusing to put a pid file there")
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ServiceError(f"{directory} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; "
                           f"it must be owned by uid {os.geteuid()} and writable by no one else")


@contextmanager
def _locked(pid_file: Path) -> Iterator[None]:
    """Serialise start and stop (a lock file beside the pid file, never followed if a link)."""
    try:
        fd = durable.lock_file(pid_file.with_suffix(".lock"))
    except OSError as err:
        raise ServiceError(f"cannot open {pid_file.with_suffix('.lock')}: {err.strerror}") from err
    try:
        yield
    finally:
        os.close(fd)


def _remove_stale(pid_file: Path, current: Status) -> None:
    if current.stale is not None:
        pid_file.unlink(missing_ok=True)


def _create_pid_file(pid_file: Path) -> int:
    return os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def _open_log(log_file: Path) -> int:
    try:
        fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except OSError as err:
        raise ServiceError(f"cannot open log {log_file}: {err.strerror}") from err
    return fd


def _log_since(log_file: Path, offset: int, limit: int = 1 << 16) -> bytes:
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            return f.read(limit)
    except OSError:
        return b""


def daemon_argv(config: Path | None, uri: str | None, log_level: str | None) -> list[str]:
    """The command line of hvextd run by this Python (so the same hvext and virtualenv)."""
    argv = [sys.executable, "-m", MODULE]
    if uri:
        argv += ["-c", uri]
    if config is not None:
        argv += ["--config", str(config)]
    if log_level:
        argv += ["--log-level", log_level]
    return argv


@dataclass(frozen=True)
class Started:
    pid: int
    already: bool      # it was running before: nothing was started
    ready: bool        # it logged that it watches libvirt (False: still connecting when we stopped waiting)


def start(*, config: Path | None = None, uri: str | None = None, log_level: str | None = None,
          pid_file: Path = PID_FILE, log_file: Path = LOG_FILE, wait_s: float = 15.0) -> Started:
    """Start hvextd detached unless it runs; fail (pid file removed) if it exits while starting."""
    if config is not None and not config.is_file():
        raise ServiceError(f"config {config} does not exist")
    ensure_run_dir(pid_file.parent)
    with _locked(pid_file):
        return _start(config, uri, log_level, pid_file, log_file, wait_s)


def _start(config: Path | None, uri: str | None, log_level: str | None, pid_file: Path, log_file: Path,
           wait_s: float) -> Started:
    current = status(pid_file)
    if current.running:
        return Started(current.pid, already=True, ready=True)  # type: ignore[arg-type]
    _remove_stale(pid_file, current)
    try:
        pid_fd = _create_pid_file(pid_file)
    except FileExistsError:
        again = status(pid_file)
        if again.running:
            return Started(again.pid, already=True, ready=True)  # type: ignore[arg-type]
        raise ServiceError(f"{pid_file} appeared meanwhile ({again.stale or 'empty'}): is another "
                           "'hvext daemon start' running? retry in a moment") from None
    except OSError as err:
        raise ServiceError(f"cannot create pid file {pid_file}: {err.strerror}") from err
    try:
        os.fchmod(pid_fd, 0o644)
        log_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        log_fd = _open_log(log_file)
        try:
            offset = os.lseek(log_fd, 0, os.SEEK_END)
            env = dict(os.environ)
            # the hvext that runs this (e.g. a source checkout) is the one the daemon runs
            package_root = str(Path(hvext.__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
            env["PYTHONUNBUFFERED"] = "1"
            child = subprocess.Popen(daemon_argv(config, uri, log_level), stdin=subprocess.DEVNULL,
                                     stdout=log_fd, stderr=log_fd, cwd="/", env=env, start_new_session=True)
        finally:
            os.close(log_fd)
        os.write(pid_fd, f"{child.pid}\n".encode())
    except BaseException:
        os.close(pid_fd)
        pid_file.unlink(missing_ok=True)
        raise
    os.close(pid_fd)
    deadline = time.monotonic() + wait_s
    while True:
        code = child.poll()
        if code is not None:
            pid_file.unlink(missing_ok=True)
            tail = _log_since(log_file, offset).decode(errors="replace").strip().splitlines()[-5:]
            raise ServiceError(f"hvextd exited with status {code} while starting"
                               + (": " + " | ".join(tail) if tail else "") + f" (log: {log_file})")
        if READY_MARK in _log_since(log_file, offset):
            return Started(child.pid, already=False, ready=True)
        if time.monotonic() >= deadline:
            return Started(child.pid, already=False, ready=False)
        time.sleep(0.1)


def stop(*, pid_file: Path = PID_FILE, timeout_s: float = 30.0) -> int | None:
    """SIGTERM the running hvextd and wait for it to exit; its PID, or None when none ran.

    A stale pid file is removed. If hvextd outlives *timeout_s* the pid file is
    kept and :class:`ServiceError` says so (nothing is killed harder).
    """
    if not os.path.lexists(pid_file.parent):
        return None
    ensure_run_dir(pid_file.parent)
    with _locked(pid_file):
        return _stop(pid_file, timeout_s)


def _stop(pid_file: Path, timeout_s: float) -> int | None:
    current = status(pid_file)
    if not current.running:
        _remove_stale(pid_file, current)
        return None
    pid = current.pid
    assert pid is not None
    ref = procs.identify(pid)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while ref is not None and procs.identify(pid) == ref:
        if time.monotonic() >= deadline:
            raise ServiceError(f"hvextd (PID {pid}) did not exit within {timeout_s:.0f} s of SIGTERM; "
                               f"see {LOG_FILE}; the pid file {pid_file} is kept")
        time.sleep(0.05)
    if _read_pid(pid_file)[0] == pid:
        pid_file.unlink(missing_ok=True)
    return pid
