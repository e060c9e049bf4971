"""hvext.rvm: Lightweight Recoverable Virtual Memory (capability C20).

Transactional persistence for ranges of memory mapped from external data
segment files, after Satyanarayanan et al.'s LRVM: a redo-only log with
no-undo/redo value logging, no_restore and no_flush modes, crash recovery by
replaying the log, and truncation in epochs alongside forward processing.

Standard library only: this package is copied into the guest image together
with ``hvext/__init__.py``, ``hvext/errors.py`` and ``hvext/durable.py``. See ``docs/rvm.md``.

::

    from hvext import rvm
    rvm.create_log("/data/app.log", 64 << 20)
    with rvm.RVM("/data/app.log") as r:
        region = r.map("/data/app.seg", 1 << 20)
        with r.transaction() as t:
            t.set_range(region, 0, 5)[:] = b"hello"
"""

from hvext.rvm.core import RVM, Region, Transaction, create_log, scan_log
from hvext.rvm.errors import (
    RVMAlreadyMappedError,
    RVMClosedError,
    RVMError,
    RVMInactiveTransactionError,
    RVMIOError,
    RVMLogBusyError,
    RVMLogCorruptError,
    RVMLogError,
    RVMLogExistsError,
    RVMLogFullError,
    RVMLogNotFoundError,
    RVMMappingError,
    RVMNoRestoreError,
    RVMNotALogError,
    RVMNotMappedError,
    RVMOptionError,
    RVMRangeError,
    RVMRecoveryError,
    RVMRegionBusyError,
    RVMTransactionError,
    RVMVersionError,
)
from hvext.rvm.logformat import VERSION as LOG_FORMAT_VERSION

__all__ = [
    "LOG_FORMAT_VERSION",
    "RVM",
    "Region",
    "Transaction",
    "create_log",
    "scan_log",
    "RVMAlreadyMappedError",
    "RVMClosedError",
    "RVMError",
    "RVMInactiveTransactionError",
    "RVMIOError",
    "RVMLogBusyError",
    "RVMLogCorruptError",
    "RVMLogError",
    "RVMLogExistsError",
    "RVMLogFullError",
    "RVMLogNotFoundError",
    "RVMMappingError",
    "RVMNoRestoreError",
    "RVMNotALogError",
    "RVMNotMappedError",
    "RVMOptionError",
    "RVMRangeError",
    "RVMRecoveryError",
    "RVMRegionBusyError",
    "RVMTransactionError",
    "RVMVersionError",
]
