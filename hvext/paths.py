"""Where hvext keeps things on the host; each overridable by an environment variable."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from hvext.errors import HostError

#: The source tree (guest-agent/, qemu-patches/ live next to the package).
SOURCE_DIR = Path(os.environ.get("HVEXT_SOURCE_DIR", Path(__file__).resolve().parents[1]))
#: Built artifacts that can be rebuilt from inputs (guest images, QEMU builds).
CACHE_DIR = Path(os.environ.get("HVEXT_CACHE_DIR", "/var/cache/hvext"))
#: Per-domain state: disk overlays, sockets for hvext's QMP monitor.
STATE_DIR = Path(os.environ.get("HVEXT_STATE_DIR", "/var/lib/hvext"))
#: Guest console logs (written by libvirt's virtlogd).
LOG_DIR = Path(os.environ.get("HVEXT_LOG_DIR", "/var/log/hvext"))
#: Volatile (RAM) backings of PMEM devices that hvext saves on power loss.
VOLATILE_DIR = Path(os.environ.get("HVEXT_VOLATILE_DIR", "/dev/shm/hvext"))
#: Where qemu-patches/build.sh installs the patched emulator.
PATCHED_QEMU = Path(os.environ.get("HVEXT_QEMU", "/usr/local/lib/hvext/qemu-system-x86_64"))


def domain_dir(name: str) -> Path:
    """hvext's state for a domain (its disk overlay), shared by the hosts of a lab."""
    return STATE_DIR / "domains" / name


def volatile_dir(name: str, gid: int) -> Path:
    """``VOLATILE_DIR/<name>`` for a domain's RAM-backed PMEM files, made safely in world-writable /dev/shm.

    VOLATILE_DIR is root's, group *gid* (QEMU's) may only pass through it;
    the domain's directory is root's and readable by QEMU's group, to no one
    else. QEMU opens the backings hvext made there but cannot add or rename
    entries: otherwise it could swap a backing for a link that root (a power
    restore) or libvirt (relabelling at start) would then follow.
    """
    if not name or "/" in name or name in (".", ".."):
        raise UnsafePathError(f"domain name {name!r} cannot name a directory")
    VOLATILE_DIR.parent.mkdir(parents=True, exist_ok=True)
    private_dir(VOLATILE_DIR, mode=0o710, gid=gid)
    return private_dir(VOLATILE_DIR / name, mode=0o750, gid=gid)


def runtime_dir(name: str, host_id: str) -> Path:
    """Sockets of a domain's QEMU on one host (QMP, agent channel).

    Keyed by host so that during a migration between hosts that share
    STATE_DIR the destination's QEMU does not take over the source's sockets.
    """
    return domain_dir(name) / f"on-{host_id}"


def console_log(name: str, host_id: str) -> Path:
    return LOG_DIR / "console" / f"{name}.{host_id}.log"


class UnsafePathError(HostError):
    """A path hvext would create or use is a symlink, or someone else owns or can use it."""


def private_dir(path: Path, *, mode: int = 0o700, gid: int | None = None, exclusive: bool = False) -> Path:
    """Create (or check) directory *path*, owned by root, never following a link.

    For directories in places other users can write (``/dev/shm``) or that
    QEMU's user can write: the last component is made with ``mkdir`` and
    opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent, then
    checked on the open descriptor. A symlink, a non-directory, a directory
    owned by another user, or one that others could write (world-writable,
    or group-writable by a group other than *gid*) is refused
    with :class:`UnsafePathError`; an accepted one gets exactly *mode* (extra
    read bits of an older hvext's directory are dropped) and, when *gid* is
    given, that group. *mode* must not grant world access.
    With *exclusive*, a directory that already exists is refused as well
    (FileExistsError), so the caller knows it made it.
    The parent must exist (callers create trusted parents first).
    """
    if mode & 0o007:
        raise ValueError(f"private_dir mode {mode:o} grants world access")
    path = Path(os.path.abspath(path))
    try:
        parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise UnsafePathError(f"cannot open {path.parent} to create {path.name} in it: {err.strerror}") from err
    try:
        created = True
        try:
            os.mkdir(path.name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            if exclusive:
                raise
            created = False
        except OSError as err:
            raise UnsafePathError(f"cannot create {path}: {err.strerror}") from err
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):
                try:
                    is_link = stat.S_ISLNK(os.lstat(path.name, dir_fd=parent_fd).st_mode)
                except OSError:
                    is_link = False
                kind = "a symlink" if is_link else "not a directory"
                raise UnsafePathError(f"{path} is {kind}; hvext will not use it (someone else may have "
                                      "planted it): remove it and retry") from err
            raise UnsafePathError(f"cannot open {path}: {err.strerror}") from err
        try:
            st = os.fstat(fd)
            if not created:
                _check_private(path, st, mode, gid)
            if gid is not None and st.st_gid != gid:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)
    return path


def _check_private(path: Path, st: os.stat_result, mode: int, gid: int | None) -> None:
    """Refuse a pre-existing directory that someone other than us owns or can use beyond *mode*."""
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a directory; hvext will not use it: remove it and retry")
    if st.st_uid != os.geteuid():
        raise UnsafePathError(f"{path} is owned by uid {st.st_uid}, not by hvext's user ({os.geteuid()}): "
                              "someone else may control it; remove it and retry")
    current = stat.S_IMODE(st.st_mode)
    group_ok = gid is not None and st.st_gid == gid  # our own group (an older hvext's 0770): tightened below
    if current & 0o002 or (current & 0o020 and not group_ok):
        who = "every user" if current & 0o002 else f"group {st.st_gid}"
        raise UnsafePathError(f"{path} (mode {current:04o}) is writable by {who}: others may have put files "
                              "or links in it; remove it and retry")
