"""hvextd's reclaim loop orders VMs by how far they are above their pool entitlement: it reads the pool
store only (never creating it, as ``hvext pool-*`` do) and closes it again each round."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.testdriver import PLAIN_XML, running_domain

from hvext.daemon import reclaim_loop
from hvext.host import Domain
from hvext.memory.pools import ENV_DB_PATH, PoolStore
from hvext.units import MIB

XML = PLAIN_XML


@pytest.fixture
def domain() -> Iterator[Domain]:
    with running_domain(XML, "reclaim") as dom:
        yield dom


def _open_files(path: Path) -> list[str]:
    """Files of this process open on *path* (the database, its WAL and shared memory)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target.startswith(str(path)):
            found.append(target)
    return found


def test_a_missing_pool_store_is_not_created(domain: Domain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "state" / "pools.sqlite"
    monkeypatch.setenv(ENV_DB_PATH, str(db))
    assert reclaim_loop._pool_entitlements(domain.host, {domain.name: 512 * MIB}) == {}
    assert not db.exists() and not db.parent.exists()


def test_the_pool_store_is_read_and_closed(domain: Domain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "pools.sqlite"
    monkeypatch.setenv(ENV_DB_PATH, str(db))
    with PoolStore(db) as store:
        tree = store.load(capacity_mib=1024)
        tree.create("/dev", reservation_mib=128)
        tree.create("/dev/a", domain=domain.name)
    del tree
    assert _open_files(db) == []
    for _ in range(3):  # hvextd asks every round
        assert reclaim_loop._pool_entitlements(domain.host, {domain.name: 512 * MIB}) == {domain.name: 512 * MIB}
        assert _open_files(db) == []
