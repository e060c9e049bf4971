"""Errors raised by :mod:`hvext.rvm`.

Every error derives from :class:`RVMError`, itself a subclass of the hvext
root :class:`hvext.errors.HvextError`. An error never leaves data half
changed: the log, the segments and the mapped memory are as they were before
the failing call (an active transaction stays active). Errors that wrap an
operating-system failure keep it as ``__cause__``.

::

    RVMError
     +-- RVMLogError                 the log file
     |    +-- RVMLogNotFoundError       no log at that path (create it with create_log)
     |    +-- RVMLogExistsError         create_log refuses an existing file
     |    +-- RVMNotALogError           the file is not an RVM log (bad magic)
     |    +-- RVMVersionError           an RVM log of an unsupported format version
     |    +-- RVMLogCorruptError        header or committed records damaged
     |    +-- RVMLogBusyError           another RVM (process) has the log open
     |    +-- RVMLogFullError           a commit that truncation cannot make room for
     +-- RVMMappingError             map / unmap
     |    +-- RVMAlreadyMappedError     the segment range (or part of it) is mapped already
     |    +-- RVMNotMappedError         the region is not mapped by this RVM
     |    +-- RVMRegionBusyError        unmap while an active transaction uses the region
     +-- RVMRangeError               offset/length outside the region (also an IndexError)
     +-- RVMTransactionError         transactions
     |    +-- RVMInactiveTransactionError  the tid is not an active transaction
     |    +-- RVMNoRestoreError            abort of a no_restore transaction
     +-- RVMOptionError              a bad option or argument value (also a ValueError)
     +-- RVMRecoveryError            crash recovery cannot complete (e.g. a segment is missing)
     +-- RVMIOError                  an I/O call failed (the OSError is the cause)
     +-- RVMClosedError              the RVM was closed
"""

from __future__ import annotations

from hvext.errors import HvextError


class RVMError(HvextError):
    """Root of every error raised by hvext.rvm."""


class RVMLogError(RVMError):
    """A problem with the log file itself."""


class RVMLogNotFoundError(RVMLogError):
    """No log file at the given path; format one with ``create_log``."""


class RVMLogExistsError(RVMLogError):
    """``create_log`` refuses to overwrite an existing file without ``overwrite=True``."""


class RVMNotALogError(RVMLogError):
    """The file does not start with the RVM log magic: it is not an RVM log."""


class RVMVersionError(RVMLogError):
    """The file is an RVM log of a format version this code cannot read."""


class RVMLogCorruptError(RVMLogError):
    """The log header, or a record that must be valid, is damaged."""


class RVMLogBusyError(RVMLogError):
    """Another RVM instance (usually another process) holds the log open."""


class RVMLogFullError(RVMLogError):
    """A commit needs more log space than truncation can ever free."""


class RVMMappingError(RVMError):
    """A map or unmap request that cannot be honoured."""


class RVMAlreadyMappedError(RVMMappingError):
    """The segment range overlaps a range that is mapped already."""


class RVMNotMappedError(RVMMappingError):
    """The region is not (or no longer) mapped by this RVM."""


class RVMRegionBusyError(RVMMappingError):
    """The region cannot be unmapped: an active transaction has ranges in it."""


class RVMRangeError(RVMError, IndexError):
    """An offset/length pair outside the region (or a non-positive length)."""


class RVMTransactionError(RVMError):
    """A transaction primitive used in a way the transaction does not allow."""


class RVMInactiveTransactionError(RVMTransactionError):
    """The transaction id is unknown, already committed or already aborted."""


class RVMNoRestoreError(RVMTransactionError):
    """Abort was asked of a transaction begun with ``restore=False``."""


class RVMOptionError(RVMError, ValueError):
    """An unknown option, or an option or argument with a bad value."""


class RVMRecoveryError(RVMError):
    """Crash recovery cannot complete; the log is left untouched for a retry."""


class RVMIOError(RVMError):
    """An operating-system I/O call failed; the OSError is ``__cause__``."""


class RVMClosedError(RVMError):
    """The RVM instance was closed."""
