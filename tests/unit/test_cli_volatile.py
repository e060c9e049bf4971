"""`hvext ha baseline|recover|protect --standby|failover|standby-status`: input checks fail with `error: ...`,
exit 1, before anything is made (libvirt's test driver: no QEMU, no cluster)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvext import paths
from hvext.cli.main import main

URI = "test:///default"


@pytest.fixture
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setattr(paths, "STATE_DIR", state)
    return state


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(["-c", URI, *argv])
    return status, capsys.readouterr().err


def test_recover_without_a_baseline_is_refused_and_makes_nothing(tmp_path: Path, private_state: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    status, err = run(capsys, "ha", "recover", "test", "--dir", str(shared))
    assert status == 1 and err.startswith("error: no baseline of 'test'") and "nothing was started" in err, err
    assert os.listdir(shared) == [] and not private_state.exists()


def test_baseline_and_recover_check_the_shared_directory(tmp_path: Path, private_state: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run(capsys, "ha", "baseline", "test")
    assert status == 1 and "--dir DIR is required" in err
    for bad in ("relative/dir", str(tmp_path / "missing")):
        status, err = run(capsys, "ha", "baseline", "test", "--dir", bad)
        assert status == 1 and err.startswith("error: shared store"), err
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    status, err = run(capsys, "ha", "recover", "test", "--dir", str(open_dir))
    assert status == 1 and "must be private" in err, err
    status, err = run(capsys, "ha", "baseline", "test", "--stop", "--dir", str(open_dir))
    assert status == 1 and "--stop takes no" in err


def test_a_domain_that_keeps_no_ram_in_a_file_cannot_be_baselined(tmp_path: Path, private_state: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    status, err = run(capsys, "ha", "baseline", "test", "--dir", str(shared))
    assert status == 1 and "does not keep its RAM in a file" in err, err
    assert os.listdir(shared) == []


def test_standby_options(private_state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run(capsys, "ha", "protect", "test", "--sync-interval", "1")
    assert status == 1 and "--sync-interval is for --standby" in err
    status, err = run(capsys, "ha", "failover", "test")
    assert status == 1 and "no active standby protection" in err, err
    status, err = run(capsys, "ha", "standby-status", "test")
    assert status == 1 and "no standby protection" in err, err
