"""Copy the pages on a dirty page list from a guest's RAM file to a target (C19, reusable by C17/C18).

The source is the file holding guest RAM (``share=on``: QEMU's mapping and the host's reads see the
same page cache), opened without following links; page *n* of the RAM block is at byte ``n * page_size``
of the file. A :class:`Target` receives (offset, bytes) writes: :class:`LocalFileTarget` is a private
(0600) sparse file on this host; a peer target (the C17 standby over :mod:`hvext.ha.peer`'s
authenticated transport) implements the same four methods. Copies are batched: consecutive pages
(one run) are read and written in chunks of at most :data:`CHUNK` bytes.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hvext.errors import HAError

CHUNK = 1 << 20


class MirrorTargetError(HAError):
    """The mirror copy is missing, replaced or cannot be written."""


class RamSourceError(HAError):
    """The guest's RAM file cannot be opened or read."""


class Target(Protocol):
    """Where synced pages go: a local file now, a standby host later."""

    def write(self, offset: int, data: bytes) -> None: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _check_private_file(fd: int, path: Path) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise MirrorTargetError(f"{path} is not a private (0600) regular file of hvext's user")
    return st


#: Bytes after the copied RAM holding the copy's random identity (an inode number is reused at once).
TRAILER = 4096
TOKEN_BYTES = 16


class LocalFileTarget:
    """A mirror copy in a private file: the RAM file's size, then a trailer with a random token checked on
    every open, so a removed or replaced copy is noticed (:class:`MirrorTargetError`), never silently
    recreated or written into."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def create(cls, path: Path, size: int) -> tuple[LocalFileTarget, str]:
        """A new, empty (sparse) copy of *size* bytes at *path*; (target, its token)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise MirrorTargetError(f"cannot create the mirror copy {path}: {err.strerror}") from err
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, size + TRAILER)
            token = os.urandom(TOKEN_BYTES)
            os.pwrite(fd, token, size)
        except OSError as err:
            os.close(fd)
            os.unlink(path)
            raise MirrorTargetError(f"cannot size the mirror copy {path}: {err.strerror}") from err
        return cls(path, fd), token.hex()

    @classmethod
    def open(cls, path: Path, token: str, size: int) -> LocalFileTarget:
        """The existing copy at *path*, refused unless it is the file (token) the mirror made, of *size* bytes."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise MirrorTargetError(f"the mirror copy {path} is missing: mirroring stopped "
                                    "(start it again with `hvext ha mirror`)") from None
        except OSError as err:
            raise MirrorTargetError(f"cannot open the mirror copy {path}: {err.strerror}") from err
        try:
            st = _check_private_file(fd, path)
            if st.st_size != size + TRAILER or os.pread(fd, TOKEN_BYTES, size).hex() != token:
                raise MirrorTargetError(f"{path} is not the mirror copy hvext made (replaced or resized): "
                                        "mirroring stopped")
        except OSError as err:
            os.close(fd)
            raise MirrorTargetError(f"cannot read the mirror copy {path}: {err.strerror}") from err
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def write(self, offset: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as err:
            raise MirrorTargetError(f"cannot write the mirror copy {self.path}: {err.strerror}") from err

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as err:
            raise MirrorTargetError(f"cannot read the mirror copy {self.path}: {err.strerror}") from err
        if len(data) != length:
            raise MirrorTargetError(f"the mirror copy {self.path} is shorter than guest RAM")
        return data

    def flush(self) -> None:
        """Nothing: the copy protects against memory errors, not host crashes (it is lost with the host)."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_source(path: Path, size: int, *, writable: bool = False) -> int:
    """The guest RAM file (no link followed), checked to be a regular file of at least *size* bytes."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise RamSourceError(f"cannot open the guest RAM file {path}: {err.strerror}") from err
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size < size:
        os.close(fd)
        raise RamSourceError(f"{path} is not a regular file of at least {size} bytes (guest RAM)")
    return fd


@dataclass(frozen=True)
class CopyResult:
    pages: int
    bytes: int
    seconds: float


def copy_runs(source_fd: int, runs: tuple[tuple[int, int], ...], page_size: int, target: Target,
              *, skip: frozenset[int] = frozenset()) -> CopyResult:
    """Copy the pages of *runs* (first page, count) from *source_fd* to *target* at the same offsets, except
    the pages in *skip* (e.g. a page with a memory error: it must not be read)."""
    started = time.perf_counter()
    copied = 0
    for first, count in runs:
        pieces = [(first, count)]
        if skip:
            pieces, start = [], first
            for page in sorted(p for p in skip if first <= p < first + count):
                if page > start:
                    pieces.append((start, page - start))
                start = page + 1
            if start < first + count:
                pieces.append((start, first + count - start))
        for begin, length in pieces:
            offset, end = begin * page_size, (begin + length) * page_size
            while offset < end:
                size = min(CHUNK, end - offset)
                try:
                    data = os.pread(source_fd, size, offset)
                except OSError as err:
                    raise RamSourceError(f"cannot read guest RAM at {offset:#x}: {err.strerror}") from err
                if len(data) != size:
                    raise RamSourceError(f"guest RAM file ended at {offset + len(data):#x}")
                target.write(offset, data)
                offset += size
            copied += length
    target.flush()
    return CopyResult(copied, copied * page_size, time.perf_counter() - started)
