"""The NVM region: its lifecycle, transactions and operations (see :mod:`hvext.pmem.region`)."""

from __future__ import annotations

import contextlib
import operator
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from hvext import durable
from hvext.errors import UsageError
from hvext.pmem.region.errors import (
    RegionClosed,
    RegionCorrupt,
    RegionError,
    RegionExists,
    RegionIOError,
    RegionMismatch,
    RegionNotFound,
    RegionUsageError,
    SnapshotExists,
    SnapshotNotFound,
)
from hvext.pmem.region.fs import (
    DB_NAME,
    MASS_DATA,
    MASS_ID,
    NVM_DATA,
    create_empty,
    fsync_path,
    lock_region,
    make_region_dirs,
    read_marker,
    remove_files,
    tmp_db_region_id,
)
from hvext.pmem.region.slab import MASS, NVM, Slab
from hvext.pmem.region.strategies import COMMON_SCHEMA, STRATEGIES, STRATEGY_CLASSES, Strategy
from hvext.units import MIB

FORMAT_VERSION = "1"
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 2 * MIB
MAX_BLOCKS = 1 << 40
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ------------------------------------------------------ fault injection

#: Test hook: called as ``_fault_hook(op, point)`` at the crash-relevant
#: points of each mutating operation (``"data-synced"``: data fsynced, metadata
#: not committed; ``"committed"``: metadata committed, free lists not yet
#: updated).  Crash tests install a hook that SIGKILLs the process.
_fault_hook: Callable[[str, str], None] | None = None


