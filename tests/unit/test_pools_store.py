"""SQLite persistence: round trips, atomic commits, crash safety, stale and corrupt stores."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hvext.errors import HvextError
from hvext.memory import pools
from hvext.memory.pools import (
    DEFAULT_DB_PATH,
    ENV_DB_PATH,
    ConsistencyError,
    PoolNotFoundError,
    PoolStore,
    PoolStoreError,
    ResourceTree,
    StaleStoreError,
    default_db_path,
)
from hvext.memory.pools import store as pools_store


def db_rows(path: Path) -> tuple[list[tuple[object, ...]], dict[str, int]]:
    """Everything stored, read with a separate connection."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT * FROM pools ORDER BY path").fetchall()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    return rows, meta


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "pools.sqlite"  # the directory does not exist yet


@pytest.fixture
def tree(db: Path) -> ResourceTree:
    t = PoolStore(db).load(capacity_mib=8192)
    t.create("/prod", reservation_mib=2048, limit_mib=6144, shares=2000)
    t.create("/prod/web", reservation_mib=512)
    t.create("/prod/db", reservation_mib=1024, expandable=True, domain="vm-db")
    t.create("/dev", expandable=True)
    t.create("/dev/a", reservation_mib=100, limit_mib=900)
    t.assign("vm-a", "/dev/a")
    return t


def test_default_path_and_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_DB_PATH, raising=False)
    assert default_db_path() == DEFAULT_DB_PATH == Path("/var/lib/hvext/pools.sqlite")
    assert PoolStore().path == DEFAULT_DB_PATH
    monkeypatch.setenv(ENV_DB_PATH, str(tmp_path / "env.sqlite"))
    assert PoolStore().path == tmp_path / "env.sqlite"
    assert PoolStore(tmp_path / "arg.sqlite").path == tmp_path / "arg.sqlite"  # the argument wins
    PoolStore().load(capacity_mib=1)
    assert (tmp_path / "env.sqlite").exists()
    assert pools.PoolStore is PoolStore is pools_store.PoolStore  # re-exported by hvext.memory.pools


def test_round_trip(db: Path, tree: ResourceTree) -> None:
    tree.modify("/prod/web", reservation_mib=256, shares=5, limit_mib=3000)
    tree.set_capacity(9000)
    tree.create("/dev/a2")
    tree.remove("/dev/a2")
    tree.unassign("vm-db")
    again = PoolStore(db).load(capacity_mib=1)  # a stored tree ignores the capacity argument
    assert again.snapshot() == tree.snapshot()
    assert again.assignments() == {"vm-a": "/dev/a"} == tree.assignments()
    assert again.capacity_mib == 9000
    assert again.store is not None and tree.store is not None
    again.validate()


def test_each_commit_is_on_disk(db: Path, tree: ResourceTree) -> None:
    rows, meta = db_rows(db)
    assert ("/prod/web", 512, None, 1000, 0, None) in rows
    tree.modify("/prod/web", reservation_mib=300)
    rows2, meta2 = db_rows(db)
    assert ("/prod/web", 300, None, 1000, 0, None) in rows2
    assert meta2["generation"] == meta["generation"] + 1


def test_empty_store_needs_a_capacity(db: Path) -> None:
    with pytest.raises(PoolStoreError, match="capacity_mib"):
        PoolStore(db).load()
    tree = PoolStore(db).load(capacity_mib=4096)
    assert tree.capacity_mib == 4096 and list(tree.snapshot()) == ["/"]
    assert PoolStore(db).load().capacity_mib == 4096


def test_refused_modifications_leave_the_database_unchanged(db: Path, tree: ResourceTree) -> None:
    before = db_rows(db)
    snap = tree.snapshot()
    for call in (
        lambda: tree.modify("/prod", reservation_mib=10),
        lambda: tree.create("/prod/x", reservation_mib=5000),
        lambda: tree.modify("/dev/a", reservation_mib=1000),
        lambda: tree.set_capacity(100),
        lambda: tree.assign("vm-a", "/prod/web"),
        lambda: tree.remove("/prod", recursive=True),
    ):
        with pytest.raises(HvextError):
            call()
    assert db_rows(db) == before
    assert tree.snapshot() == snap


