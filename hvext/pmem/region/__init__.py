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

Uses the standard library (SQLite, ctypes) and, of hvext, only small
helpers: :mod:`hvext.errors`, :mod:`hvext.durable` (lock files, atomic
writes), :mod:`hvext.paths` (private directories) and :mod:`hvext.units`
(sizes given as text).  One process owns a region at a time (``flock``);
an :class:`NVMRegion` object may be shared between threads (internal lock).
"""

from __future__ import annotations

from hvext.pmem.region.errors import (
    RegionBusy,
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
from hvext.pmem.region.region import NVMRegion
from hvext.pmem.region.strategies import STRATEGIES

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
