"""Durable-file mechanics: fsync of a directory, atomic replacement of a file, flock lock files.

One behaviour for every part of hvext that must survive a crash. Standard library only and
importing nothing of hvext, so that :mod:`hvext.rvm` (copied into the guest image with this
module) and the guest agent may use it.

Directories are the caller's to create safely (on the host with
:func:`hvext.paths.private_dir`); the files made here never follow a link in
their last component, so a name planted in a shared directory is refused, not
followed.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

__all__ = ["atomic_write", "fsync_dir", "lock_file", "locked", "temp_pattern"]

#: Steps of :func:`atomic_write`, in order; ``_step_hook`` is called with each.
STEPS = ("created", "written", "synced", "renamed", "dir-synced")

#: Test hook: called with each step of :func:`atomic_write`. A crash test installs one that
#: SIGKILLs the process; an error test one that raises.
_step_hook: Callable[[str], None] | None = None

_CHUNK = 1 << 20
_POLL_S = 0.2


def _step(name: str) -> None:
    if _step_hook is not None:
        _step_hook(name)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the entries of *directory* durable (a file created, renamed or removed in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_pattern(name: str) -> str:
    """A regular expression matching the temporary names :func:`atomic_write` uses for a file *name*
    (``.<name>.tmp-<pid>-<8 hex digits>``), for code that recognises its own leftovers."""
    return rf"\.{re.escape(name)}\.tmp-\d+-[0-9a-f]{{8}}"


def atomic_write(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *, mode: int = 0o600) -> None:
    """Replace *path* with *data* so that a crash leaves the old or the new contents, never a mix.

    The data goes to a new file of a unique name in the same directory (``O_EXCL |
    O_NOFOLLOW``, exactly *mode* whatever the umask), which is fsynced, renamed over *path*, and
    then the directory is fsynced. On any error the temporary file is removed and the error
    raised; *path* is then untouched (unless only the final directory fsync failed).
    """
    view = memoryview(data).cast("B")
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            _step("created")
            while view:
                n = os.write(fd, view[:_CHUNK])
                view = view[n:]
            _step("written")
            os.fsync(fd)
        finally:
            os.close(fd)
        _step("synced")
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _step("renamed")
    fsync_dir(directory)
    _step("dir-synced")


def lock_file(path: str | os.PathLike[str], *, wait: float | None = None, mode: int = 0o600) -> int:
    """Take an exclusive ``flock`` on lock file *path*; the returned descriptor holds it until closed.

    The file is created with *mode* if missing and never opened through a symlink (ELOOP).
    *wait* None blocks until the lock is free; otherwise the lock is retried for up to *wait*
    seconds (0: once), then :class:`BlockingIOError` is raised. Any other failure is an OSError.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        if wait is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(_POLL_S, left))
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def locked(path: str | os.PathLike[str], *, wait: float | None = None, mode: int = 0o600) -> Iterator[int]:
    """:func:`lock_file` for the duration of a ``with`` block (yields the descriptor)."""
    fd = lock_file(path, wait=wait, mode=mode)
    try:
        yield fd
    finally:
        os.close(fd)