def test_database_failure_leaves_tree_and_database_unchanged(db: Path, tree: ResourceTree) -> None:
    """A write SQLite refuses midway (a trigger aborts it) is rolled back and not applied."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER no_delete BEFORE DELETE ON pools WHEN old.path = '/dev/a' "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        conn.execute(
            "CREATE TRIGGER no_update BEFORE UPDATE ON pools WHEN new.reservation_mib = 777 "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    tree.unassign("vm-a")
    before, snap = db_rows(db), tree.snapshot()
    with pytest.raises(PoolStoreError, match="injected failure") as info:
        tree.remove("/dev", recursive=True)  # deletes /dev first, then fails on /dev/a
    assert isinstance(info.value.__cause__, sqlite3.Error)
    with pytest.raises(PoolStoreError):
        tree.modify("/prod/web", reservation_mib=777)
    assert db_rows(db) == before
    assert tree.snapshot() == snap
    tree.modify("/prod/web", reservation_mib=776)  # the store still works
    assert PoolStore(db).load().snapshot() == tree.snapshot()


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from hvext.memory.pools import PoolStore
    store = PoolStore(sys.argv[1])
    tree = store.load()
    tree.unassign("vm-a")  # committed
    store._before_commit = lambda: os._exit(17)  # die inside the next transaction
    tree.remove("/dev", recursive=True)
    """
)


def test_crash_inside_a_transaction_leaves_no_half_modification(db: Path, tree: ResourceTree) -> None:
    store = tree.store
    assert store is not None
    store.close()
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(db)], capture_output=True, timeout=30)
    assert result.returncode == 17, result.stderr.decode()
    after = PoolStore(db).load()
    after.validate()
    assert after.exists("/dev") and after.exists("/dev/a")  # the removal was not applied, not even partly
    assert after.lookup("vm-a") is None  # the previous commit was
    assert after.lookup("vm-db") == "/prod/db"


def test_second_writer_is_refused_as_stale(db: Path, tree: ResourceTree) -> None:
    other = PoolStore(db).load()
    other.modify("/prod/web", shares=42)
    snap = tree.snapshot()
    with pytest.raises(StaleStoreError, match="reload"):
        tree.modify("/prod/web", shares=43)
    assert tree.snapshot() == snap
    assert PoolStore(db).load().get("/prod/web").shares == 42
    other.modify("/prod/web", shares=44)  # the up-to-date tree keeps working


def test_save_writes_a_whole_tree(tmp_path: Path) -> None:
    source = ResourceTree(capacity_mib=5000)
    source.create("/a", reservation_mib=1000, expandable=True)
    source.create("/a/b", reservation_mib=1500, domain="vm-b")
    store = PoolStore(tmp_path / "x.sqlite")
    store.save(source)
    with pytest.raises(PoolStoreError, match="overwrite"):
        store.save(source)
    loaded = store.load()
    assert loaded.snapshot() == source.snapshot()
    store.save(ResourceTree(capacity_mib=1), overwrite=True)
    with pytest.raises(StaleStoreError):
        loaded.modify("/a", shares=2)  # loaded before the overwrite
    assert store.load().capacity_mib == 1


def test_corrupt_stores_are_refused(db: Path, tree: ResourceTree) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO pools VALUES ('/ghost/child', 0, NULL, 1, 0, NULL)")
    with pytest.raises(PoolStoreError, match="invalid tree") as info:
        PoolStore(db).load()
    assert isinstance(info.value.__cause__, PoolNotFoundError)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM pools WHERE path = '/ghost/child'")
        conn.execute("UPDATE pools SET reservation_mib = 5000 WHERE path = '/prod/web'")
    with pytest.raises(PoolStoreError) as info:
        PoolStore(db).load()
    assert isinstance(info.value.__cause__, ConsistencyError)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE pools SET reservation_mib = 512 WHERE path = '/prod/web'")
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(PoolStoreError, match="schema version 99"):
        PoolStore(db).load()


def test_unusable_path(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(PoolStoreError, match="cannot open") as info:
        PoolStore(tmp_path / "adir").load(capacity_mib=1)
    assert info.value.__cause__ is not None
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PoolStoreError):
        PoolStore(tmp_path / "file" / "pools.sqlite").load(capacity_mib=1)
