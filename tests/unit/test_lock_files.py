"""The lab's and the daemon service's lock files go through hvext.durable: private, never through a link."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import hvext.lab as lab
from hvext import durable
from hvext.daemon import service
from hvext.lab.plan import LabError


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_lab_lock_is_private_exclusive_and_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run" / "lab"
    lock = tmp_path / "run" / "lab.lock"
    old = os.umask(0o022)
    try:
        with lab._locked(run_dir):
            assert _mode(lock) == 0o600
            with pytest.raises(BlockingIOError):
                durable.lock_file(lock, wait=0)
            monkeypatch.setattr(lab, "LOCK_TIMEOUT_S", 0.2)
            with pytest.raises(LabError, match="another `hvext lab` command"):
                with lab._locked(run_dir):
                    pass
    finally:
        os.umask(old)
    os.close(durable.lock_file(lock, wait=0))  # released


def test_lab_lock_is_never_taken_through_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "lab.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(LabError, match="cannot open the lab lock"):
        with lab._locked(tmp_path / "lab"):
            pass
    assert not (tmp_path / "victim").exists()


def test_service_lock_is_private_and_exclusive(tmp_path: Path) -> None:
    pid_file = tmp_path / "hvextd.pid"
    old = os.umask(0o022)
    try:
        with service._locked(pid_file):
            assert _mode(tmp_path / "hvextd.lock") == 0o600
            with pytest.raises(BlockingIOError):
                durable.lock_file(tmp_path / "hvextd.lock", wait=0)
    finally:
        os.umask(old)
    (tmp_path / "hvextd.lock").unlink()
    (tmp_path / "hvextd.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(service.ServiceError):
        with service._locked(pid_file):
            pass
    assert not (tmp_path / "victim").exists()
