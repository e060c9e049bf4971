"""Unit tests of hvext.durable: atomic replacement (also killed at every step), fsync_dir, lock files."""

from __future__ import annotations

import ast
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hvext import durable

ROOT = Path(__file__).resolve().parents[2]
OLD = b"old contents\n" * 1000
NEW = bytes(range(256)) * (12 << 12)  # 12 MiB: several write chunks

CHILD = """
import os, signal, sys
from hvext import durable
path, step, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
def hook(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)
durable._step_hook = hook
durable.atomic_write(path, bytes(range(256)) * (size // 256), mode=0o640)
"""


def _temps(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("step", durable.STEPS)
def test_atomic_write_killed_at_each_step_leaves_old_or_new(tmp_path: Path, step: str) -> None:
    target = tmp_path / "file"
    target.write_bytes(OLD)
    child = subprocess.run([sys.executable, "-c", CHILD, str(target), step, str(len(NEW))], cwd=ROOT,
                           capture_output=True, timeout=60, check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    expected = NEW if durable.STEPS.index(step) >= durable.STEPS.index("renamed") else OLD
    assert target.read_bytes() == expected
    if expected is NEW:
        assert not _temps(tmp_path)
        assert target.stat().st_mode & 0o777 == 0o640


def test_atomic_write_killed_anywhere_in_large_writes_is_never_torn(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(OLD)
    loop = ("import sys\nfrom hvext import durable\n"
            "old, new = b'old contents\\n' * 1000, bytes(range(256)) * (12 << 12)\n"
            "while True:\n    durable.atomic_write(sys.argv[1], new)\n    durable.atomic_write(sys.argv[1], old)\n")
    for delay in (0.4, 0.47, 0.53, 0.61, 0.79):
        child = subprocess.Popen([sys.executable, "-c", loop, str(target)], cwd=ROOT)
        try:
            time.sleep(delay)  # the interpreter's start, then somewhere in a write
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert target.read_bytes() in (OLD, NEW)


def test_atomic_write_replaces_with_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"x")
    old_umask = os.umask(0o077)
    try:
        durable.atomic_write(target, b"new", mode=0o644)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o644
    durable.atomic_write(tmp_path / "g", bytearray(b"private"))
    assert (tmp_path / "g").stat().st_mode & 0o777 == 0o600
    assert not _temps(tmp_path)


@pytest.mark.parametrize("step", ["created", "written", "synced"])
def test_atomic_write_error_removes_the_temp_file_and_keeps_the_old(tmp_path: Path, step: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "f"
    target.write_bytes(OLD)

    def hook(name: str) -> None:
        if name == step:
            raise RuntimeError(f"failed at {name}")

    monkeypatch.setattr(durable, "_step_hook", hook)
    with pytest.raises(RuntimeError):
        durable.atomic_write(target, NEW)
    assert target.read_bytes() == OLD
    assert not _temps(tmp_path)


def test_atomic_write_failed_rename_removes_the_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "d"
    target.mkdir()
    (target / "inside").write_bytes(b"")
    with pytest.raises(IsADirectoryError):
        durable.atomic_write(target, b"data")
    assert not _temps(tmp_path)


def test_atomic_write_temp_names_are_unique_and_match_the_pattern(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    seen: list[str] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    threads = [threading.Thread(target=durable.atomic_write, args=(tmp_path / "f.json", b"%d" % i))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 8
    assert all(re.fullmatch(durable.temp_pattern("f.json"), name) for name in seen)
    assert (tmp_path / "f.json").read_bytes() in {b"%d" % i for i in range(8)}


def test_fsync_dir_accepts_a_directory_and_refuses_a_file(tmp_path: Path) -> None:
    durable.fsync_dir(tmp_path)
    durable.fsync_dir(str(tmp_path))
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        durable.fsync_dir(tmp_path / "f")


def test_lock_file_is_exclusive_private_and_released_on_close(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    old_umask = os.umask(0)
    try:
        fd = durable.lock_file(path, wait=0)
    finally:
        os.umask(old_umask)
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        with pytest.raises(BlockingIOError):
            durable.lock_file(path, wait=0)
        started = time.monotonic()
        with pytest.raises(BlockingIOError):
            durable.lock_file(path, wait=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        os.close(fd)
    with durable.locked(path, wait=0):
        with pytest.raises(BlockingIOError):
            durable.lock_file(path, wait=0)
    os.close(durable.lock_file(path))


def test_lock_file_waits_for_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    fd = durable.lock_file(path)
    threading.Timer(0.3, os.close, (fd,)).start()
    started = time.monotonic()
    with durable.locked(path, wait=5):
        assert time.monotonic() - started >= 0.25


def test_lock_file_never_follows_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    (tmp_path / "x.lock").symlink_to(victim)
    with pytest.raises(OSError) as info:
        durable.lock_file(tmp_path / "x.lock")
    assert info.value.errno == errno.ELOOP
    assert not victim.exists()


def test_durable_is_standard_library_only_and_imports_nothing_of_hvext() -> None:
    tree = ast.parse(Path(durable.__file__).read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            assert name.split(".")[0] in sys.stdlib_module_names, name
