"""Lightweight Recoverable Virtual Memory: regions, transactions, log, recovery.

Design (see docs/rvm.md for the user's view):

* A mapped region is a private in-memory copy (a ``bytearray`` subclass) of a
  range of an external data segment file. Applications change it directly.
* ``set_range`` copies the old bytes into memory (the undo copy, only for
  ``restore=True``); nothing is written to disk. ``end_transaction`` writes
  one checksummed redo record holding the *new* bytes of every declared range
  (no-undo/redo value logging) with a single ``pwritev``; with ``flush=True``
  it waits for an ``fdatasync`` of the log (group commit: one sync covers
  every record written before it, concurrent committers share it).
* Segment files are only written by truncation and recovery, from the log.
  Truncation closes the current *epoch* (the records up to the log tail),
  makes those records durable, applies them to the segments, syncs the
  segments and only then advances the log head in the header, reclaiming the
  space. New commits go to the next epoch meanwhile; the automatic truncation
  runs in a worker thread.
* Recovery (at ``RVM(...)``) replays every valid record from the head in
  order and stops at the first invalid one (the torn tail), syncs the
  segments, then restarts the log with a fresh salt.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
import time
import zlib
from typing import Any, Callable

from hvext import durable
from hvext.rvm import logformat as lf
from hvext.rvm.errors import (
    RVMAlreadyMappedError,
    RVMClosedError,
    RVMError,
    RVMInactiveTransactionError,
    RVMIOError,
    RVMLogBusyError,
    RVMLogCorruptError,
    RVMLogExistsError,
    RVMLogFullError,
    RVMLogNotFoundError,
    RVMNoRestoreError,
    RVMNotMappedError,
    RVMOptionError,
    RVMRangeError,
    RVMRecoveryError,
    RVMRegionBusyError,
)

_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
# Truncation copies into a shared mapping of the segment (no system call per
# range, no GIL release per range); pwrite is the fallback.
_USE_MMAP = hasattr(mmap, "MAP_SHARED")
_HAVE_PWRITEV = hasattr(os, "pwritev")
# pwritev2's RWF_DSYNC (Linux 4.7+): the write is durable when it returns, as
# with O_DSYNC, for the bytes written (not for the rest of the file). 0: not
# offered, flushed commits use fdatasync.
_RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0) if _HAVE_PWRITEV else 0
# A flushed commit writes its record with RWF_DSYNC, holding the lock through
# the sync, only after this many transactions in a row were begun by the same
# thread: with several committing threads, fdatasync outside the lock lets
# them share syncs (group commit) instead of queueing behind each other's.
_SOLO_COMMITS = 8
_get_ident = threading.get_ident
_IOV_MAX = 1000
_PAD = bytes(lf.ALIGN)
_REC_SIZE = lf.REC.size
_RANGE_SIZE = lf.RANGE.size
_BODY_PACK = lf.REC_BODY.pack
_U32_PACK = lf.U32.pack
_ALIGN_MASK = lf.ALIGN - 1
_crc32 = zlib.crc32
# zlib.crc32 releases the GIL for buffers over 5 KiB. A committer that releases
# the GIL while a background truncation runs gets it back only at the
# truncation's next yield (tens of us, docs/rvm.md), so while one runs a
# joined record is checksummed in pieces that keep it; otherwise in one call.
_CRC_CHUNK = 5 * 1024
_clock = time.perf_counter

# Truncation hands the GIL to committers after this much work (seconds)
# while commits go on (the last one less than _COMMITS_GONE seconds ago); without
# that a committer waits up to the interpreter's switch interval (5 ms) for
# it. time.sleep(0) costs 50-120 us (timer slack), so it is paid neither per
# record nor when nobody commits (a foreground truncate(), close()).
_YIELD_EVERY = 0.000025
_COMMITS_GONE = 0.005

DEFAULT_TRUNCATE_RATIO = 0.5
_OPTIONS = ("truncate_ratio", "background_truncation")


def _random32() -> int:
    """A fresh random 32-bit number (os.urandom: differs in forked processes too)."""
    return int.from_bytes(os.urandom(4), "little")


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite all of ``data`` at ``offset`` (regular files rarely write short)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def _write_iov(fd: int, iov: list, offset: int) -> None:
    """Write the buffers of ``iov`` back to back at ``offset``."""
    if not _HAVE_PWRITEV or len(iov) > _IOV_MAX:
        _write_all(fd, b"".join(iov), offset)
        return
    total = sum(map(len, iov))
    n = os.pwritev(fd, iov, offset)
    if n != total:  # short write: finish the rest the slow way
        _write_all(fd, memoryview(b"".join(iov))[n:], offset + n)


def _zero_fill(fd: int, start: int, end: int) -> None:
    """Write real zero blocks in [start, end) so later writes need no allocation."""
    chunk = bytes(1 << 20)
    pos = start
    while pos < end:
        n = min(len(chunk), end - pos)
        _write_all(fd, memoryview(chunk)[:n], pos)
        pos += n


def create_log(log_path: str | os.PathLike, size: int, *, overwrite: bool = False) -> str:
    """Format an RVM log file of ``size`` bytes at ``log_path``; return its path.

    The file is fully written (not sparse) so that commits never allocate
    blocks, and made durable (file and directory) before returning. An
    existing file is refused unless ``overwrite=True``; then it is replaced
    atomically (rename), discarding whatever it held.
    """
    path = os.path.abspath(os.fspath(log_path))
    if not isinstance(size, int) or isinstance(size, bool):
        raise RVMOptionError(f"log size must be an int number of bytes, not {size!r}")
    if size < lf.MIN_LOG_SIZE:
        raise RVMOptionError(f"log size {size} is below the minimum of {lf.MIN_LOG_SIZE} bytes")
    if os.path.lexists(path) and not overwrite:
        raise RVMLogExistsError(f"{path} exists; pass overwrite=True to replace it")
    if os.path.isdir(path):
        raise RVMLogExistsError(f"{path} is a directory")
    tmp = f"{path}.tmp-{os.getpid()}-{_random32():08x}"
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise RVMIOError(f"cannot create log {path}: {err.strerror}") from err
    try:
        try:
            _zero_fill(fd, 0, size)
            header = lf.LogHeader(size, lf.capacity_for(size), 0, 1, _random32())
            _write_all(fd, lf.pack_header(header), lf.header_offset(header.generation))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        durable.fsync_dir(os.path.dirname(path))
    except OSError as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise RVMIOError(f"cannot create log {path}: {err.strerror}") from err
    return path


class _Segment:
    """An external data segment file opened by the RVM (kept for its lifetime)."""

    __slots__ = ("id", "path", "fd", "key", "regions", "declared", "map", "map_failed")

    def __init__(self, seg_id: int, path: str, fd: int, key: tuple[int, int]) -> None:
        self.id = seg_id
        self.path = path
        self.fd = fd
        self.key = key
        self.regions: list[Region] = []
        self.declared = 0  # epoch in which the segment was last declared in the log
        self.map: mmap.mmap | None = None  # used by truncation only
        self.map_failed = False

    def writer(self, end: int) -> mmap.mmap | None:
        """A shared writable mapping of the file covering [0, end), or None (use pwrite)."""
        m = self.map
        if m is not None and end <= len(m):
            return m
        if not _USE_MMAP or self.map_failed:
            return None
        size = os.fstat(self.fd).st_size
        if size < end:
            return None
        if m is not None:
            m.close()
            self.map = None
        try:
            self.map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError):
            self.map_failed = True  # e.g. a file system without shared writable mappings
        return self.map

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        os.close(self.fd)


class Region(bytearray):
    """A mapped range of a data segment: writable memory, ``len == length``.

    ``memoryview(region)`` gives zero-copy access. The size is fixed while the
    region is mapped (the RVM holds a buffer export, so resizing raises
    ``BufferError``). Changes reach the segment only through committed
    transactions.
    """

    __slots__ = ("_rvm", "_seg", "_base", "_mv", "_path")

    @property
    def segment_path(self) -> str:
        """Absolute path of the segment file."""
        return self._path

    @property
    def offset(self) -> int:
        """Offset of the region in its segment."""
        return self._base

    @property
    def length(self) -> int:
        """Length of the region in bytes."""
        return len(self)

    @property
    def mapped(self) -> bool:
        """True while the region is mapped by an open RVM."""
        return self._rvm is not None

    def __repr__(self) -> str:
        state = "mapped" if self._rvm is not None else "unmapped"
        return f"<rvm.Region {self._path}[{self._base}:{self._base + len(self)}] {state}>"


class _Txn:
    """An active transaction: declared ranges and, with restore, old values.

    What a commit needs is collected as ranges are declared, so that the
    commit loops over nothing in Python: ``table`` flat in the order of the
    record's range table (segment id, length, segment offset per range),
    packed with one ``struct`` call; ``views`` the memoryviews written with
    one ``pwritev``; ``nbytes`` their total length; ``segs`` the segments
    named (each must be declared in the log's current epoch).
    """

    __slots__ = ("tid", "restore", "ranges", "views", "table", "nbytes", "segs")

    def __init__(self, tid: int, restore: bool) -> None:
        self.tid = tid
        self.restore = restore
        # (region, memoryview of the range, old bytes or None)
        self.ranges: list[tuple[Region, memoryview, bytes | None]] = []
        self.views: list[memoryview] = []
        self.table: list[int] = []
        self.nbytes = 0
        self.segs: set[_Segment] = set()


class Transaction:
    """Context-manager form of a transaction: commit on success, abort on error.

    ``with rvm.transaction() as t: t.set_range(region, off, n)[:] = data``.
    If the block (or the commit at its end) raises, a ``restore=True``
    transaction is aborted (memory put back); a ``restore=False`` one cannot
    be, so it is discarded: it is never committed, and the memory keeps the
    changes made in the block.
    """

    def __init__(self, rvm: "RVM", restore: bool = True, flush: bool = True) -> None:
        self._rvm = rvm
        self.restore = restore
        self.flush = flush
        self.tid: int | None = None

    def __enter__(self) -> "Transaction":
        self.tid = self._rvm.begin_transaction(restore=self.restore)
        return self

    def set_range(self, region: Region, offset: int, length: int) -> memoryview:
        """Declare a range (see :meth:`RVM.set_range`); returns a view of it."""
        return self._rvm.set_range(self._tid(), region, offset, length)

    def commit(self, flush: bool | None = None) -> None:
        """Commit now (``flush`` defaults to the one given at creation)."""
        self._rvm.end_transaction(self._tid(), flush=self.flush if flush is None else flush)

    def abort(self) -> None:
        """Abort now, restoring the old values."""
        self._rvm.abort_transaction(self._tid())

    def _tid(self) -> int:
        if self.tid is None:
            raise RVMInactiveTransactionError("the transaction has not begun (use it in a with block)")
        return self.tid

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.tid is None or not self._rvm._is_active(self.tid):
            return
        if exc_type is None:
            try:
                self.commit()
                return
            except BaseException:
                if self._rvm._is_active(self.tid):  # e.g. log full: undo, then report
                    self._undo()
                raise
        self._undo()

    def _undo(self) -> None:
        if self.restore:
            self._rvm.abort_transaction(self._tid())
        else:
            self._rvm._discard(self._tid())


class RVM:
    """One recoverable virtual memory instance bound to one log file.

    Constructing it opens the log (exclusively, with ``flock``) and runs
    crash recovery. Options (also for :meth:`set_options`):

    ``truncate_ratio`` (float in (0, 1], default 0.5, or None to disable)
        start an automatic truncation when the log is this full.
    ``background_truncation`` (bool, default True)
        run automatic truncations in a worker thread alongside forward
        processing; False runs them in the committing thread.

    A log that is full always triggers a truncation in the committer,
    whatever the options.
    """

    def __init__(self, log_path: str | os.PathLike, **options: Any) -> None:
        self._truncate_ratio: float | None = DEFAULT_TRUNCATE_RATIO
        self._background = True
        self._check_options(options)
        self._path = os.path.abspath(os.fspath(log_path))
        self._fd = -1
        self._closed = True
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError as err:
            raise RVMLogNotFoundError(f"no RVM log at {self._path}; format one with create_log") from err
        except OSError as err:
            raise RVMIOError(f"cannot open log {self._path}: {err.strerror}") from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise RVMLogBusyError(f"{self._path} is in use by another RVM") from err
            try:
                header = lf.read_header(fd, self._path)
            except OSError as err:
                raise RVMIOError(f"cannot read log {self._path}: {err.strerror}") from err
            self._fd = fd
            self._header = header
            self._cap = header.capacity
            self._recover()
        except BaseException:
            os.close(fd)
            self._fd = -1
            raise
        self._apply_options(options)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._hdr_lock = threading.Lock()
        self._sync_mutex = threading.Lock()
        self._synced = self._tail
        self._truncating = False
        self._epoch = 1
        self._segs: list[_Segment] = []
        self._seg_by_key: dict[tuple[int, int], _Segment] = {}
        self._active: dict[int, _Txn] = {}
        self._committing: dict[int, _Txn] = {}
        self._next_tid = 1
        self._unmapped_dirty: list[tuple[_Segment, int, int, int]] = []
        self._broken: BaseException | None = None
        self._bg_error: BaseException | None = None
        self._worker: threading.Thread | None = None
        self._wake = threading.Event()
        self._stats = {"commits": 0, "truncations": 0, "syncs": 0}
        self._last_commit = 0.0  # _clock() of the last commit (truncation yields the GIL after one)
        self._dsync = bool(_RWF_DSYNC)  # False once the file system refused RWF_DSYNC
        self._last_thread = 0  # the thread that began the last transaction
        self._solo = 0  # transactions begun in a row by that thread, minus one
        self._closed = False

    # ------------------------------------------------------------------ options

    @staticmethod
    def _check_options(options: dict[str, Any]) -> None:
        for name, value in options.items():
            if name not in _OPTIONS:
                raise RVMOptionError(f"unknown RVM option {name!r}; known: {', '.join(_OPTIONS)}")
            if name == "truncate_ratio" and value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                    raise RVMOptionError(f"truncate_ratio must be in (0, 1] or None, not {value!r}")
            if name == "background_truncation" and not isinstance(value, bool):
                raise RVMOptionError(f"background_truncation must be a bool, not {value!r}")

    def _apply_options(self, options: dict[str, Any]) -> None:
        if "truncate_ratio" in options:
            value = options["truncate_ratio"]
            self._truncate_ratio = None if value is None else float(value)
        if "background_truncation" in options:
            self._background = options["background_truncation"]

    def set_options(self, **options: Any) -> None:
        """Change options (see the class docstring); unknown or bad ones raise RVMOptionError."""
        self._check_options(options)
        with self._lock:
            self._check_open()
            self._apply_options(options)
        self._maybe_truncate()

    def query_options(self, region: Region | None = None) -> dict[str, Any]:
        """Options and state of the RVM, or of one mapped region."""
        with self._lock:
            self._check_open()
            if region is not None:
                self._check_region(region)
                return {
                    "segment_path": region._path,
                    "offset": region._base,
                    "length": len(region),
                    "active_transactions": sum(
                        1 for t in self._active.values() if any(r[0] is region for r in t.ranges)
                    ),
                }
            used = self._tail - self._head
            return {
                "log_path": self._path,
                "log_size": self._header.log_size,
                "log_capacity": self._cap,
                "log_used": used,
                "log_fill": used / self._cap,
                "truncate_ratio": self._truncate_ratio,
                "background_truncation": self._background,
                "truncating": self._truncating,
                "epoch": self._epoch,
                "head_lsn": self._head,
                "tail_lsn": self._tail,
                "synced_lsn": self._synced,
                "regions": [r for s in self._segs for r in s.regions],
                "segments": [s.path for s in self._segs],
                "active_transactions": len(self._active),
                "format_version": lf.VERSION,
                **self._stats,
            }

    # ----------------------------------------------------------------- recovery

    def _recover(self) -> None:
        """Replay valid records from the head into the segments; restart the log."""
        fd, h = self._fd, self._header
        try:
            _fdatasync(fd)  # records must be durable before segments reflect them
            file_size = os.fstat(fd).st_size
        except OSError as err:
            raise RVMIOError(f"cannot sync log {self._path}: {err.strerror}") from err
        scanner = lf.Scanner(fd, h.capacity, h.salt, file_size)
        paths: dict[int, bytes] = {}
        seg_fds: dict[bytes, int] = {}
        try:
            for rec in scanner.scan(h.head_lsn):
                if rec.kind == lf.KIND_SEG:
                    paths[rec.count] = rec.path
                    continue
                for seg_id, off, data in rec.ranges:
                    path = paths.get(seg_id)
                    if path is None:
                        raise RVMLogCorruptError(
                            f"{self._path}: record at LSN {rec.lsn} names undeclared segment {seg_id}"
                        )
                    sfd = seg_fds.get(path)
                    if sfd is None:
                        try:
                            sfd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                        except FileNotFoundError as err:
                            raise RVMRecoveryError(
                                f"segment {os.fsdecode(path)} named by the log is missing; restore it "
                                "(an empty file will do) or discard the log with create_log(overwrite=True)"
                            ) from err
                        seg_fds[path] = sfd
                    _write_all(sfd, data, off)
            for sfd in seg_fds.values():
                os.fsync(sfd)
            if file_size < h.log_size:  # the file was cut short: put the ring back
                _zero_fill(fd, file_size, h.log_size)
            end = scanner.end_lsn
            # Restart past anything ever written, with a fresh salt, so stale
            # or torn records can never validate again.
            head = (end // h.capacity + 2) * h.capacity
            new = lf.LogHeader(h.log_size, h.capacity, head, h.generation + 1, _random32())
            _write_all(fd, lf.pack_header(new), lf.header_offset(new.generation))
            _fdatasync(fd)
        except OSError as err:
            raise RVMIOError(f"crash recovery of {self._path} failed: {err.strerror}") from err
        finally:
            for sfd in seg_fds.values():
                os.close(sfd)
        self._header = new
        self._salt = new.salt
        self._head = head
        self._tail = head

    # -------------------------------------------------------------- map, unmap

    def map(self, segment_path: str | os.PathLike, length: int, offset: int = 0) -> Region:
        """Map ``length`` bytes of a segment file at ``offset``; create the file if absent.

        Returns a Region holding the segment's committed contents. Mapping a
        range that overlaps a mapped one (of the same file, whatever the
        path) raises RVMAlreadyMappedError.
        """
        if not isinstance(length, int) or not isinstance(offset, int) or length <= 0 or offset < 0:
            raise RVMRangeError(f"bad mapping length {length!r} / offset {offset!r}")
        path = os.path.realpath(os.fspath(segment_path))
        with self._lock:
            self._check_open()
            created = False
            try:
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    created = True
                st = os.fstat(fd)
            except OSError as err:
                raise RVMIOError(f"cannot open segment {path}: {err.strerror}") from err
            key = (st.st_dev, st.st_ino)
            seg = self._seg_by_key.get(key)
            if seg is not None:
                os.close(fd)
                for other in seg.regions:
                    if offset < other._base + len(other) and other._base < offset + length:
                        raise RVMAlreadyMappedError(
                            f"{path}[{offset}:{offset + length}] overlaps mapped "
                            f"[{other._base}:{other._base + len(other)}]"
                        )
            else:
                seg = _Segment(len(self._segs), path, fd, key)
                self._segs.append(seg)
                self._seg_by_key[key] = seg
            try:
                if st.st_size < offset + length:
                    os.ftruncate(seg.fd, offset + length)
                    os.fsync(seg.fd)
                if created:
                    durable.fsync_dir(os.path.dirname(path))
            except OSError as err:
                raise RVMIOError(f"cannot size segment {path}: {err.strerror}") from err
            region = Region(length)
            region._rvm = None
            region._seg = seg
            region._base = offset
            region._path = path
            region._mv = memoryview(region)
            seg.regions.append(region)  # reserves the range while we read
            try:
                self._wait_unmapped_applied(seg, offset, offset + length)
            except BaseException:
                seg.regions.remove(region)
                raise
        try:
            view = region._mv
            pos = 0
            while pos < length:
                n = os.preadv(seg.fd, [view[pos:]], offset + pos)
                if n <= 0:
                    break  # past EOF (cannot happen after ftruncate): zeros
                pos += n
        except OSError as err:
            with self._lock:
                seg.regions.remove(region)
            raise RVMIOError(f"cannot read segment {path}: {err.strerror}") from err
        region._rvm = self
        return region

    def _wait_unmapped_applied(self, seg: _Segment, start: int, end: int) -> None:
        """Lock held. Make sure records of earlier mappings of [start, end) are in the segment."""
        if not self._unmapped_dirty:
            return
        while any(
            s is seg and a < end and start < b and lsn > self._head for s, a, b, lsn in self._unmapped_dirty
        ):
            self._truncate_all_locked()
        self._unmapped_dirty = [e for e in self._unmapped_dirty if e[3] > self._head]

    def unmap(self, region: Region) -> None:
        """Unmap a region. Its committed changes stay in the log until truncation."""
        with self._lock:
            self._check_open()
            self._check_region(region)
            for txn in (*self._active.values(), *self._committing.values()):
                if any(r[0] is region for r in txn.ranges):
                    raise RVMRegionBusyError(f"transaction {txn.tid} has ranges in {region!r}")
            seg = region._seg
            seg.regions.remove(region)
            if self._tail > self._head:
                self._unmapped_dirty.append((seg, region._base, region._base + len(region), self._tail))
            self._release_region(region)

    @staticmethod
    def _release_region(region: Region) -> None:
        region._rvm = None
        try:
            region._mv.release()
        except BufferError:
            pass  # views handed out by set_range are still alive; they keep it pinned

    def _check_region(self, region: Any) -> None:
        if not isinstance(region, Region) or region._rvm is not self:
            raise RVMNotMappedError(f"{region!r} is not a region mapped by this RVM")

    # ------------------------------------------------------------ transactions

    def begin_transaction(self, restore: bool = True) -> int:
        """Start a transaction; return its id. ``restore=False`` is no_restore mode."""
        # acquire/release rather than ``with``: half the cost on this hot path
        lock = self._lock
        lock.acquire()
        try:
            if self._closed:
                self._check_open()
            tid = self._next_tid
            self._next_tid = tid + 1
            self._active[tid] = _Txn(tid, bool(restore))
            ident = _get_ident()
            if ident == self._last_thread:
                self._solo += 1
            else:
                self._last_thread = ident
                self._solo = 0
            return tid
        finally:
            lock.release()

    def transaction(self, restore: bool = True, flush: bool = True) -> Transaction:
        """A context manager running a transaction (see :class:`Transaction`)."""
        return Transaction(self, restore, flush)

    def set_range(self, tid: int, region: Region, offset: int, length: int) -> memoryview:
        """Declare that transaction ``tid`` will change ``region[offset:offset+length]``.

        With restore mode the old bytes are copied (in memory only). Returns a
        writable memoryview of the range for convenience.
        """
        lock = self._lock
        lock.acquire()
        try:
            txn = self._active.get(tid)
            if txn is None:
                self._check_open()
                raise RVMInactiveTransactionError(f"transaction {tid!r} is not active")
            if not isinstance(region, Region) or region._rvm is not self:
                raise RVMNotMappedError(f"{region!r} is not a region mapped by this RVM")
            if (
                type(offset) is not int
                or type(length) is not int
                or not 0 <= offset < offset + length <= len(region)
            ):
                raise RVMRangeError(
                    f"range [{offset!r}:+{length!r}] is outside region of length {len(region)}"
                )
            view = region._mv[offset : offset + length]
            seg = region._seg
            txn.ranges.append((region, view, bytes(view) if txn.restore else None))
            txn.views.append(view)
            txn.table += (seg.id, length, region._base + offset)
            txn.nbytes += length
            txn.segs.add(seg)
            return view
        finally:
            lock.release()

    def abort_transaction(self, tid: int) -> None:
        """Abort: put back the old values of every declared range (restore mode only)."""
        with self._lock:
            txn = self._active.get(tid)
            if txn is None:
                self._check_open()
                raise RVMInactiveTransactionError(f"transaction {tid!r} is not active")
            if not txn.restore:
                raise RVMNoRestoreError(
                    f"transaction {tid} was begun with restore=False and cannot be aborted"
                )
            del self._active[tid]
            for _region, view, old in reversed(txn.ranges):
                view[:] = old

    def _discard(self, tid: int) -> None:
        """Forget an active transaction without committing or restoring it."""
        with self._lock:
            self._active.pop(tid, None)

    def _is_active(self, tid: int) -> bool:
        return tid in self._active

    def end_transaction(self, tid: int, flush: bool = True) -> None:
        """Commit: log the new values of every declared range as one record.

        With ``flush=True`` the record (and every earlier one) is durable when
        this returns; ``flush=False`` (no_flush) returns once the record is in
        the log file, and it becomes durable at the next flush, flushed
        commit or truncation.
        """
        lock = self._lock
        lock.acquire()
        try:
            txn = self._active.pop(tid, None)
            if txn is None:
                self._check_open()
                raise RVMInactiveTransactionError(f"transaction {tid!r} is not active")
            if txn.views:
                try:
                    end = self._append_txn_locked(txn, flush and self._solo >= _SOLO_COMMITS)
                except BaseException:
                    if not self._closed:
                        self._active[tid] = txn  # still active: the caller may abort it
                    raise
                self._stats["commits"] += 1
                self._last_commit = _clock()
            else:
                end = self._tail
            ratio = self._truncate_ratio
            need_truncate = (
                ratio is not None and not self._truncating and end - self._head >= ratio * self._cap
            )
        finally:
            lock.release()
        if flush and self._synced < end:
            self._sync_to(end)
        if need_truncate:
            self._maybe_truncate()

    # ---------------------------------------------------------------- the log

    def _append_txn_locked(self, txn: _Txn, dsync: bool = False) -> int:
        """Lock held. Write the record (and the segment declarations the epoch lacks).

        The fast path (no declaration due, no wrap, room enough) is one
        ``pwritev``: the crc, then the record header and the range table
        packed in one call, then with one range the memoryview of the
        region's bytes (no copy), with several those views joined into the
        packed bytes (one copy costs less than an iovec entry and a crc32
        call per range).

        ``dsync``: the caller wants the record durable. If every earlier
        record already is, the write itself makes it durable (``RWF_DSYNC``:
        one system call instead of ``pwritev`` and ``fdatasync``) and
        ``_synced`` moves past it; otherwise the caller syncs as usual.
        """
        cap = self._cap
        views = txn.views
        count = len(views)
        used = _REC_SIZE + _RANGE_SIZE * count + txn.nbytes
        size = (used + _ALIGN_MASK) & ~_ALIGN_MASK
        lsn = self._tail
        if (
            self._broken is None
            and not self._closed
            and size <= cap - lsn % cap
            and lsn + size - self._head <= cap
        ):
            epoch = self._epoch
            for seg in txn.segs:
                if seg.declared != epoch:
                    break
            else:  # fast path
                # The record header without its crc, and the range table: one pack.
                body = lf.txn_body(count).pack(lf.KIND_TXN, 0, size, count, lsn, *txn.table)
                pad = _PAD[: size - used]
                if count == 1:
                    view = views[0]
                    iov = [_U32_PACK(_crc32(pad, _crc32(view, _crc32(body, self._salt)))), body, view, pad]
                else:
                    rest = b"".join([body, *views, pad])  # see the docstring
                    if len(rest) <= _CRC_CHUNK or not self._truncating:
                        crc = _crc32(rest, self._salt)
                    else:  # keep the GIL (see _CRC_CHUNK)
                        whole, crc = memoryview(rest), self._salt
                        for i in range(0, len(rest), _CRC_CHUNK):
                            crc = _crc32(whole[i : i + _CRC_CHUNK], crc)
                    iov = [_U32_PACK(crc), rest]
                dsync = dsync and self._dsync and self._synced >= lsn
                pos = lf.DATA_START + lsn % cap
                try:
                    if dsync:
                        n = self._write_dsync(iov, pos)
                        dsync = n == size and self._dsync
                    else:
                        n = os.pwritev(self._fd, iov, pos)
                    if n != size:  # short write: finish the rest the slow way
                        _write_all(self._fd, memoryview(b"".join(iov))[n:], pos + n)
                except OSError as err:
                    raise RVMIOError(f"cannot write to log {self._path}: {err.strerror}") from err
                end = self._tail = lsn + size
                if dsync and end > self._synced:
                    self._synced = end
                    self._stats["syncs"] += 1
                return end
        # Slow path: segment declarations, a wrap, or waiting for room (the
        # lock may be released meanwhile: unmap must see the transaction).
        targs = txn.table
        table = lf.range_table(count).pack(*targs)
        self._committing[txn.tid] = txn
        try:
            return self._append_slow_locked(targs, table, views, used, size)
        finally:
            del self._committing[txn.tid]

    def _append_slow_locked(self, targs: list[int], table: bytes, views: list, used: int, size: int) -> int:
        """Lock held (maybe released meanwhile). Lay out and write declarations and the record."""
        cap = self._cap
        payload = [table, *views]
        if size != used:
            payload.append(_PAD[: size - used])
        count = len(views)
        seg_ids = sorted({*targs[0::3]})
        while True:
            self._check_open()
            self._raise_if_broken()
            epoch = self._epoch
            decls = [self._segs[i] for i in seg_ids if self._segs[i].declared != epoch]
            lsn = self._tail
            records = [(lf.KIND_SEG, seg.id, [os.fsencode(seg.path)]) for seg in decls]
            records.append((lf.KIND_TXN, count, payload))
            sizes = [lf.aligned(_REC_SIZE + len(rec[2][0])) for rec in records[:-1]] + [size]
            total = sum(sizes)
            if total > cap:
                raise RVMLogFullError(
                    f"a commit of {total} bytes can never fit in a log ring of {cap} bytes; "
                    "use a larger log (create_log) or smaller transactions"
                )
            # Lay the records out in the ring (wrapping where needed).
            layout: list[int] = []  # LSN of each record
            wraps: list[int] = []  # LSNs of the wrap records to write
            for rec_size in sizes:
                room = cap - lsn % cap
                if rec_size > room:
                    if room >= _REC_SIZE:
                        wraps.append(lsn)
                    lsn += room
                layout.append(lsn)
                lsn += rec_size
            if lsn - self._head > cap:
                self._make_room_locked()
                continue  # the epoch may have changed: redo the declarations
            self._write_records(records, sizes, layout, wraps)
            self._tail = lsn
            for seg in decls:
                seg.declared = epoch
            return lsn

    def _write_records(self, records: list, sizes: list[int], layout: list, wraps: list[int]) -> None:
        """Write laid-out records, one pwritev per physically contiguous run."""
        cap, salt, fd = self._cap, self._salt, self._fd
        iov: list = []
        run_start = -1
        run_end = -1

        def flush_run() -> None:
            if iov:
                _write_iov(fd, iov, lf.physical(run_start, cap))
                iov.clear()

        try:
            for w in wraps:
                body = _BODY_PACK(lf.KIND_WRAP, 0, _REC_SIZE, 0, w)
                _write_all(fd, _U32_PACK(lf.record_crc(body, [], salt)) + body, lf.physical(w, cap))
            for (kind, count, parts), size, lsn in zip(records, sizes, layout):
                if lsn != run_end or lsn % cap == 0:  # a run never crosses the ring's end
                    flush_run()
                    run_start = lsn
                pad = size - _REC_SIZE - sum(map(len, parts))
                if pad:
                    parts = parts + [_PAD[:pad]]
                body = _BODY_PACK(kind, 0, size, count, lsn)
                iov.append(_U32_PACK(lf.record_crc(body, parts, salt)))
                iov.append(body)
                iov.extend(parts)
                run_end = lsn + size
            flush_run()
        except OSError as err:
            raise RVMIOError(f"cannot write to log {self._path}: {err.strerror}") from err

    def _make_room_locked(self) -> None:
        """Lock held. Free log space: wait for, or run, a truncation; or realign an empty ring."""
        if self._truncating:
            self._cond.wait()
        elif self._tail > self._head:
            self._truncate_locked()
        else:
            self._realign_locked()

    def _realign_locked(self) -> None:
        """Lock held, log empty: move head and tail to the start of the ring."""
        cap = self._cap
        if self._tail % cap == 0:
            return
        new_head = (self._tail // cap + 1) * cap
        self._write_header(new_head)
        self._head = self._tail = new_head

    def _write_header(self, head: int) -> None:
        """Durably record a new head LSN (alternate header slot)."""
        with self._hdr_lock:
            h = self._header
            new = lf.LogHeader(h.log_size, h.capacity, head, h.generation + 1, h.salt)
            try:
                _write_all(self._fd, lf.pack_header(new), lf.header_offset(new.generation))
                _fdatasync(self._fd)
            except OSError as err:
                self._broken = err
                raise RVMIOError(f"cannot write the header of {self._path}: {err.strerror}") from err
            self._header = new

    def _write_dsync(self, iov: list, pos: int) -> int:
        """Lock held. pwritev with RWF_DSYNC; falls back to a plain pwritev if refused."""
        try:
            return os.pwritev(self._fd, iov, pos, _RWF_DSYNC)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                self._broken = err  # the data may be written, its sync failed: as a failed fdatasync
                raise
        self._dsync = False  # not offered here: fdatasync from now on
        return os.pwritev(self._fd, iov, pos)

    def _sync_to(self, lsn: int) -> None:
        """Make the log durable up to ``lsn``; concurrent callers share one fdatasync.

        Group commit: the sync mutex serialises the fdatasyncs; a thread that
        finds one running waits on the mutex, and the first of the waiters
        then syncs everything written meanwhile (the tail as it is then), so
        the others find their records covered and return without a sync.
        """
        with self._sync_mutex:
            if self._synced >= lsn:
                return
            self._raise_if_broken()
            target = self._tail  # every record below the tail is completely written
            try:
                _fdatasync(self._fd)
            except OSError as err:
                # After a failed fdatasync the kernel may have dropped the
                # dirty pages: nothing written since the last sync is safe.
                self._broken = err
                raise RVMIOError(f"fdatasync of log {self._path} failed: {err.strerror}") from err
            self._stats["syncs"] += 1
            if target > self._synced:
                self._synced = target

    def flush(self) -> None:
        """Make every commit made so far (no_flush ones included) durable."""
        self._check_open()
        self._raise_bg_error()
        self._sync_to(self._tail)

    # -------------------------------------------------------------- truncation

    def truncate(self) -> None:
        """Apply every commit made so far to the segments and reclaim its log space.

        Commits from other threads proceed meanwhile (into the next epoch).
        """
        with self._lock:
            self._check_open()
            self._raise_bg_error()
            self._truncate_all_locked()

    def _truncate_all_locked(self) -> None:
        """Lock held. Truncate until the head passes the tail as it is now."""
        target = self._tail
        while self._head < target:
            if self._truncating:
                self._cond.wait()
            else:
                self._truncate_locked()

    def _truncate_locked(self) -> None:
        """Lock held (released meanwhile). Close the epoch at the tail and apply it."""
        self._truncating = True
        start, stop = self._head, self._tail
        self._epoch += 1  # later commits re-declare their segments in the new epoch
        self._lock.release()
        try:
            self._apply_epoch(start, stop)
        except BaseException as err:
            self._lock.acquire()
            self._truncating = False
            self._cond.notify_all()
            if isinstance(err, OSError):
                raise RVMIOError(f"truncation of {self._path} failed: {err.strerror}") from err
            raise
        self._lock.acquire()
        self._head = stop
        self._truncating = False
        self._stats["truncations"] += 1
        self._cond.notify_all()

    def _apply_epoch(self, start: int, stop: int) -> None:
        """No lock. Make [start, stop) durable, apply it, sync segments, advance the head."""
        self._sync_to(stop)
        scanner = lf.Scanner(self._fd, self._cap, self._salt, self._header.log_size)
        segs = self._segs
        touched: dict[int, _Segment] = {}
        clock = _clock
        next_yield = clock() + _YIELD_EVERY
        n = 0
        for seg_id, off, data in scanner.ranges(start, stop):
            n += 1
            if not n & 3 and clock() >= next_yield:
                # While commits go on, a committer back from its write or
                # fdatasync waits for the GIL: hand it over regularly. With no
                # commit for a while nobody waits: do not pay for sleeps.
                if clock() - self._last_commit < _COMMITS_GONE:
                    time.sleep(0)
                next_yield = clock() + _YIELD_EVERY
            seg = touched.get(seg_id)
            if seg is None:
                if seg_id >= len(segs):
                    self._broken = RVMLogCorruptError(
                        f"{self._path}: the log reads back an unknown segment id {seg_id}"
                    )
                    raise self._broken
                seg = touched[seg_id] = segs[seg_id]
            end = off + len(data)
            m = seg.map
            if m is None or end > len(m):
                m = seg.writer(end)
            if m is not None:
                m[off:end] = data
            else:
                _write_all(seg.fd, data, off)
        if scanner.end_lsn != stop:
            self._broken = RVMLogCorruptError(
                f"{self._path}: the log reads back damaged at LSN {scanner.end_lsn}"
            )
            raise self._broken
        for seg in touched.values():
            _fdatasync(seg.fd)
        self._write_header(stop)

    def _maybe_truncate(self) -> None:
        """Start an automatic truncation if the log passed the fill ratio."""
        ratio = self._truncate_ratio
        if ratio is None or self._truncating or self._tail - self._head < ratio * self._cap:
            return
        if self._background:
            if self._worker is None:
                self._worker = threading.Thread(target=self._worker_main, name="rvm-truncate", daemon=True)
                self._worker.start()
            self._wake.set()
            return
        with self._lock:
            if not self._closed and not self._truncating and self._tail - self._head >= ratio * self._cap:
                try:
                    self._truncate_locked()
                except Exception as err:  # the commit succeeded; report at flush() / truncate()
                    self._bg_error = err

    def _worker_main(self) -> None:
        """Background truncation loop (one per RVM, started on first need)."""
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                if self._closed:
                    return
                ratio = self._truncate_ratio
                if self._truncating or ratio is None or self._tail - self._head < ratio * self._cap:
                    continue
                try:
                    self._truncate_locked()
                except Exception as err:  # surfaced by the next flush() / truncate()
                    self._bg_error = err

    # ------------------------------------------------------------------- state

    def _check_open(self) -> None:
        if self._closed:
            raise RVMClosedError(f"RVM on {self._path} is closed")

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise RVMIOError(
                f"RVM on {self._path} stopped after an I/O failure; reopen it to recover"
            ) from self._broken

    def _raise_bg_error(self) -> None:
        err, self._bg_error = self._bg_error, None
        if err is not None:
            raise RVMIOError(f"an automatic truncation of {self._path} failed: {err}") from err

    def close(self) -> None:
        """Flush the log, stop the worker, unmap every region and close files.

        Transactions still active are discarded (never committed). The log is
        not truncated: the next RVM on it replays what is left.
        """
        with self._lock:
            if self._closed:
                return
            while self._truncating:
                self._cond.wait()
            self._closed = True  # from here on every primitive raises RVMClosedError
            self._active.clear()
            self._wake.set()
        err: BaseException | None = None
        try:
            if self._broken is None:
                self._sync_to(self._tail)
        except RVMError as e:
            err = e
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join()
        for seg in self._segs:
            for region in seg.regions:
                self._release_region(region)
            seg.regions.clear()
            seg.close()
        os.close(self._fd)
        self._fd = -1
        if err is not None:
            raise err

    def __enter__(self) -> "RVM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<rvm.RVM {self._path} {'closed' if self._closed else 'open'}>"


def scan_log(log_path: str | os.PathLike) -> dict[str, Any]:
    """Decode a log (read only, for diagnostics and tests).

    Returns the header fields and the valid records from the head:
    ``{"header": {...}, "records": [{"lsn", "offset", "kind", "length",
    "ranges": [(segment id, segment offset, length)], "segment": id,
    "path": str}], "end_lsn": int}``; ``end_lsn`` is where the first invalid
    record (the torn tail, or just the end) starts.
    """
    path = os.path.abspath(os.fspath(log_path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise RVMLogNotFoundError(f"no RVM log at {path}") from err
    try:
        h = lf.read_header(fd, path)
        scanner = lf.Scanner(fd, h.capacity, h.salt, os.fstat(fd).st_size)
        records = []
        for rec in scanner.scan(h.head_lsn):
            entry: dict[str, Any] = {
                "lsn": rec.lsn,
                "offset": lf.physical(rec.lsn, h.capacity),
                "length": rec.length,
            }
            if rec.kind == lf.KIND_SEG:
                entry.update(kind="segment", segment=rec.count, path=os.fsdecode(rec.path))
            else:
                entry.update(kind="transaction", ranges=[(s, o, len(d)) for s, o, d in rec.ranges])
            records.append(entry)
        return {
            "header": {
                "version": lf.VERSION,
                "log_size": h.log_size,
                "capacity": h.capacity,
                "head_lsn": h.head_lsn,
                "generation": h.generation,
            },
            "records": records,
            "end_lsn": scanner.end_lsn,
        }
    finally:
        os.close(fd)

