"""SQLite persistence for the resource tree.

One file (default ``/var/lib/hvext/pools.sqlite``; ``$HVEXT_POOLS_DB`` or the
constructor's *path* override it) holds the capacity and one row per node.
A tree loaded from a store writes every committed modification to it in one
SQLite transaction *before* applying it in memory, so a crash leaves either
the old or the new tree on disk, never half a modification (a subtree removal
is one transaction however many rows it deletes).

Each transaction also bumps a ``generation`` counter and first checks that it
still has the value this tree last saw: a second process (or a second tree
loaded from the same file) that modified the file makes this one's writes
fail with :class:`StaleStoreError` instead of silently overwriting them.
Reload to continue.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

from hvext.memory.pools.errors import PoolStoreError, PoolUsageError, StaleStoreError
from hvext.memory.pools.node import NodeValue
from hvext.memory.pools.tree import ResourceTree
from hvext.memory.pools.validate import ROOT

__all__ = ["DEFAULT_DB_PATH", "ENV_DB_PATH", "Binding", "PoolStore", "default_db_path"]

DEFAULT_DB_PATH: Final = Path("/var/lib/hvext/pools.sqlite")
ENV_DB_PATH: Final = "HVEXT_POOLS_DB"
SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pools (
    path            TEXT PRIMARY KEY,
    reservation_mib INTEGER NOT NULL CHECK (reservation_mib >= 0),
    limit_mib       INTEGER CHECK (limit_mib IS NULL OR limit_mib >= 0),
    shares          INTEGER NOT NULL CHECK (shares > 0),
    expandable      INTEGER NOT NULL CHECK (expandable IN (0, 1)),
    domain          TEXT UNIQUE
);
"""


def default_db_path() -> Path:
    """``$HVEXT_POOLS_DB`` if set and non-empty, else ``/var/lib/hvext/pools.sqlite``."""
    env = os.environ.get(ENV_DB_PATH)
    return Path(env) if env else DEFAULT_DB_PATH


