"""Unit tests for hvext.pmem.region.NVMRegion, both purge strategies."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest

from hvext.errors import HvextError, UsageError
from hvext.pmem import region as region_mod
from hvext.pmem.region import region as region_core
from hvext.pmem.region import slab
from hvext.pmem.region import (
    STRATEGIES,
    NVMRegion,
    RegionBusy,
    RegionClosed,
    RegionCorrupt,
    RegionExists,
    RegionMismatch,
    RegionNotFound,
    RegionUsageError,
    SnapshotExists,
    SnapshotNotFound,
)

BS = 4096


@pytest.fixture(params=STRATEGIES)
def strategy(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def dirs(tmp_path):
    return tmp_path / "nvm", tmp_path / "mass"


@pytest.fixture
def reg(dirs, strategy):
    r = NVMRegion.create(dirs[0], dirs[1], 32 * BS, block_size=BS, strategy=strategy)
    yield r
    r.close()


def block(ch: str, n: int = 1) -> bytes:
    return ch.encode() * (BS * n)


# ---------------------------------------------------------------- basics


def test_fresh_region_reads_zeros(reg):
    assert reg.read(0, 32 * BS) == bytes(32 * BS)
    assert reg.snapshots() == []
    s = reg.stats()
    assert (s["nvm_blocks"], s["mass_blocks"], s["snapshots"]) == (0, 0, 0)
    assert reg.check() == []


def test_write_read_unaligned_and_reopen(reg, dirs):
    reg.write(BS - 3, b"hello world")
    reg.write(5 * BS + 100, b"x" * (2 * BS))
    assert reg.read(BS - 3, 11) == b"hello world"
    assert reg.read(0, BS - 3) == bytes(BS - 3)
    assert reg.read(5 * BS + 99, 2 * BS + 2) == b"\0" + b"x" * (2 * BS) + b"\0"
    assert reg.stats()["running_blocks"] == 5  # blocks 0, 1, 5, 6, 7
    reg.close()
    with NVMRegion.open(*dirs) as again:
        assert again.read(BS - 3, 11) == b"hello world"
        assert again.read(5 * BS + 100, 2 * BS) == b"x" * (2 * BS)
        assert again.check() == []


def test_overwrite_without_snapshot_keeps_one_block(reg):
    for ch in "abcde":
        reg.write(0, block(ch))
    assert reg.read(0, BS) == block("e")
    assert reg.stats()["nvm_blocks"] == 1
    assert reg.purge()["blocks_moved"] == 0


def test_snapshot_is_copy_on_write(reg):
    reg.write(0, block("a", 4))
    reg.snapshot("one")
    assert reg.stats()["nvm_blocks"] == 4  # shared, not copied
    reg.write(BS, block("b"))
    assert reg.read(0, 4 * BS) == block("a") + block("b") + block("a", 2)
    assert reg.read_snapshot("one", 0, 4 * BS) == block("a", 4)
    s = reg.stats()
    assert (s["nvm_blocks"], s["nonactive_nvm_blocks"], s["running_blocks"]) == (5, 1, 4)
    assert reg.check() == []


def test_snapshots_listed_in_creation_order(reg):
    for name in ("b", "a", "c.2", "Z_1-x"):
        reg.snapshot(name)
    assert reg.snapshots() == ["b", "a", "c.2", "Z_1-x"]
    reg.delete_snapshot("a")
    assert reg.snapshots() == ["b", "c.2", "Z_1-x"]
    assert reg.stats()["snapshots"] == 3


def test_context_manager_closes(dirs, strategy):
    with NVMRegion.create(*dirs, 8 * BS, strategy=strategy) as r:
        r.write(0, b"x")
    with pytest.raises(RegionClosed):
        r.read(0, 1)
    r.close()  # idempotent
    with NVMRegion.open(*dirs) as r2:
        assert r2.read(0, 1) == b"x"
        assert r2.strategy == strategy


def test_size_as_text(dirs):
    with NVMRegion.create(*dirs, "1M", block_size=BS) as r:
        assert r.size == 1024 * 1024
        assert r.strategy == "virtblocks"


# ---------------------------------------------------------------- purge


def fill_snapshot_overwrite(reg, snapshots: int, blocks: int = 16, overwrite: int = 4) -> None:
    """Same data for every snapshot count: fill, snapshot, overwrite a few."""
    reg.write(0, block("a", blocks))
    for i in range(snapshots):
        reg.snapshot(f"s{i}")
    for b in range(overwrite):
        reg.write(b * 2 * BS, block("n"))


@pytest.mark.parametrize("snapshots", [1, 3, 8])
def test_purge_moves_exactly_the_nonactive_blocks(reg, snapshots):
    fill_snapshot_overwrite(reg, snapshots)
    before = reg.stats()
    assert before["nvm_blocks"] == 20 and before["nonactive_nvm_blocks"] == 4
    result = reg.purge()
    assert result["blocks_moved"] == 4
    assert result["nvm_blocks_freed"] == 4
    assert result["strategy"] == reg.strategy and result["seconds"] >= 0
    if reg.strategy == "virtblocks":
        assert result["entries_rewritten"] == 4  # one virtblock entry per block
    else:
        assert result["entries_rewritten"] == 4 * snapshots  # every snapshot's L1 entry
        assert result["entries_scanned"] == 16 * snapshots
    after = reg.stats()
    assert after["nvm_blocks"] == after["running_blocks"] == 16
    assert after["mass_blocks"] == 4
    assert after["nonactive_nvm_blocks"] == 0
    for i in range(snapshots):
        assert reg.read_snapshot(f"s{i}", 0, 16 * BS) == block("a", 16)
    expected = bytearray(block("a", 16))
    for b in range(4):
        expected[b * 2 * BS : (b * 2 + 1) * BS] = block("n")
    assert reg.read(0, 16 * BS) == expected
    assert reg.check() == []
    again = reg.purge()
    assert again["blocks_moved"] == 0 and again["entries_rewritten"] == 0


def test_purge_after_a_chain_of_snapshots(reg):
    # Each snapshot holds a different version of block 0.
    for i in range(5):
        reg.write(0, bytes([65 + i]) * BS)
        reg.snapshot(f"v{i}")
    reg.write(0, block("z"))
    assert reg.purge()["blocks_moved"] == 5
    assert reg.stats()["nvm_blocks"] == 1
    for i in range(5):
        assert reg.read_snapshot(f"v{i}", 0, BS) == bytes([65 + i]) * BS
    # a snapshot taken after purge, and writes on top of it
    reg.snapshot("after")
    reg.write(10, b"tail")
    assert reg.read_snapshot("after", 0, BS) == block("z")
    assert reg.purge()["blocks_moved"] == 1
    assert reg.read_snapshot("after", 0, BS) == block("z")
    assert reg.check() == []


def test_purge_survives_reopen(reg, dirs):
    fill_snapshot_overwrite(reg, 3)
    reg.purge()
    reg.close()
    with NVMRegion.open(*dirs) as r:
        assert r.stats()["mass_blocks"] == 4
        assert r.read_snapshot("s2", 0, 16 * BS) == block("a", 16)
        assert r.check() == []


def test_purge_gives_nvm_space_back(dirs, strategy):
    with NVMRegion.create(*dirs, 64 * BS, block_size=BS, strategy=strategy) as r:
        r.write(0, block("a", 64))
        r.snapshot("s")
        r.write(0, block("b", 32))
        before = r.stats()["nvm_bytes_allocated"]
        r.purge()
        after = r.stats()
        if before < 96 * BS or not slab._FALLOCATE:
            pytest.skip("file system does not report or punch allocated blocks")
        assert after["nvm_bytes_allocated"] <= 64 * BS
        assert after["mass_bytes_allocated"] >= 32 * BS


# ---------------------------------------------------------------- delete


def test_delete_frees_mass_blocks(reg):
    fill_snapshot_overwrite(reg, 3)
    reg.purge()
    assert reg.stats()["mass_blocks"] == 4
    assert reg.delete_snapshot("s0") == {"nvm_blocks_freed": 0, "mass_blocks_freed": 0}
    assert reg.delete_snapshot("s1")["mass_blocks_freed"] == 0
    assert reg.stats()["mass_blocks"] == 4
    assert reg.delete_snapshot("s2") == {"nvm_blocks_freed": 0, "mass_blocks_freed": 4}
    s = reg.stats()
    assert (s["mass_blocks"], s["nvm_blocks"], s["snapshots"]) == (0, 16, 0)
    assert reg.check() == []


def test_delete_frees_unpurged_nvm_blocks(reg):
    fill_snapshot_overwrite(reg, 2)
    reg.delete_snapshot("s1")
    assert reg.stats()["nvm_blocks"] == 20
    assert reg.delete_snapshot("s0")["nvm_blocks_freed"] == 4
    assert reg.stats()["nvm_blocks"] == 16
    assert reg.purge()["blocks_moved"] == 0
    assert reg.check() == []


def test_delete_middle_snapshot_keeps_neighbours(reg):
    reg.write(0, block("a"))
    reg.snapshot("s1")
    reg.write(0, block("b"))
    reg.snapshot("s2")
    reg.write(0, block("c"))
    reg.snapshot("s3")
    reg.write(0, block("d"))
    reg.purge()
    reg.delete_snapshot("s2")
    assert reg.read_snapshot("s1", 0, BS) == block("a")
    assert reg.read_snapshot("s3", 0, BS) == block("c")
    assert reg.stats()["mass_blocks"] == 2
    reg.snapshot("s2")  # the name is free again
    assert reg.read_snapshot("s2", 0, BS) == block("d")
    assert reg.check() == []


# ---------------------------------------------------------------- errors


def test_errors_are_hvext_usage_errors():
    for cls in (RegionUsageError, RegionNotFound, RegionExists, RegionMismatch, SnapshotExists, SnapshotNotFound):
        assert issubclass(cls, UsageError) and issubclass(cls, HvextError)
    for cls in (RegionBusy, RegionClosed, RegionCorrupt):
        assert issubclass(cls, HvextError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 0},
        {"size": -4096},
        {"size": 4096 * 3 + 1},
        {"size": 4096, "block_size": 3000},
        {"size": 4096, "block_size": 256},
        {"size": 1 << 23, "block_size": 1 << 22},
        {"size": 4096, "block_size": True},
        {"size": 4096.0},
        {"size": "lots"},
        {"size": 4096, "strategy": "magic"},
    ],
)
def test_create_validates(dirs, kwargs):
    with pytest.raises(RegionUsageError):
        NVMRegion.create(*dirs, **kwargs)
    assert not (dirs[0] / "region.db").exists()


def test_range_validation(reg):
    size = 32 * BS
    for offset, length in ((-1, 1), (0, -1), (size, 1), (size - 1, 2), (1 << 62, 1)):
        with pytest.raises(RegionUsageError, match="outside the region"):
            reg.read(offset, length)
        if length > 0:
            with pytest.raises(RegionUsageError, match="outside the region"):
                reg.write(offset, b"x" * length)
    reg.snapshot("s")
    with pytest.raises(RegionUsageError):
        reg.read_snapshot("s", size, 1)
    with pytest.raises(RegionUsageError):
        reg.read(0.5, 1)
    with pytest.raises(RegionUsageError, match="bytes-like"):
        reg.write(0, "text")
    assert reg.read(size, 0) == b""
    reg.write(size, b"")  # empty write at the end is fine
    assert reg.stats()["nvm_blocks"] == 0


@pytest.mark.parametrize("name", ["", "../etc", "a b", "-x", "x" * 65, None, 7, "é"])
def test_snapshot_names_validated(reg, name):
    with pytest.raises(RegionUsageError, match="invalid snapshot name"):
        reg.snapshot(name)
    assert reg.snapshots() == []


def test_duplicate_and_unknown_snapshots(reg):
    reg.snapshot("s")
    with pytest.raises(SnapshotExists):
        reg.snapshot("s")
    with pytest.raises(SnapshotNotFound):
        reg.read_snapshot("nope", 0, 1)
    with pytest.raises(SnapshotNotFound):
        reg.delete_snapshot("nope")
    assert reg.snapshots() == ["s"]
    assert reg.check() == []


def test_create_refuses_existing_region(dirs, tmp_path):
    NVMRegion.create(*dirs, 8 * BS).close()
    with pytest.raises(RegionExists):
        NVMRegion.create(*dirs, 8 * BS)
    # another region's mass tier is refused too
    with pytest.raises(RegionExists, match="mass tier"):
        NVMRegion.create(tmp_path / "other", dirs[1], 8 * BS)


def test_open_errors(dirs, tmp_path):
    with pytest.raises(RegionNotFound):
        NVMRegion.open(*dirs)
    NVMRegion.create(*dirs, 8 * BS).close()
    NVMRegion.create(tmp_path / "nvm2", tmp_path / "mass2", 8 * BS).close()
    with pytest.raises(RegionMismatch):
        NVMRegion.open(dirs[0], tmp_path / "mass2")
    with pytest.raises(RegionMismatch, match="no region marker"):
        NVMRegion.open(dirs[0], tmp_path / "empty")
    with NVMRegion.open(*dirs):
        with pytest.raises(RegionBusy):
            NVMRegion.open(*dirs)
    NVMRegion.open(*dirs).close()  # the lock was released


def test_corrupt_metadata_keeps_cause(dirs):
    NVMRegion.create(*dirs, 8 * BS).close()
    for suffix in ("", "-wal", "-shm"):
        path = dirs[0] / f"region.db{suffix}"
        if path.exists():
            path.unlink()
    (dirs[0] / "region.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegionCorrupt) as info:
        NVMRegion.open(*dirs)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_truncated_data_file_detected(dirs, strategy):
    with NVMRegion.create(*dirs, 8 * BS, strategy=strategy) as r:
        r.write(0, block("a", 4))
    os.truncate(dirs[0] / "nvm.dat", BS)
    with pytest.raises(RegionCorrupt, match="references slot"):
        NVMRegion.open(*dirs)


def test_failed_operation_rolls_back(reg, monkeypatch):
    reg.write(0, block("a", 2))
    reg.snapshot("s")

    def boom(op: str, point: str) -> None:
        if point == "data-synced":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(region_core, "_fault_hook", boom)
    with pytest.raises(region_mod.RegionIOError) as info:
        reg.write(0, block("b", 2))
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(region_mod.RegionIOError):
        reg.purge()
    monkeypatch.setattr(region_core, "_fault_hook", None)
    assert reg.read(0, 2 * BS) == block("a", 2)
    assert reg.stats()["nvm_blocks"] == 2
    assert reg.check() == []
    reg.write(0, block("c"))
    assert reg.purge()["blocks_moved"] == 1
    assert reg.check() == []


def test_create_retries_after_interrupted_create(dirs):
    # A create killed before its final rename leaves region.db.tmp and the
    # mass marker; a new create recognises them as its own leftovers.
    NVMRegion.create(*dirs, 8 * BS).close()
    os.rename(dirs[0] / "region.db", dirs[0] / "region.db.tmp")
    with NVMRegion.create(*dirs, 16 * BS, strategy="pointer-elimination") as r:
        assert r.size == 16 * BS and r.strategy == "pointer-elimination"
    assert not (dirs[0] / "region.db.tmp").exists()
    NVMRegion.open(*dirs).close()


def test_one_directory_for_both_tiers(tmp_path, strategy):
    with NVMRegion.create(tmp_path, tmp_path, 8 * BS, strategy=strategy) as r:
        r.write(0, block("a", 2))
        r.snapshot("s")
        r.write(0, block("b"))
        assert r.purge()["blocks_moved"] == 1
    with NVMRegion.open(tmp_path, tmp_path) as r:
        assert r.read_snapshot("s", 0, 2 * BS) == block("a", 2)
        assert r.check() == []


def test_create_makes_private_dirs_and_refuses_links(tmp_path):
    """--nvm-dir may be under world-writable /dev/shm: the directories are made 0700 whatever the
    umask, and a planted symlink (or a dir others can write) is refused, nothing written through it."""
    old = os.umask(0o022)
    try:
        NVMRegion.create(tmp_path / "a" / "nvm", tmp_path / "a" / "mass", "64K").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "nvm").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "mass").st_mode) == 0o700
    (tmp_path / "victim").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "victim", target_is_directory=True)
    with pytest.raises(RegionUsageError, match="symlink"):
        NVMRegion.create(tmp_path / "link", tmp_path / "mass2", "64K")
    assert not list((tmp_path / "victim").iterdir())
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(RegionUsageError, match="writable by every user"):
        NVMRegion.create(tmp_path / "nvm3", tmp_path / "open", "64K")


def test_create_failing_to_write_the_marker_leaves_no_temp_file(dirs, monkeypatch):
    """The mass marker is written through hvext.durable: a failure leaves neither a temp file nor a
    marker, and a new create succeeds."""
    from hvext import durable

    def full(step: str) -> None:
        if step == "written":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "_step_hook", full)
    with pytest.raises(region_mod.RegionIOError):
        NVMRegion.create(*dirs, 8 * BS)
    assert sorted(p.name for p in dirs[1].iterdir()) == ["mass.dat"]
    monkeypatch.setattr(durable, "_step_hook", None)
    NVMRegion.create(*dirs, 8 * BS).close()


def test_region_lock_is_never_taken_through_a_symlink(dirs, tmp_path):
    NVMRegion.create(*dirs, 8 * BS).close()
    (dirs[0] / "region.lock").unlink()
    (dirs[0] / "region.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(region_mod.RegionIOError):
        NVMRegion.open(*dirs)
    assert not (tmp_path / "victim").exists()


def test_region_package_modules_import_only_public_names_of_each_other():
    import ast
    import pathlib

    for src in pathlib.Path(region_mod.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hvext.pmem.region"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{src.name} imports private {private} from {node.module}"
