"""The power-loss store (hvext.pmem.store): format, incremental saves by hash, atomic switch, SIGKILL mid-save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hvext.pmem.store import BLOCK_SIZE, Store, StoreCorrupt, StoreUsageError

SIZE = 64 * BLOCK_SIZE
CHILD = Path(__file__).with_name("power_store_child.py")


def device(tmp_path: Path, data: bytes | None = None) -> Path:
    path = tmp_path / "dev.img"
    if data is None:
        with open(path, "wb") as f:
            f.truncate(SIZE)
    else:
        path.write_bytes(data)
    return path


def patch(path: Path, offset: int, data: bytes) -> bytearray:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    return bytearray(path.read_bytes())


def test_roundtrip_and_zero_blocks_are_not_stored(tmp_path: Path) -> None:
    dev = device(tmp_path)
    store = Store.create(tmp_path / "store", SIZE)
    expected = patch(dev, 3 * BLOCK_SIZE + 100, b"hello")
    result = store.save(dev)
    assert (result.blocks_written, result.bytes_written, result.blocks_checked) == (1, BLOCK_SIZE, 64)
    assert result.generation == 1
    store.restore(tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == expected
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["format"] == "hvext-power-store" and manifest["generation"] == 1
    assert sum(1 for g, _ in manifest["locations"] if g) == 1
    reopened = Store.open(tmp_path / "store")
    assert reopened.generation == 1 and reopened.stats()["bytes_on_disk"] == BLOCK_SIZE


def test_incremental_save_writes_only_changed_blocks(tmp_path: Path) -> None:
    rng = random.Random(5)
    dev = device(tmp_path, rng.randbytes(SIZE))
    store = Store.create(tmp_path / "store", SIZE)
    assert store.save(dev).bytes_written == SIZE
    patch(dev, 10 * BLOCK_SIZE + 7, b"x")
    expected = patch(dev, 40 * BLOCK_SIZE - 1, b"yz")  # straddles blocks 39 and 40
    second = store.save(dev)
    assert second.blocks_written == 3 and second.bytes_written == 3 * BLOCK_SIZE and second.generation == 2
    assert store.save(dev).bytes_written == 0  # nothing changed: no new generation
    assert store.generation == 2
    # a dirty list limits what is read; blocks outside it are not even looked at
    patch(dev, 50 * BLOCK_SIZE, b"q")
    expected = patch(dev, 60 * BLOCK_SIZE, b"r")
    limited = store.save(dev, [60])
    assert limited.blocks_checked == 1 and limited.blocks_written == 1 and limited.mode == "dirty-log"
    assert store.differs(dev) == [50]
    store.save(dev)
    store.restore(tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == expected
    # zeroing a block stores it as zero
    expected = patch(dev, 10 * BLOCK_SIZE, bytes(BLOCK_SIZE))
    store.save(dev)
    assert store.manifest["locations"][10] == [0, 0] or store.differs(dev) == []
    store.restore(tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == expected


def test_old_generations_are_collected_and_compacted(tmp_path: Path) -> None:
    dev = device(tmp_path, random.Random(1).randbytes(SIZE))
    store = Store.create(tmp_path / "store", SIZE)
    store.save(dev)
    for i in range(40):  # rewrite one block repeatedly: dead bytes in gen 1 stay bounded by compaction
        patch(dev, (i % 64) * BLOCK_SIZE, random.Random(100 + i).randbytes(BLOCK_SIZE))
        store.save(dev)
    stats = store.stats()
    assert stats["bytes_on_disk"] <= 2 * SIZE + BLOCK_SIZE, stats
    assert len(stats["files"]) <= 41
    store.restore(tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == dev.read_bytes()


def test_corruption_and_bad_input_are_reported(tmp_path: Path) -> None:
    dev = device(tmp_path, random.Random(2).randbytes(SIZE))
    store = Store.create(tmp_path / "store", SIZE)
    store.save(dev)
    with pytest.raises(StoreUsageError, match="already holds a store"):
        Store.create(tmp_path / "store", SIZE)
    with pytest.raises(StoreUsageError, match="holds 4194304 bytes"):
        Store.open_or_create(tmp_path / "store", 2 * SIZE)
    with pytest.raises(StoreUsageError, match="no power-loss store"):
        Store.open(tmp_path / "nothing")
    (tmp_path / "small.img").write_bytes(b"abc")
    with pytest.raises(StoreUsageError, match="has 3 bytes"):
        store.save(tmp_path / "small.img")
    gen = tmp_path / "store" / "gen-00000001.dat"
    raw = bytearray(gen.read_bytes())
    raw[5] ^= 0xFF
    gen.write_bytes(raw)
    with pytest.raises(StoreCorrupt, match="SHA-256"):
        store.restore(tmp_path / "out.img")
    assert not (tmp_path / "out.img").exists()  # the target is only replaced by a complete restore
    (tmp_path / "store" / "manifest.json").write_text("{}")
    with pytest.raises(StoreCorrupt):
        Store.open(tmp_path / "store")


@pytest.mark.parametrize("point", ["block", "switch"])
def test_sigkill_mid_save_keeps_the_previous_copy(tmp_path: Path, point: str) -> None:
    dev = device(tmp_path, random.Random(3).randbytes(SIZE))
    store = Store.create(tmp_path / "store", SIZE)
    store.save(dev)
    good = dev.read_bytes()
    patch(dev, 0, random.Random(4).randbytes(SIZE))  # every block changes: a long save
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    child = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path / "store"), str(dev), point],
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = child.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith(point), line
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / "store" / "gen-00000002.dat").exists()  # the interrupted generation, never referenced
    after = Store.open(tmp_path / "store")
    assert after.generation == 1
    after.restore(tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == good
    # the next save completes, drops the leftover, and restores the new contents
    result = after.save(dev)
    assert result.generation == 2 and result.blocks_written == 64
    after.restore(tmp_path / "out.img")
    assert (tmp_path / "out.img").read_bytes() == dev.read_bytes()
    assert sorted(p.name for p in (tmp_path / "store").glob("gen-*")) == ["gen-00000002.dat"]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_store_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        dev = device(tmp_path, random.Random(3).randbytes(SIZE))
        store = Store.create(tmp_path / "a" / "store", SIZE)
        store.save(dev)
        patch(dev, 0, b"new")
        store.save(dev)
        store.restore(tmp_path / "out.img")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a" / "store") == 0o700
    files = list((tmp_path / "a" / "store").iterdir())
    assert {p.name for p in files} >= {"manifest.json", "store.lock", "gen-00000002.dat"}
    assert all(_mode(p) == 0o600 for p in files), {p.name: oct(_mode(p)) for p in files}
    # an existing empty directory is adopted and made private; a symlink is refused
    (tmp_path / "empty").mkdir(mode=0o755)
    Store.create(tmp_path / "empty", SIZE)
    assert _mode(tmp_path / "empty") == 0o700
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(StoreUsageError, match="symlink"):
        Store.create(tmp_path / "link", SIZE)
    assert not list((tmp_path / "elsewhere").iterdir())


def test_create_refuses_a_directory_with_someone_elses_files(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(StoreUsageError, match="not empty"):
        Store.create(tmp_path / "photos", SIZE)
    assert sorted(p.name for p in (tmp_path / "photos").iterdir()) == ["cat.jpg"]


def test_create_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    """The store directory goes through paths.private_dir: an existing world-writable one (others
    may have put links in it) is refused, not adopted with a chmod."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StoreUsageError, match="writable by every user"):
        Store.create(shared, SIZE)
    assert _mode(shared) == 0o777 and not list(shared.iterdir())


