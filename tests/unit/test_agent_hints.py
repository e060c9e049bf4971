"""The guest side of epochs (guest-agent/hvext_agent/hints.py): a freeze the host never thaws ends by itself."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest-agent"))
from hvext_agent import hints  # noqa: E402


@pytest.fixture
def hints_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(hints, "HINTS_DIR", str(tmp_path))
    monkeypatch.setattr(hints, "RECORDS", str(tmp_path / "hints.jsonl"))
    monkeypatch.setattr(hints, "FREEZE", str(tmp_path / "freeze"))
    return tmp_path


def run_epoch(path: str) -> tuple[threading.Thread, list[float]]:
    done: list[float] = []
    thread = threading.Thread(target=lambda: (hints.epoch(path), done.append(time.monotonic())), daemon=True)
    thread.start()
    return thread, done


def test_a_freeze_that_is_never_thawed_ends_by_itself(hints_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hints, "FREEZE_HOLD_S", 1.0)
    state = hints.freeze(0.0)  # the host asked, then went away (power cut, crash, hostile network)
    assert state["freeze_requested"] is True
    started = time.monotonic()
    thread, done = run_epoch(str(hints_dir / "app.db"))
    thread.join(10)
    assert done, "epoch() still frozen 10 s after a freeze that should hold at most 1 s"
    assert 0.8 <= done[0] - started < 3.0
    assert hints.resolve()["freeze_requested"] is False  # expired


def test_a_thaw_releases_at_once_and_a_garbled_freeze_is_bounded(hints_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    hints.freeze(0.0)
    thread, done = run_epoch(str(hints_dir / "app.db"))
    time.sleep(0.3)
    assert not done and list(hints_dir.glob("frozen-*"))  # held at the epoch
    hints.thaw()
    thread.join(5)
    assert done and not list(hints_dir.glob("frozen-*"))
    # a freeze file someone else wrote (no deadline in it) holds no longer than the hold time either
    monkeypatch.setattr(hints, "FREEZE_HOLD_S", 0.5)
    (hints_dir / "freeze").write_text("")
    thread, done = run_epoch(str(hints_dir / "app.db"))
    thread.join(5)
    assert done
