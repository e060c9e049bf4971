"""The locks of the tree's locking protocol (described in :mod:`hvext.memory.pools.tree`)."""

from __future__ import annotations

import threading
from collections.abc import Callable

__all__ = ["Held", "RWLock"]


class RWLock:
    """A writer-preferring readers-writer lock (not re-entrant)."""

    __slots__ = ("_cond", "_readers", "_writer", "_waiting_writers")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class Held:
    """The locks one operation holds; released in reverse order when it ends."""

    def __init__(self) -> None:
        self._releases: list[Callable[[], None]] = []

    def read(self, lock: RWLock) -> None:
        lock.acquire_read()
        self._releases.append(lock.release_read)

    def write(self, lock: RWLock) -> None:
        lock.acquire_write()
        self._releases.append(lock.release_write)

    def mutex(self, lock: threading.Lock) -> None:
        lock.acquire()
        self._releases.append(lock.release)

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc: object) -> None:
        while self._releases:
            self._releases.pop()()