def test_restore_writes_a_new_file_not_one_planted_at_the_temp_name(tmp_path: Path) -> None:
    """Restore (as root, maybe in a sticky world-writable directory) writes guest memory into a file it
    made itself: a file someone planted at the old fixed temp name must not receive it (nor be
    renamed over the backing, where its planter would keep reading it)."""
    data = random.Random(7).randbytes(SIZE)
    store = Store.create(tmp_path / "store", SIZE)
    store.save(device(tmp_path, data))
    target = tmp_path / "backing.img"
    planted = tmp_path / f".{target.name}.restore-{os.getpid()}"
    planted.write_bytes(b"planted")
    with open(planted, "rb") as spy:
        store.restore(target)
        assert target.read_bytes() == data
        assert spy.read() == b"planted"
    assert _mode(target) == 0o660


def test_remove_deletes_only_what_hvext_wrote(tmp_path: Path) -> None:
    dev = device(tmp_path, random.Random(4).randbytes(SIZE))
    store = Store.create(tmp_path / "store", SIZE)
    store.save(dev)
    (tmp_path / "store" / "README").write_text("the user's notes")
    (tmp_path / "store" / "gen-1.dat").write_text("not one of hvext's names")
    removed = Store.remove(tmp_path / "store")
    assert set(removed) == {"manifest.json", "store.lock", "gen-00000001.dat"}
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["README", "gen-1.dat"]
    Store.remove(tmp_path / "store")  # again: nothing of hvext's left, nothing else touched
    assert (tmp_path / "store" / "README").exists()
    (tmp_path / "store" / "README").unlink()
    (tmp_path / "store" / "gen-1.dat").unlink()
    store = Store.create(tmp_path / "store", SIZE)
    Store.remove(tmp_path / "store")
    assert not (tmp_path / "store").exists()  # left empty: removed
    assert Store.remove(tmp_path / "store") == []


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"format": ' + b"9" * 5000 + b"}", b"\xff", b"{]"], ids=["deep", "huge-int", "not-utf8", "not-json"])
def test_a_damaged_manifest_is_store_corrupt(tmp_path: Path, content: bytes) -> None:
    """A damaged or hostile manifest gave RecursionError (deep nesting) instead of StoreCorrupt."""
    store = tmp_path / "store"
    Store.create(store, BLOCK_SIZE)
    (store / "manifest.json").write_bytes(content)
    with pytest.raises(StoreCorrupt, match="manifest.json"):
        Store.open(store)


