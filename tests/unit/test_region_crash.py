"""Crash tests: SIGKILL a process using an NVMRegion, reopen, compare with the model.

A child (``region_crash_child.py``) runs a seeded operation sequence and logs
``start i`` / ``done i`` around each operation.  After the kill, the region
must open, pass its own consistency check, and read back exactly the model
state after the last completed operation -- or after the one in flight, if
it committed before the kill (operations are atomic: never a mix).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from hvext.pmem.region import STRATEGIES, NVMRegion

CHILD = pathlib.Path(__file__).with_name("region_crash_child.py")
_spec = importlib.util.spec_from_file_location("region_crash_child", CHILD)
assert _spec and _spec.loader
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)

REPO = pathlib.Path(__file__).resolve().parents[2]
NOPS = 150
RANDOM_RUNS = 50  # per strategy
MAX_DELAY = 0.004  # seconds after the chosen op starts
WORKERS = 4  # children mostly wait for fsync, so a few run side by side
#: Held while this process has a region open and while it forks a child. A region's lock is a
#: ``flock``, which belongs to the open file: a child forked by one worker thread while another
#: holds a region open gets a copy of that lock descriptor and holds the lock until it execs.
#: Without this, a worker that closed its new region and started its child could see that child
#: find the region "open elsewhere" (a sibling's child, between fork and exec, still held it).
PARENT_REGIONS = threading.Lock()




def model_state(ops: list, count: int) -> tuple:
    model = helper.Model(helper.SIZE)
    for op in ops[:count]:
        model.apply(op)
    return (list(model.snaps), bytes(model.running), [model.snaps[n] for n in model.snaps])


def region_state(reg: NVMRegion) -> tuple:
    names = reg.snapshots()
    return (
        names,
        reg.read(0, helper.SIZE),
        [reg.read_snapshot(n, 0, helper.SIZE) for n in names],
    )


def run_child(
    workdir: pathlib.Path,
    nvm: pathlib.Path,
    strategy: str,
    seed: int,
    *,
    kill_at: tuple[int, float] | None,
    fault: str | None = None,
) -> tuple[int, int, bool]:
    """Create a region (NVM tier in *nvm*, the rest in *workdir*), run the
    child on it and, with *kill_at* = (index, delay), SIGKILL it *delay*
    seconds after it starts op *index*; returns (done, started, finished)."""
    mass, progress = workdir / "mass", workdir / "progress"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    argv = [sys.executable, str(CHILD), str(nvm), str(mass), str(seed), str(NOPS), str(progress)]
    with PARENT_REGIONS:
        NVMRegion.create(nvm, mass, helper.SIZE, block_size=helper.BLOCK_SIZE, strategy=strategy).close()
        proc = subprocess.Popen(argv + ([fault] if fault else []), env=env, stderr=subprocess.PIPE)
    try:
        if kill_at is not None:
            index, delay = kill_at
            marker = f"start {index}\n".encode()
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if progress.exists() and marker in progress.read_bytes():
                    break
                time.sleep(0.0005)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed ({proc.returncode}): {err.decode(errors='replace')}")
    text = progress.read_text() if progress.exists() else ""
    assert text.startswith("ready"), f"child never became ready: {err.decode(errors='replace')}"
    lines = text.splitlines()
    done = sum(1 for line in lines if line.startswith("done "))
    started = sum(1 for line in lines if line.startswith("start "))
    return done, started, "finished" in lines


def verify_recovered(workdir: pathlib.Path, nvm: pathlib.Path, seed: int, done: int, started: int) -> int:
    """Reopen after the crash; returns which op count the region matched."""
    ops = helper.generate_ops(seed, NOPS, helper.SIZE, helper.BLOCK_SIZE)
    with PARENT_REGIONS, NVMRegion.open(nvm, workdir / "mass") as reg:
        assert reg.check() == [], f"seed {seed}: inconsistent after crash"
        state = region_state(reg)
        matched = [k for k in sorted({done, started}) if model_state(ops, k) == state]
        assert matched, f"seed {seed}: state matches neither {done} nor {started} completed ops"
        # The recovered region keeps working: purge, write, snapshot, delete.
        reg.purge()
        stats = reg.stats()
        assert stats["nvm_blocks"] == stats["running_blocks"]
        reg.write(7, b"after the crash")
        reg.snapshot("post-crash")
        reg.write(7, b"AFTER THE CRASH")
        assert reg.read_snapshot("post-crash", 7, 15) == b"after the crash"
        reg.delete_snapshot("post-crash")
        assert reg.check() == []
    return matched[-1]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sigkill_at_random_moments(tmp_path, fast_tmp, strategy):
    rng = random.Random(f"crash-{strategy}")
    # Random moments: after a random op starts, wait a random 0-4 ms (ops
    # take about 1-5 ms: most kills land inside an op, some between ops).
    runs = [(i, 1000 + i, (rng.randrange(NOPS), rng.uniform(0, MAX_DELAY))) for i in range(RANDOM_RUNS)]

    def one(run: tuple[int, int, tuple[int, float]]) -> tuple[int, int, bool]:
        i, seed, kill_at = run
        workdir, nvm = tmp_path / f"run{i}", fast_tmp / f"run{i}"
        done, started, finished = run_child(workdir, nvm, strategy, seed, kill_at=kill_at)
        verify_recovered(workdir, nvm, seed, done, started)
        return done, started, finished

    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(one, runs))
    mid_op = sum(1 for done, started, _ in results if started > done)
    killed = sum(1 for _, _, finished in results if not finished)
    # The test only means something if most kills land while operations run.
    assert killed >= RANDOM_RUNS // 2, results
    assert mid_op >= RANDOM_RUNS // 3, results


def _nth_op(ops: list, kind: str, nth: int) -> int:
    seen = 0
    for i, op in enumerate(ops):
        if op[0] == kind:
            seen += 1
            if seen == nth:
                return i
    raise AssertionError(f"no {nth}th {kind} in the sequence")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("op", ["write", "snapshot", "purge", "delete_snapshot"])
@pytest.mark.parametrize("point", ["data-synced", "committed"])
def test_sigkill_at_commit_boundaries(tmp_path, fast_tmp, strategy, op, point):
    """Kill just before / just after the metadata commit of the 3rd such op."""
    seed = 4242
    ops = helper.generate_ops(seed, NOPS, helper.SIZE, helper.BLOCK_SIZE)
    kind = {"delete_snapshot": "delete"}.get(op, op)
    index = _nth_op(ops, kind, 3)
    nvm = fast_tmp / "nvm"
    done, started, finished = run_child(tmp_path, nvm, strategy, seed, kill_at=None, fault=f"{op}:{point}:3")
    assert not finished and (done, started) == (index, index + 1)
    matched = verify_recovered(tmp_path, nvm, seed, done, started)
    if kind != "purge":  # a purge does not change what reads back
        assert matched == (index if point == "data-synced" else index + 1)
