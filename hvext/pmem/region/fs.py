"""The region's files and directories: names, creation, the marker, the lock."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from hvext import durable, paths
from hvext.pmem.region.errors import RegionBusy, RegionIOError, RegionUsageError

DB_NAME = "region.db"
LOCK_NAME = "region.lock"
NVM_DATA = "nvm.dat"
MASS_DATA = "mass.dat"
MASS_ID = "region.id"


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_empty(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_marker(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise RegionIOError(f"cannot read region marker {path}") from err


def tmp_db_region_id(path: str) -> str | None:
    """The region id in an interrupted ``create``'s temporary database."""
    if not os.path.exists(path):
        return None
    try:
        conn = sqlite3.connect(path)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'region_id'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def remove_files(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def lock_region(nvm_dir: str) -> int:
    """Take the region's exclusive lock; the fd holds it until closed."""
    path = os.path.join(nvm_dir, LOCK_NAME)
    try:
        return durable.lock_file(path, wait=0)
    except BlockingIOError as err:
        raise RegionBusy(f"the region in {nvm_dir} is open elsewhere") from err
    except OSError as err:
        raise RegionIOError(f"cannot lock {path}") from err


def make_region_dirs(*dirs: str) -> None:
    """Create the region's directories 0700 with :func:`hvext.paths.private_dir` (missing parents
    with default modes): they may be user-given places in world-writable ``/dev/shm``, and hold
    guest data, so a link, or a directory someone else owns or can write, is refused."""
    for directory in dirs:
        try:
            os.makedirs(os.path.dirname(directory), exist_ok=True)
            paths.private_dir(Path(directory), mode=0o700)
        except paths.UnsafePathError as err:
            raise RegionUsageError(str(err)) from err
        except OSError as err:
            raise RegionIOError(f"cannot create region directory {directory}: {err}") from err
