"""The host-only benchmarks run to their tables in a smoke run, and `make bench` runs every benchmark.

(The guest benchmarks' smoke runs are in tests/vm/test_bench_smoke.py.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_purge_smoke_prints_its_tables() -> None:
    done = run_bench("bench/purge.py", "--smoke")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "virtblocks" in done.stdout and "pointer-elimination" in done.stdout and "PE/VB time" in done.stdout


def test_purge_failure_is_a_row_not_a_traceback() -> None:
    done = run_bench("bench/purge.py", "--smoke", "--nvm-dir", "/nonexistent-hvext-dir")
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.count("error: FileNotFoundError") == 2 and "PE/VB time" in done.stdout


def test_rvm_one_case_prints_its_table(tmp_path: Path) -> None:
    done = run_bench("bench/rvm.py", "--quick", "--seconds", "0.05", "--ranges", "1", "--threads", "0",
                     "--dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| ranges |" in done.stdout and "| 1 | flush |" in done.stdout


@pytest.mark.parametrize("bench", ["bench/boot.py", "bench/reclaim.py", "bench/migrate.py"])
def test_a_guest_benchmark_that_cannot_start_prints_rows_not_a_traceback(bench: str, tmp_path: Path) -> None:
    """No guest image (here: no guest sources): every case is a row saying why, and the exit status is 1."""
    env = dict(os.environ, HVEXT_SOURCE_DIR=str(tmp_path / "missing"), HVEXT_CACHE_DIR=str(tmp_path))
    env.pop("HVEXT_IMAGE", None)
    done = subprocess.run([sys.executable, bench, "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FileNotFoundError" in done.stdout


@pytest.mark.requires(shutil.which("make"), "make is not installed (the README's first step installs it)")
def test_make_bench_runs_every_benchmark_and_fails_at_the_end(tmp_path: Path) -> None:
    failing = tmp_path / "broken.py"
    failing.write_text("import sys\nsys.exit('broken benchmark')\n")
    done = subprocess.run(["make", "-s", "-o", "setup", "bench", f"PY={sys.executable}",
                           f"BENCHES={failing} bench/purge.py", "BENCH_ARGS=--smoke"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "PE/VB time" in done.stdout, "make bench stopped at the first failure"
    assert f"make bench: failed: {failing}" in done.stderr
