"""The lab's state file (``lab.json`` in the run directory) and the lock that serialises ``up`` and ``down``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hvext import durable
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
        fd = durable.lock_file(lock_path, wait=LOCK_TIMEOUT_S)
    except BlockingIOError as err:
        raise LabError(f"another `hvext lab` command has held {lock_path} for {LOCK_TIMEOUT_S:.0f} s") from err
    except OSError as err:
        raise LabError(f"cannot open the lab lock {lock_path}: {err}") from err
    try:
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
    """Replace lab.json durably (:func:`hvext.durable.atomic_write`): a crash leaves the old or the new state."""
    path = state_file(state.run_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.atomic_write(path, state.to_json().encode(), mode=0o644)
    except OSError as err:
        raise LabError(f"cannot write the lab state {path}: {err}") from err