def test_remove_deletes_a_manifest_temp_left_by_a_killed_saver(tmp_path: Path) -> None:
    """A saver killed between creating and renaming its temporary manifest (hvext.durable's name, or
    an older hvext's) leaves it behind; it is hvext's file, so remove deletes it."""
    Store.create(tmp_path / "store", SIZE)
    leftovers = {f".manifest.json.tmp-{os.getpid()}-0badcafe", ".manifest.json.tmp-42"}
    for name in leftovers:
        (tmp_path / "store" / name).write_bytes(b"{")
    removed = Store.remove(tmp_path / "store")
    assert set(removed) == {"manifest.json"} | leftovers
    assert not (tmp_path / "store").exists()


def test_restore_makes_the_rename_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The restored file replaces the target by a rename; like a save's manifest switch, the rename is
    made durable by an fsync of the target's directory after it (else a crash may lose the file)."""
    dev = device(tmp_path)
    store = Store.create(tmp_path / "store", SIZE)
    expected = patch(dev, 5 * BLOCK_SIZE, b"restored")
    store.save(dev)
    out = tmp_path / "backing"
    out.mkdir()
    target = out / "dev.img"
    events: list[tuple[str, str]] = []
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src: object, dst: object, **kwargs: object) -> None:
        real_replace(src, dst, **kwargs)  # type: ignore[arg-type]
        events.append(("replace", os.fspath(dst)))  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    store.restore(target)
    monkeypatch.undo()
    assert target.read_bytes() == expected
    renamed = events.index(("replace", str(target)))
    assert ("fsync", str(out)) in events[renamed + 1:], events