def _fault(op: str, point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(op, point)


# ------------------------------------------------------ validation helpers


def _as_int(what: str, value: Any) -> int:
    if isinstance(value, bool):
        raise RegionUsageError(f"{what} must be an integer, not a bool")
    try:
        return operator.index(value)
    except TypeError as err:
        raise RegionUsageError(f"{what} must be an integer, not {type(value).__name__}") from err


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegionUsageError(
            f"invalid snapshot name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -,"
            " starting with a letter or digit"
        )
    return name


def _parse_size(size: Any) -> int:
    if isinstance(size, str):
        from hvext.units import parse_size  # only for sizes written as text

        try:
            return parse_size(size)
        except UsageError as err:
            raise RegionUsageError(str(err)) from err
    return _as_int("size", size)


# ------------------------------------------------------------- the region


class NVMRegion:
    """A block store on two tiers with snapshots and purge; see the package doc (:mod:`hvext.pmem.region`)."""

    def __init__(
        self,
        nvm_dir: str,
        mass_dir: str,
        db: sqlite3.Connection,
        lock_fd: int,
        meta: dict[str, str],
        strategy_cls: type[Strategy],
        nvm: Slab,
        mass: Slab,
    ) -> None:
        """Use :meth:`create` or :meth:`open`."""
        self.nvm_dir = nvm_dir
        self.mass_dir = mass_dir
        self.region_id = meta["region_id"]
        self.size = int(meta["size"])
        self.block_size = int(meta["block_size"])
        self.strategy = strategy_cls.name
        self._db = db
        self._lock_fd = lock_fd
        self._nvm = nvm
        self._mass = mass
        self._strategy = strategy_cls(db, nvm, mass, self.size // self.block_size)
        self._mutex = threading.RLock()
        self._closed = False

    # ---- lifecycle

    @classmethod
    def create(
        cls,
        nvm_dir: str | os.PathLike[str],
        mass_dir: str | os.PathLike[str],
        size: int | str,
        block_size: int = 4096,
        strategy: str = "virtblocks",
    ) -> NVMRegion:
        """Create an empty region of *size* bytes and open it.

        *size* is a positive multiple of *block_size* (an int, or text such as
        ``"64M"``); *block_size* a power of two from 512 B to 2 MiB; *strategy*
        one of :data:`STRATEGIES`.  The directories are created if missing.
        """
        size = _parse_size(size)
        block_size = _as_int("block_size", block_size)
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise RegionUsageError(
                f"block_size {block_size} must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            )
        if size <= 0 or size % block_size:
            raise RegionUsageError(f"size {size} must be a positive multiple of block_size {block_size}")
        if size // block_size > MAX_BLOCKS:
            raise RegionUsageError(f"size {size} exceeds {MAX_BLOCKS} blocks")
        if strategy not in STRATEGY_CLASSES:
            raise RegionUsageError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        nvm = os.path.abspath(os.fspath(nvm_dir))
        mass = os.path.abspath(os.fspath(mass_dir))
        make_region_dirs(nvm, mass)
        lock_fd = lock_region(nvm)
        try:
            db_path = os.path.join(nvm, DB_NAME)
            tmp_db = db_path + ".tmp"
            if os.path.exists(db_path):
                raise RegionExists(f"{nvm} already holds a region")
            marker = os.path.join(mass, MASS_ID)
            other = read_marker(marker)
            if other is not None and other != tmp_db_region_id(tmp_db):
                raise RegionExists(
                    f"{mass} already holds the mass tier of region {other}; remove it or pick another directory"
                )
            # (A marker matching the temporary database is our own interrupted create.)
            region_id = uuid.uuid4().hex
            try:
                remove_files(tmp_db, tmp_db + "-journal")
                conn = sqlite3.connect(tmp_db, isolation_level=None)
                try:
                    conn.executescript(COMMON_SCHEMA + STRATEGY_CLASSES[strategy].schema)
                    conn.execute("BEGIN")
                    conn.executemany(
                        "INSERT INTO meta(key, value) VALUES (?, ?)",
                        [
                            ("format", FORMAT_VERSION),
                            ("region_id", region_id),
                            ("size", str(size)),
                            ("block_size", str(block_size)),
                            ("strategy", strategy),
                            ("created", repr(time.time())),
                        ],
                    )
                    conn.execute("COMMIT")
                finally:
                    conn.close()
                fsync_path(tmp_db)
                create_empty(os.path.join(mass, MASS_DATA))
                durable.atomic_write(marker, region_id.encode())
                create_empty(os.path.join(nvm, NVM_DATA))
                os.replace(tmp_db, db_path)  # the region exists from here on
                durable.fsync_dir(nvm)
            except (OSError, sqlite3.Error) as err:
                raise RegionIOError(f"cannot create region in {nvm} / {mass}") from err
            return cls._open_locked(nvm, mass, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def open(cls, nvm_dir: str | os.PathLike[str], mass_dir: str | os.PathLike[str]) -> NVMRegion:
        """Open an existing region (recovering from any crash) for exclusive use."""
        nvm = os.path.abspath(os.fspath(nvm_dir))
        mass = os.path.abspath(os.fspath(mass_dir))
        if not os.path.exists(os.path.join(nvm, DB_NAME)):
            raise RegionNotFound(f"no region in {nvm}")
        lock_fd = lock_region(nvm)
        try:
            return cls._open_locked(nvm, mass, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, nvm: str, mass: str, lock_fd: int) -> NVMRegion:
        db_path = os.path.join(nvm, DB_NAME)
        try:
            db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as err:
            raise RegionIOError(f"cannot open region metadata {db_path}") from err
        slabs: list[Slab] = []
        try:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                meta = dict(db.execute("SELECT key, value FROM meta"))
            except sqlite3.OperationalError as err:  # locked, read-only, I/O, or no tables
                if "no such table" not in str(err):
                    raise RegionIOError(f"cannot read region metadata {db_path}: {err}") from err
                raise RegionCorrupt(f"region metadata {db_path} lacks its tables") from err
            except sqlite3.DatabaseError as err:  # not a database, malformed
                raise RegionCorrupt(f"region metadata {db_path} is unreadable") from err
            if meta.get("format") != FORMAT_VERSION:
                raise RegionCorrupt(f"{db_path}: unsupported region format {meta.get('format')!r}")
            strategy_cls = STRATEGY_CLASSES.get(meta.get("strategy", ""))
            if strategy_cls is None:
                raise RegionCorrupt(f"{db_path}: unknown strategy {meta.get('strategy')!r}")
            marker = read_marker(os.path.join(mass, MASS_ID))
            if marker != meta.get("region_id"):
                raise RegionMismatch(
                    f"{mass} is not the mass tier of region {meta.get('region_id')}"
                    + (f" (it belongs to {marker})" if marker else " (no region marker)")
                )
            try:
                nvm_used, mass_used = strategy_cls.used_slots(db)
            except sqlite3.DatabaseError as err:
                raise RegionCorrupt(f"region metadata {db_path} is unreadable") from err
            bs = int(meta["block_size"])
            slabs.append(Slab(os.path.join(nvm, NVM_DATA), NVM, bs, nvm_used))
            slabs.append(Slab(os.path.join(mass, MASS_DATA), MASS, bs, mass_used))
            return cls(nvm, mass, db, lock_fd, meta, strategy_cls, slabs[0], slabs[1])
        except BaseException:
            for slab in slabs:
                slab.close()
            db.close()
            raise

    def close(self) -> None:
        """Release the region (idempotent).  Everything completed is already durable."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.close()
            finally:
                self._nvm.close()
                self._mass.close()
                os.close(self._lock_fd)

    def __enter__(self) -> NVMRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<NVMRegion {self.nvm_dir} {self.strategy} size={self.size} bs={self.block_size} {state}>"

    # ---- plumbing

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Serialise, refuse a closed region, wrap low-level failures."""
        with self._mutex:
            if self._closed:
                raise RegionClosed(f"{what}: the region is closed")
            try:
                yield
            except RegionError:
                raise
            except (sqlite3.Error, OSError) as err:
                raise RegionIOError(f"{what} failed: {err}") from err

    @contextlib.contextmanager
    def _transaction(self, op: str) -> Iterator[None]:
        """Data first (fsynced), then all metadata in one atomic commit."""
        with self._guard(op):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._nvm.sync()
                self._mass.sync()
                _fault(op, "data-synced")
                self._db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                self._nvm.rollback()
                self._mass.rollback()
                raise
            _fault(op, "committed")
            self._nvm.commit()
            self._mass.commit()

    def _check_range(self, offset: Any, length: Any, what: str) -> tuple[int, int]:
        offset = _as_int(f"{what} offset", offset)
        length = _as_int(f"{what} length", length)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise RegionUsageError(
                f"{what} of {length} bytes at offset {offset} is outside the region (size {self.size})"
            )
        return offset, length

    def _snap_id(self, name: str) -> int | None:
        row = self._db.execute("SELECT id FROM snap WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def _require_snap(self, name: Any) -> int:
        name = _check_name(name)
        sid = self._snap_id(name)
        if sid is None:
            raise SnapshotNotFound(f"no snapshot named {name!r}")
        return sid

    def _read(self, snap: int, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        where = self._strategy.locate(snap, first, last)
        out = bytearray(length)
        slabs = (self._nvm, self._mass)
        for b in range(first, last + 1):
            loc = where.get(b)
            if loc is None:
                continue  # never written: zeros
            start = b * bs
            lo, hi = max(offset, start), min(offset + length, start + bs)
            data = slabs[loc[0]].read(loc[1])
            out[lo - offset : hi - offset] = data[lo - start : hi - start]
        return bytes(out)

    # ---- the contract

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write *data* at *offset* of the running point, atomically.

        Blocks shared with a snapshot are copied on write; the old copy stays
        with the snapshots and becomes non-active.
        """
        try:
            view = memoryview(data).cast("B")
        except TypeError as err:
            raise RegionUsageError(f"data must be bytes-like, not {type(data).__name__}") from err
        offset, length = self._check_range(offset, view.nbytes, "write")
        if length == 0:
            return
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        with self._transaction("write"):
            old = self._strategy.running(first, last)
            for b in range(first, last + 1):
                start = b * bs
                lo, hi = max(offset, start), min(offset + length, start + bs)
                entry = old.get(b)
                if hi - lo == bs:
                    block: bytes | memoryview = view[lo - offset : hi - offset]
                else:
                    merged = bytearray(self._nvm.read(entry.slot)) if entry else bytearray(bs)
                    merged[lo - start : hi - start] = view[lo - offset : hi - offset]
                    block = bytes(merged)
                self._strategy.write_block(b, block, entry)

    def read(self, offset: int, length: int) -> bytes:
        """Read the running point; never-written bytes read as zeros."""
        offset, length = self._check_range(offset, length, "read")
        with self._guard("read"):
            return self._read(0, offset, length)

    def snapshot(self, name: str) -> None:
        """Freeze the running point as snapshot *name* (shares all blocks)."""
        name = _check_name(name)
        with self._transaction("snapshot"):
            if self._snap_id(name) is not None:
                raise SnapshotExists(f"snapshot {name!r} already exists")
            sid = self._db.execute(
                "INSERT INTO snap(name, created) VALUES (?, ?)", (name, time.time())
            ).lastrowid
            assert sid is not None
            self._strategy.snapshot(sid)

    def read_snapshot(self, name: str, offset: int, length: int) -> bytes:
        """Read what snapshot *name* held, wherever its blocks now live."""
        offset, length = self._check_range(offset, length, "read_snapshot")
        with self._guard("read_snapshot"):
            return self._read(self._require_snap(name), offset, length)

    def delete_snapshot(self, name: str) -> dict[str, int]:
        """Delete snapshot *name*; blocks whose count reaches zero are freed.

        Returns ``{"nvm_blocks_freed": n, "mass_blocks_freed": m}``.
        """
        with self._transaction("delete_snapshot"):
            sid = self._require_snap(name)
            freed = self._strategy.delete(sid)
            self._db.execute("DELETE FROM snap WHERE id = ?", (sid,))
        return freed

    def snapshots(self) -> list[str]:
        """Snapshot names, oldest first."""
        with self._guard("snapshots"):
            return [n for (n,) in self._db.execute("SELECT name FROM snap ORDER BY id")]

    def purge(self) -> dict[str, Any]:
        """Move every non-active block from the NVM tier to mass storage.

        Returns ``strategy``, ``blocks_moved``, ``entries_rewritten`` (L1
        entries for pointer-elimination, virtblock entries for virtblocks),
        ``entries_scanned``, ``nvm_blocks_freed`` and ``seconds``.
        """
        start = time.perf_counter()
        with self._transaction("purge"):
            result: dict[str, Any] = self._strategy.purge()
        result["seconds"] = time.perf_counter() - start
        result["strategy"] = self.strategy
        return result

    def stats(self) -> dict[str, Any]:
        """Counts: ``nvm_blocks``, ``mass_blocks``, ``snapshots`` and more."""
        with self._guard("stats"):
            db = self._db
            return {
                "strategy": self.strategy,
                "size": self.size,
                "block_size": self.block_size,
                "snapshots": db.execute("SELECT COUNT(*) FROM snap").fetchone()[0],
                "nvm_blocks": self._nvm.used,
                "mass_blocks": self._mass.used,
                "running_blocks": db.execute("SELECT COUNT(*) FROM l1 WHERE snap = 0").fetchone()[0],
                "nonactive_nvm_blocks": self._strategy.nonactive_nvm_blocks(),
                "l1_entries": db.execute("SELECT COUNT(*) FROM l1").fetchone()[0],
                "nvm_bytes_allocated": self._nvm.allocated_bytes(),
                "mass_bytes_allocated": self._mass.allocated_bytes(),
            }

    def check(self) -> list[str]:
        """Verify reference counts, pointers and allocation; returns problems found."""
        with self._guard("check"):
            problems = self._strategy.check()
            nblocks = self.size // self.block_size
            bad = self._db.execute(
                "SELECT COUNT(*) FROM l1 WHERE blkno < 0 OR blkno >= ?"
                " OR (snap != 0 AND snap NOT IN (SELECT id FROM snap))",
                (nblocks,),
            ).fetchone()[0]
            if bad:
                problems.append(f"{bad} L1 entries out of range or of deleted snapshots")
            return problems
