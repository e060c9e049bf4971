"""The lab's state file (``lab.json`` in the run directory) and the lock that serialises ``up`` and ``down``."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hvext.lab import plan
from hvext.lab.plan import LabError, LabState

LOCK_TIMEOUT_S = 300.0


def state_file(run_dir: Path | None = None) -> Path:
    return (run_dir or plan.RUN_DIR) / "lab.json"


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Serialise up and down across processes (the lock file sits beside the run dir, which down removes)."""
    lock_path = run_dir.with_name(run_dir.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise LabError(f"cannot open the lab lock {lock_path}: {err}") from err
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as err:
                if time.monotonic() > deadline:
                    raise LabError(f"another `hvext lab` command has held {lock_path} for "
                                   f"{LOCK_TIMEOUT_S:.0f} s") from err
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def read_state(run_dir: Path) -> LabState | None:
    path = state_file(run_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise LabError(f"cannot read the lab state {path}: {err}") from err
    return LabState.from_json(text, str(path))


def write_state(state: LabState) -> None:
    path = state_file(state.run_dir)
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(state.to_json())
        os.replace(tmp, path)
    except OSError as err:
        raise LabError(f"cannot write the lab state {path}: {err}") from err
