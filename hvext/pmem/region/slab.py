"""A tier's data file as an array of block-sized slots, and giving freed slots back (hole punching)."""

from __future__ import annotations

import ctypes
import errno
import heapq
import os
from collections.abc import Callable, Iterable

from hvext.pmem.region.errors import RegionCorrupt

NVM, MASS = 0, 1  # tier numbers stored in the metadata
TIER_NAMES = ("nvm", "mass")


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


class Slab:
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
            raise RegionCorrupt(f"{TIER_NAMES[tier]} data file {path} cannot be opened") from err
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
