"""NVM region with snapshots and purge of non-active blocks (capability C14).

The hypervisor's store for a VM's persistent memory: fixed-size blocks live on
a fast NVM tier (a directory on /dev/shm or a real pmem mount) and on a
mass-storage tier (a directory on disk).  The *running point* is what the
guest sees; :meth:`NVMRegion.snapshot` freezes it, and later writes copy the
block (copy-on-write).  A block the running point no longer references is
*non-active*: only snapshots hold it, so :meth:`NVMRegion.purge` moves it to
mass storage to free NVM.  Two purge strategies come from the seeds:

``pointer-elimination``
    Each snapshot's L1 page table points straight at data blocks.  Purge
    visits every L1 entry of every snapshot; an entry that points at a
    non-active block is rewritten to the block's mass-storage location and
    the block's reference count drops by one; at zero the NVM block is freed.
    Cost grows with the number of snapshots.
``virtblocks``
    Every L1 entry points at one *virtblock* entry per allocated block, and
    that entry points at the data.  Purge rewrites only the virtblock entry,
    so its cost depends on the number of non-active blocks, not on the
    number of snapshots (reads pay one extra indirection).

Crash safety (details in ``docs/nvm-region.md``): metadata is an SQLite
database (WAL, ``synchronous=FULL``) in the NVM directory; data blocks are
slots in one file per tier.  An operation writes data only into slots that
the committed metadata does not reference, fsyncs the data files, then
commits all of its metadata in one transaction.  A process killed at any
moment therefore leaves either the old or the new state of the operation in
flight, and every completed operation intact.  Allocation state is rebuilt
from the metadata at open.

Standard library only.  One process owns a region at a time (``flock``);
an :class:`NVMRegion` object may be shared between threads (internal lock).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import heapq
import operator
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from hvext import durable, paths
from hvext.errors import HvextError, UsageError

__all__ = [
    "NVMRegion",
    "STRATEGIES",
    "RegionError",
    "RegionUsageError",
    "RegionNotFound",
    "RegionExists",
    "RegionMismatch",
    "RegionBusy",
    "RegionClosed",
    "RegionCorrupt",
    "RegionIOError",
    "SnapshotNotFound",
    "SnapshotExists",
]

FORMAT_VERSION = "1"
STRATEGIES = ("virtblocks", "pointer-elimination")
MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 2 * 1024 * 1024
MAX_BLOCKS = 1 << 40

DB_NAME = "region.db"
LOCK_NAME = "region.lock"
NVM_DATA = "nvm.dat"
MASS_DATA = "mass.dat"
MASS_ID = "region.id"

NVM, MASS = 0, 1  # tier numbers stored in the metadata
_TIER_NAMES = ("nvm", "mass")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# ---------------------------------------------------------------- errors


class RegionError(HvextError):
    """Base of every error raised by :mod:`hvext.pmem.region`."""


class RegionUsageError(RegionError, UsageError):
    """A bad argument: size, block size, strategy, offset/length, name."""


class RegionNotFound(RegionUsageError):
    """No region exists in the given NVM directory."""


class RegionExists(RegionUsageError):
    """``create`` found a region (or another region's mass tier) in place."""


class RegionMismatch(RegionUsageError):
    """The mass-storage directory belongs to another region."""


class SnapshotNotFound(RegionUsageError):
    """No snapshot with that name."""


class SnapshotExists(RegionUsageError):
    """A snapshot with that name already exists."""


class RegionBusy(RegionError):
    """Another NVMRegion (in this or another process) has the region open."""


class RegionClosed(RegionError):
    """The NVMRegion was closed."""


class RegionCorrupt(RegionError):
    """The on-disk region breaks its format or invariants."""


class RegionIOError(RegionError):
    """Reading or writing the tiers or the metadata failed (cause kept)."""


# ------------------------------------------------------ fault injection

#: Test hook: called as ``_fault_hook(op, point)`` at the crash-relevant
#: points of each mutating operation (``"data-synced"``: data fsynced, metadata
#: not committed; ``"committed"``: metadata committed, free lists not yet
#: updated).  Crash tests install a hook that SIGKILLs the process.
_fault_hook: Callable[[str, str], None] | None = None


def _fault(op: str, point: str) -> None:
    if _fault_hook is not None:
        _fault_hook(op, point)


# ---------------------------------------------------- hole punching


def _load_fallocate() -> Callable[..., int] | None:
    """Return libc's ``fallocate`` (Linux) to give freed slots back, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _load_fallocate()
_PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


# ------------------------------------------------------------ data tiers


class _Slab:
    """One tier's data file: an array of block-sized slots.

    The free list lives in memory only and is rebuilt from the metadata at
    open.  Slots allocated during a transaction return to the free list if it
    rolls back; slots released during a transaction become reusable only
    after it commits, so data is never written into a slot that committed
    metadata still references (the core of the crash-safety argument).
    """

    def __init__(self, path: str, tier: int, block_size: int, used: Iterable[int]) -> None:
        self.path = path
        self.tier = tier
        self.bs = block_size
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise RegionCorrupt(f"{_TIER_NAMES[tier]} data file {path} cannot be opened") from err
        try:
            used_set = set(used)
            self.high = max(used_set) + 1 if used_set else 0
            size = os.fstat(self.fd).st_size
            if size < self.high * self.bs:
                raise RegionCorrupt(
                    f"{path} holds {size} bytes but the metadata references slot {self.high - 1}"
                )
            if size > self.high * self.bs:
                # Slots past the last referenced one were written by operations
                # that never committed: nothing refers to them.
                os.ftruncate(self.fd, self.high * self.bs)
            self.free = [s for s in range(self.high) if s not in used_set]  # sorted: a heap
            self.used = len(used_set)
            self._punch_ok = True
            self._punch(self.free)  # leftovers of uncommitted operations
        except BaseException:
            os.close(self.fd)
            raise
        self._allocated: list[int] = []
        self._released: list[int] = []
        self._dirty = False

    def alloc(self) -> int:
        """Take a free slot for this transaction."""
        if self.free:
            slot = heapq.heappop(self.free)
        else:
            slot = self.high
            self.high += 1
        self._allocated.append(slot)
        self.used += 1
        return slot

    def release(self, slot: int) -> None:
        """Free *slot* once the current transaction commits."""
        self._released.append(slot)

    def write(self, slot: int, data: bytes | memoryview) -> None:
        if len(data) != self.bs:
            raise AssertionError(f"slot write of {len(data)} bytes, block size {self.bs}")
        view = memoryview(data)
        pos = slot * self.bs
        while view:
            n = os.pwrite(self.fd, view, pos)
            view = view[n:]
            pos += n
        self._dirty = True

    def read(self, slot: int) -> bytes:
        data = os.pread(self.fd, self.bs, slot * self.bs)
        if len(data) != self.bs:
            raise RegionCorrupt(f"{self.path}: slot {slot} is beyond the end of the file")
        return data

    def sync(self) -> None:
        """Make the data written in this transaction durable."""
        if self._dirty:
            os.fsync(self.fd)
            self._dirty = False

    def commit(self) -> None:
        """The transaction committed: released slots become free."""
        for slot in self._released:
            heapq.heappush(self.free, slot)
        self.used -= len(self._released)
        self._punch(self._released)
        self._allocated.clear()
        self._released.clear()

    def rollback(self) -> None:
        """The transaction rolled back: its allocations become free again."""
        for slot in self._allocated:
            heapq.heappush(self.free, slot)
        self.used -= len(self._allocated)
        self._punch(self._allocated)
        self._allocated.clear()
        self._released.clear()
        self._dirty = False

    def in_use(self) -> set[int]:
        return set(range(self.high)).difference(self.free)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def _punch(self, slots: Iterable[int]) -> None:
        """Give the space of free slots back to the file system (best effort)."""
        if _FALLOCATE is None or not self._punch_ok:
            return
        ordered = sorted(slots)
        i = 0
        while i < len(ordered):
            j = i
            while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
                j += 1
            off, length = ordered[i] * self.bs, (j - i + 1) * self.bs
            if _FALLOCATE(self.fd, _PUNCH_HOLE_KEEP_SIZE, off, length) != 0:
                if ctypes.get_errno() in (errno.EOPNOTSUPP, errno.ENOSYS):
                    self._punch_ok = False
                return
            i = j + 1

    def close(self) -> None:
        os.close(self.fd)


# ---------------------------------------------------- metadata schema

_COMMON_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE snap(id INTEGER PRIMARY KEY AUTOINCREMENT,
                  name TEXT NOT NULL UNIQUE,
                  created REAL NOT NULL);
"""


class _Entry(NamedTuple):
    """A running-point L1 entry: what it points at, its NVM slot, its refs."""

    ref: int
    slot: int
    refs: int


class _Strategy:
    """L1 tables, block bookkeeping and purge for one strategy.

    Snapshot id 0 is the running point.  Every method runs inside the
    caller's transaction.
    """

    name = ""
    schema = ""

    def __init__(self, db: sqlite3.Connection, nvm: _Slab, mass: _Slab, nblocks: int) -> None:
        self.db = db
        self.nvm = nvm
        self.mass = mass
        self.slabs = (nvm, mass)
        self.nblocks = nblocks

    @staticmethod
    def used_slots(db: sqlite3.Connection) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def running(self, first: int, last: int) -> dict[int, _Entry]:
        raise NotImplementedError

    def locate(self, snap: int, first: int, last: int) -> dict[int, tuple[int, int]]:
        """Block number -> (tier, slot) for blocks first..last of *snap*."""
        raise NotImplementedError

    def write_block(self, blkno: int, data: bytes | memoryview, old: _Entry | None) -> None:
        raise NotImplementedError

    def snapshot(self, snap: int) -> None:
        raise NotImplementedError

    def delete(self, snap: int) -> dict[str, int]:
        raise NotImplementedError

    def purge(self) -> dict[str, int]:
        raise NotImplementedError

    def nonactive_nvm_blocks(self) -> int:
        raise NotImplementedError

    def check(self) -> list[str]:
        raise NotImplementedError

    def _check_slabs(self, seen: dict[int, set[int]]) -> list[str]:
        problems = []
        for slab in self.slabs:
            actual = slab.in_use()
            if actual != seen[slab.tier]:
                problems.append(
                    f"{_TIER_NAMES[slab.tier]} allocator out of step with metadata: "
                    f"{len(actual)} slots in use, {len(seen[slab.tier])} referenced"
                )
        return problems


class _Virtblocks(_Strategy):
    """L1 entry -> virtblock entry (tier, slot) -> data."""

    name = "virtblocks"
    schema = """
    CREATE TABLE vb(id INTEGER PRIMARY KEY,
                    tier INTEGER NOT NULL,
                    slot INTEGER NOT NULL,
                    refs INTEGER NOT NULL,      -- L1 entries pointing here
                    active INTEGER NOT NULL);   -- the running point points here
    -- Exactly the purge candidates: purge never looks at snapshots.
    CREATE INDEX vb_nonactive_nvm ON vb(slot) WHERE tier = 0 AND active = 0;
    CREATE TABLE l1(snap INTEGER NOT NULL, blkno INTEGER NOT NULL, vb INTEGER NOT NULL,
                    PRIMARY KEY (snap, blkno)) WITHOUT ROWID;
    """

    @staticmethod
    def used_slots(db: sqlite3.Connection) -> tuple[list[int], list[int]]:
        tiers: tuple[list[int], list[int]] = ([], [])
        for tier, slot in db.execute("SELECT tier, slot FROM vb"):
            tiers[tier].append(slot)
        return tiers

    def running(self, first: int, last: int) -> dict[int, _Entry]:
        rows = self.db.execute(
            "SELECT l1.blkno, vb.id, vb.slot, vb.refs FROM l1 JOIN vb ON vb.id = l1.vb"
            " WHERE l1.snap = 0 AND l1.blkno BETWEEN ? AND ?",
            (first, last),
        )
        return {b: _Entry(vid, slot, refs) for b, vid, slot, refs in rows}

    def locate(self, snap: int, first: int, last: int) -> dict[int, tuple[int, int]]:
        rows = self.db.execute(
            "SELECT l1.blkno, vb.tier, vb.slot FROM l1 JOIN vb ON vb.id = l1.vb"
            " WHERE l1.snap = ? AND l1.blkno BETWEEN ? AND ?",
            (snap, first, last),
        )
        return {b: (tier, slot) for b, tier, slot in rows}

    def write_block(self, blkno: int, data: bytes | memoryview, old: _Entry | None) -> None:
        slot = self.nvm.alloc()
        self.nvm.write(slot, data)
        db = self.db
        if old is not None and old.refs == 1:
            # Only the running point holds it: repoint its virtblock entry.
            db.execute("UPDATE vb SET slot = ? WHERE id = ?", (slot, old.ref))
            self.nvm.release(old.slot)
            return
        vid = db.execute(
            "INSERT INTO vb(tier, slot, refs, active) VALUES (0, ?, 1, 1)", (slot,)
        ).lastrowid
        if old is None:
            db.execute("INSERT INTO l1(snap, blkno, vb) VALUES (0, ?, ?)", (blkno, vid))
        else:  # copy-on-write: snapshots keep the old block, now non-active
            db.execute("UPDATE l1 SET vb = ? WHERE snap = 0 AND blkno = ?", (vid, blkno))
            db.execute("UPDATE vb SET refs = refs - 1, active = 0 WHERE id = ?", (old.ref,))

    def snapshot(self, snap: int) -> None:
        self.db.execute("INSERT INTO l1(snap, blkno, vb) SELECT ?, blkno, vb FROM l1 WHERE snap = 0", (snap,))
        self.db.execute("UPDATE vb SET refs = refs + 1 WHERE id IN (SELECT vb FROM l1 WHERE snap = 0)")

    def delete(self, snap: int) -> dict[str, int]:
        db = self.db
        db.execute("UPDATE vb SET refs = refs - 1 WHERE id IN (SELECT vb FROM l1 WHERE snap = ?)", (snap,))
        dead = db.execute(
            "SELECT vb.id, vb.tier, vb.slot FROM l1 JOIN vb ON vb.id = l1.vb"
            " WHERE l1.snap = ? AND vb.refs = 0",
            (snap,),
        ).fetchall()
        freed = [0, 0]
        for _vid, tier, slot in dead:
            self.slabs[tier].release(slot)
            freed[tier] += 1
        db.executemany("DELETE FROM vb WHERE id = ?", [(vid,) for vid, _t, _s in dead])
        db.execute("DELETE FROM l1 WHERE snap = ?", (snap,))
        return {"nvm_blocks_freed": freed[NVM], "mass_blocks_freed": freed[MASS]}

    def purge(self) -> dict[str, int]:
        rows = self.db.execute("SELECT id, slot FROM vb WHERE tier = 0 AND active = 0").fetchall()
        updates = []
        for vid, slot in rows:
            dest = self.mass.alloc()
            self.mass.write(dest, self.nvm.read(slot))
            self.nvm.release(slot)
            updates.append((dest, vid))
        self.db.executemany("UPDATE vb SET tier = 1, slot = ? WHERE id = ?", updates)
        n = len(updates)
        return {"blocks_moved": n, "entries_rewritten": n, "entries_scanned": n, "nvm_blocks_freed": n}

    def nonactive_nvm_blocks(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM vb WHERE tier = 0 AND active = 0").fetchone()[0]

    def check(self) -> list[str]:
        db = self.db
        problems: list[str] = []
        counts = dict(db.execute("SELECT vb, COUNT(*) FROM l1 GROUP BY vb"))
        running = {v for (v,) in db.execute("SELECT vb FROM l1 WHERE snap = 0")}
        seen: dict[int, set[int]] = {NVM: set(), MASS: set()}
        ids = set()
        for vid, tier, slot, refs, active in db.execute("SELECT id, tier, slot, refs, active FROM vb"):
            ids.add(vid)
            if tier not in seen:
                problems.append(f"virtblock {vid}: bad tier {tier}")
                continue
            if slot in seen[tier]:
                problems.append(f"virtblock {vid}: {_TIER_NAMES[tier]} slot {slot} shared")
            seen[tier].add(slot)
            if refs != counts.get(vid, 0) or refs <= 0:
                problems.append(f"virtblock {vid}: refs {refs}, {counts.get(vid, 0)} L1 entries")
            if bool(active) != (vid in running):
                problems.append(f"virtblock {vid}: active={active} but running point disagrees")
            if active and tier != NVM:
                problems.append(f"virtblock {vid}: active but on mass storage")
        for vid in set(counts) - ids:
            problems.append(f"L1 entries point at missing virtblock {vid}")
        return problems + self._check_slabs(seen)


class _PointerElimination(_Strategy):
    """L1 entry -> (tier, slot): NVM block until purge rewrites it to mass."""

    name = "pointer-elimination"
    schema = """
    CREATE TABLE nblk(slot INTEGER PRIMARY KEY,
                      refs INTEGER NOT NULL,       -- L1 entries pointing here
                      active INTEGER NOT NULL);    -- the running point points here
    CREATE TABLE mblk(slot INTEGER PRIMARY KEY, refs INTEGER NOT NULL);
    CREATE TABLE l1(snap INTEGER NOT NULL, blkno INTEGER NOT NULL,
                    tier INTEGER NOT NULL, ptr INTEGER NOT NULL,
                    PRIMARY KEY (snap, blkno)) WITHOUT ROWID;
    """

    @staticmethod
    def used_slots(db: sqlite3.Connection) -> tuple[list[int], list[int]]:
        return (
            [s for (s,) in db.execute("SELECT slot FROM nblk")],
            [s for (s,) in db.execute("SELECT slot FROM mblk")],
        )

    def running(self, first: int, last: int) -> dict[int, _Entry]:
        rows = self.db.execute(
            "SELECT l1.blkno, l1.ptr, n.refs FROM l1 JOIN nblk AS n ON n.slot = l1.ptr"
            " WHERE l1.snap = 0 AND l1.blkno BETWEEN ? AND ?",
            (first, last),
        )
        return {b: _Entry(ptr, ptr, refs) for b, ptr, refs in rows}

    def locate(self, snap: int, first: int, last: int) -> dict[int, tuple[int, int]]:
        rows = self.db.execute(
            "SELECT blkno, tier, ptr FROM l1 WHERE snap = ? AND blkno BETWEEN ? AND ?",
            (snap, first, last),
        )
        return {b: (tier, ptr) for b, tier, ptr in rows}

    def write_block(self, blkno: int, data: bytes | memoryview, old: _Entry | None) -> None:
        slot = self.nvm.alloc()
        self.nvm.write(slot, data)
        db = self.db
        db.execute("INSERT INTO nblk(slot, refs, active) VALUES (?, 1, 1)", (slot,))
        if old is None:
            db.execute("INSERT INTO l1(snap, blkno, tier, ptr) VALUES (0, ?, 0, ?)", (blkno, slot))
            return
        db.execute("UPDATE l1 SET ptr = ? WHERE snap = 0 AND blkno = ?", (slot, blkno))
        if old.refs == 1:  # only the running point held it
            db.execute("DELETE FROM nblk WHERE slot = ?", (old.slot,))
            self.nvm.release(old.slot)
        else:  # copy-on-write: snapshots keep the old block, now non-active
            db.execute("UPDATE nblk SET refs = refs - 1, active = 0 WHERE slot = ?", (old.slot,))

    def snapshot(self, snap: int) -> None:
        self.db.execute(
            "INSERT INTO l1(snap, blkno, tier, ptr) SELECT ?, blkno, tier, ptr FROM l1 WHERE snap = 0",
            (snap,),
        )
        self.db.execute("UPDATE nblk SET refs = refs + 1 WHERE slot IN (SELECT ptr FROM l1 WHERE snap = 0)")

    def delete(self, snap: int) -> dict[str, int]:
        db = self.db
        freed = {}
        for tier, table in ((NVM, "nblk"), (MASS, "mblk")):
            db.execute(
                f"UPDATE {table} SET refs = refs - 1"
                f" WHERE slot IN (SELECT ptr FROM l1 WHERE snap = ? AND tier = {tier})",
                (snap,),
            )
            dead = [
                s
                for (s,) in db.execute(
                    f"SELECT b.slot FROM l1 JOIN {table} AS b ON b.slot = l1.ptr"
                    f" WHERE l1.snap = ? AND l1.tier = {tier} AND b.refs = 0",
                    (snap,),
                )
            ]
            for slot in dead:
                self.slabs[tier].release(slot)
            db.executemany(f"DELETE FROM {table} WHERE slot = ?", [(s,) for s in dead])
            freed[tier] = len(dead)
        db.execute("DELETE FROM l1 WHERE snap = ?", (snap,))
        return {"nvm_blocks_freed": freed[NVM], "mass_blocks_freed": freed[MASS]}

    def purge(self) -> dict[str, int]:
        db, nvm, mass = self.db, self.nvm, self.mass
        copies: dict[int, int] = {}  # NVM slot -> its copy's mass slot
        remaining: dict[int, int] = {}  # NVM slot -> references not yet eliminated
        mass_refs: dict[int, int] = {}
        freed: list[int] = []
        scanned = rewritten = 0
        for (sid,) in db.execute("SELECT id FROM snap ORDER BY id").fetchall():
            rows = db.execute(
                "SELECT l1.blkno, l1.ptr, n.refs, n.active FROM l1 JOIN nblk AS n ON n.slot = l1.ptr"
                " WHERE l1.snap = ? AND l1.tier = 0",
                (sid,),
            ).fetchall()
            updates = []
            for blkno, ptr, refs, active in rows:
                scanned += 1
                if active:
                    continue
                dest = copies.get(ptr)
                if dest is None:
                    dest = mass.alloc()
                    mass.write(dest, nvm.read(ptr))
                    copies[ptr] = dest
                    remaining[ptr] = refs
                    mass_refs[dest] = 0
                # Eliminate the pointer: the entry now locates the mass copy.
                updates.append((dest, sid, blkno))
                mass_refs[dest] += 1
                remaining[ptr] -= 1
                if remaining[ptr] == 0:
                    freed.append(ptr)
                    nvm.release(ptr)
            db.executemany("UPDATE l1 SET tier = 1, ptr = ? WHERE snap = ? AND blkno = ?", updates)
            rewritten += len(updates)
        stuck = [slot for slot, n in remaining.items() if n]
        if stuck:
            raise RegionCorrupt(f"non-active NVM blocks {stuck[:5]} have references outside snapshots")
        db.executemany("DELETE FROM nblk WHERE slot = ?", [(s,) for s in freed])
        db.executemany("INSERT INTO mblk(slot, refs) VALUES (?, ?)", list(mass_refs.items()))
        return {
            "blocks_moved": len(copies),
            "entries_rewritten": rewritten,
            "entries_scanned": scanned,
            "nvm_blocks_freed": len(freed),
        }

    def nonactive_nvm_blocks(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM nblk WHERE active = 0").fetchone()[0]

    def check(self) -> list[str]:
        db = self.db
        problems: list[str] = []
        counts: dict[tuple[int, int], int] = {}
        running: set[int] = set()
        for snap, tier, ptr in db.execute("SELECT snap, tier, ptr FROM l1"):
            counts[(tier, ptr)] = counts.get((tier, ptr), 0) + 1
            if snap == 0:
                if tier != NVM:
                    problems.append(f"running point entry locates mass slot {ptr}")
                running.add(ptr)
        seen: dict[int, set[int]] = {NVM: set(), MASS: set()}
        for slot, refs, active in db.execute("SELECT slot, refs, active FROM nblk"):
            seen[NVM].add(slot)
            if refs != counts.get((NVM, slot), 0) or refs <= 0:
                problems.append(f"NVM block {slot}: refs {refs}, {counts.get((NVM, slot), 0)} L1 entries")
            if bool(active) != (slot in running):
                problems.append(f"NVM block {slot}: active={active} but running point disagrees")
        for slot, refs in db.execute("SELECT slot, refs FROM mblk"):
            seen[MASS].add(slot)
            if refs != counts.get((MASS, slot), 0) or refs <= 0:
                problems.append(f"mass block {slot}: refs {refs}, {counts.get((MASS, slot), 0)} L1 entries")
        for tier, ptr in counts:
            if ptr not in seen.get(tier, set()):
                problems.append(f"L1 entries point at missing {_TIER_NAMES[tier]} block {ptr}")
        return problems + self._check_slabs(seen)


_STRATEGY_CLASSES: dict[str, type[_Strategy]] = {
    cls.name: cls for cls in (_Virtblocks, _PointerElimination)
}


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


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_empty(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_marker(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise RegionIOError(f"cannot read region marker {path}") from err


def _tmp_db_region_id(path: str) -> str | None:
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


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _lock(nvm_dir: str) -> int:
    """Take the region's exclusive lock; the fd holds it until closed."""
    path = os.path.join(nvm_dir, LOCK_NAME)
    try:
        return durable.lock_file(path, wait=0)
    except BlockingIOError as err:
        raise RegionBusy(f"the region in {nvm_dir} is open elsewhere") from err
    except OSError as err:
        raise RegionIOError(f"cannot lock {path}") from err


# ------------------------------------------------------------- the region


def _make_region_dirs(*dirs: str) -> None:
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


class NVMRegion:
    """A block store on two tiers with snapshots and purge; see the module doc."""

    def __init__(
        self,
        nvm_dir: str,
        mass_dir: str,
        db: sqlite3.Connection,
        lock_fd: int,
        meta: dict[str, str],
        strategy_cls: type[_Strategy],
        nvm: _Slab,
        mass: _Slab,
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
        if strategy not in _STRATEGY_CLASSES:
            raise RegionUsageError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        nvm = os.path.abspath(os.fspath(nvm_dir))
        mass = os.path.abspath(os.fspath(mass_dir))
        _make_region_dirs(nvm, mass)
        lock_fd = _lock(nvm)
        try:
            db_path = os.path.join(nvm, DB_NAME)
            tmp_db = db_path + ".tmp"
            if os.path.exists(db_path):
                raise RegionExists(f"{nvm} already holds a region")
            marker = os.path.join(mass, MASS_ID)
            other = _read_marker(marker)
            if other is not None and other != _tmp_db_region_id(tmp_db):
                raise RegionExists(
                    f"{mass} already holds the mass tier of region {other}; remove it or pick another directory"
                )
            # (A marker matching the temporary database is our own interrupted create.)
            region_id = uuid.uuid4().hex
            try:
                _remove(tmp_db, tmp_db + "-journal")
                conn = sqlite3.connect(tmp_db, isolation_level=None)
                try:
                    conn.executescript(_COMMON_SCHEMA + _STRATEGY_CLASSES[strategy].schema)
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
                _fsync_path(tmp_db)
                _create_empty(os.path.join(mass, MASS_DATA))
                durable.atomic_write(marker, region_id.encode())
                _create_empty(os.path.join(nvm, NVM_DATA))
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
        lock_fd = _lock(nvm)
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
        slabs: list[_Slab] = []
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
            strategy_cls = _STRATEGY_CLASSES.get(meta.get("strategy", ""))
            if strategy_cls is None:
                raise RegionCorrupt(f"{db_path}: unknown strategy {meta.get('strategy')!r}")
            marker = _read_marker(os.path.join(mass, MASS_ID))
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
            slabs.append(_Slab(os.path.join(nvm, NVM_DATA), NVM, bs, nvm_used))
            slabs.append(_Slab(os.path.join(mass, MASS_DATA), MASS, bs, mass_used))
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
