"""The errors of an NVM region (:mod:`hvext.pmem.region`)."""

from __future__ import annotations

from hvext.errors import HvextError, UsageError


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