class PoolStore:
    """An embedded SQLite store for one resource tree.

    ``PoolStore(path).load()`` returns a tree that persists each committed
    modification; ``save(tree)`` writes a whole tree (initialisation, export).
    Thread-safe: one connection, used under a mutex (SQLite serialises
    writers anyway).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        # Test hook: called inside each write transaction just before COMMIT.
        self._before_commit: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"PoolStore({str(self.path)!r})"

    def __enter__(self) -> PoolStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later use reopens it)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ---------------------------------------------------------------- connection

    def _connect(self) -> sqlite3.Connection:
        """Open (once) the database, creating its directory and schema; caller holds the mutex."""
        if self._conn is not None:
            return self._conn
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as err:
            raise PoolStoreError(f"cannot open the pool store {str(self.path)!r}: {err}") from err
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # must be outside a transaction
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as err:
            conn.close()
            raise PoolStoreError(f"cannot open the pool store {str(self.path)!r}: {err}") from err
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise PoolStoreError(
                    f"pool store {str(self.path)!r} has schema version {row[0]}, this hvext reads {SCHEMA_VERSION}"
                )
            conn.execute("COMMIT")
        except (sqlite3.Error, PoolStoreError) as err:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
            if isinstance(err, PoolStoreError):
                raise
            raise PoolStoreError(f"cannot initialise the pool store {str(self.path)!r}: {err}") from err
        self._conn = conn
        return conn

    @contextlib.contextmanager
    def _transaction(self, binding: Binding | None) -> Iterator[tuple[sqlite3.Connection, int]]:
        """One write transaction; yields (connection, new generation).

        With a *binding*, refuses (StaleStoreError) when the stored generation
        is not the one the bound tree last wrote or read, and records the new
        one after COMMIT (still under the mutex, so concurrent commits of the
        same tree see each other's generation).  Any failure rolls back and
        raises PoolStoreError (with the cause kept).
        """
        with self._lock:
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as err:
                raise PoolStoreError(f"cannot write the pool store {str(self.path)!r}: {err}") from err
            try:
                row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
                current = row[0] if row is not None else 0
                if binding is not None and current != binding.generation:
                    raise StaleStoreError(
                        f"the pool store {str(self.path)!r} was changed by someone else "
                        f"(generation {current}, expected {binding.generation}); reload it"
                    )
                new = current + 1
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('generation', ?)", (new,))
                yield conn, new
                if self._before_commit is not None:
                    self._before_commit()
                conn.execute("COMMIT")
            except BaseException as err:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(err, sqlite3.Error):
                    raise PoolStoreError(f"writing the pool store {str(self.path)!r} failed: {err}") from err
                raise
            if binding is not None:
                binding.generation = new

    # ---------------------------------------------------------------- whole trees

    def load(self, *, capacity_mib: int | None = None) -> ResourceTree:
        """Load the stored tree, bound to this store (each commit is persisted).

        An empty store is initialised with *capacity_mib* (an empty tree);
        without it, an empty store is an error.  For a stored tree,
        *capacity_mib* is ignored (change it with ``tree.set_capacity``).
        """
        with self._lock:
            conn = self._connect()
            try:
                conn.execute("BEGIN")
                try:
                    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                    rows = conn.execute(
                        "SELECT path, reservation_mib, limit_mib, shares, expandable, domain FROM pools"
                    ).fetchall()
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as err:
                raise PoolStoreError(f"cannot read the pool store {str(self.path)!r}: {err}") from err
        if "capacity_mib" not in meta:
            if capacity_mib is None:
                raise PoolStoreError(
                    f"no pool tree in {str(self.path)!r}: load it with capacity_mib=... to create one"
                )
            ResourceTree(capacity_mib)  # validates the capacity before anything is written
            with self._transaction(None) as (conn, generation):
                if conn.execute("SELECT 1 FROM meta WHERE key = 'capacity_mib'").fetchone() is not None:
                    raise StaleStoreError(f"{str(self.path)!r} was initialised concurrently; load it again")
                conn.execute("INSERT INTO meta VALUES ('capacity_mib', ?)", (capacity_mib,))
            return ResourceTree.restore(capacity_mib, (), Binding(self, generation))
        try:
            return ResourceTree.restore(
                meta["capacity_mib"],
                ((p, r, lim, s, bool(e) if e in (0, 1) else e, d) for p, r, lim, s, e, d in rows),
                Binding(self, meta.get("generation", 0)),
            )
        except PoolUsageError as err:
            raise PoolStoreError(f"the pool store {str(self.path)!r} holds an invalid tree: {err}") from err

    def save(self, tree: ResourceTree, *, overwrite: bool = False) -> None:
        """Write a snapshot of *tree* (all of it, one transaction); does not bind it.

        Refuses to replace a stored tree unless *overwrite*.  Trees already
        loaded from this file become stale (their next write fails).
        """
        nodes = tree.snapshot()
        with self._transaction(None) as (conn, _generation):
            if not overwrite and conn.execute("SELECT 1 FROM meta WHERE key = 'capacity_mib'").fetchone():
                raise PoolStoreError(f"{str(self.path)!r} already holds a pool tree; pass overwrite=True")
            conn.execute("DELETE FROM pools")
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('capacity_mib', ?)", (nodes[ROOT].reservation_mib,))
            conn.executemany(
                "INSERT INTO pools VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (n.path, n.reservation_mib, n.limit_mib, n.shares, int(n.expandable), n.domain)
                    for n in nodes.values()
                    if not n.is_root
                ],
            )


class Binding:
    """A tree's link to its store: the writes a commit makes, with the generation it expects."""

    def __init__(self, store: PoolStore, generation: int) -> None:
        self.store = store
        self.generation = generation

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self.store._transaction(self) as (conn, _generation):
            yield conn

    def _one(self, conn: sqlite3.Connection, sql: str, args: Sequence[object], what: str) -> None:
        if conn.execute(sql, args).rowcount != 1:
            raise StaleStoreError(f"the pool store {str(self.store.path)!r} has no row for {what}; reload it")

    def insert(self, path: str, value: NodeValue, domain: str | None) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO pools VALUES (?, ?, ?, ?, ?, ?)",
                (path, value.reservation_mib, value.limit_mib, value.shares, int(value.expandable), domain),
            )

    def update(self, path: str, value: NodeValue) -> None:
        with self._write() as conn:
            self._one(
                conn,
                "UPDATE pools SET reservation_mib = ?, limit_mib = ?, shares = ?, expandable = ? WHERE path = ?",
                (value.reservation_mib, value.limit_mib, value.shares, int(value.expandable), path),
                path,
            )

    def delete(self, paths: Sequence[str]) -> None:
        with self._write() as conn:
            for path in paths:
                self._one(conn, "DELETE FROM pools WHERE path = ?", (path,), path)

    def set_domain(self, path: str, domain: str | None) -> None:
        with self._write() as conn:
            self._one(conn, "UPDATE pools SET domain = ? WHERE path = ?", (domain, path), path)

    def set_capacity(self, capacity_mib: int) -> None:
        with self._write() as conn:
            self._one(conn, "UPDATE meta SET value = ? WHERE key = 'capacity_mib'", (capacity_mib,), "the capacity")
