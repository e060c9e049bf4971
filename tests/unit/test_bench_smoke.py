"""The host-only benchmarks run to their tables and plots in a smoke run, and `make bench` runs every benchmark.

(The guest benchmarks' smoke runs are in tests/vm/test_bench_smoke.py.)
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 5000) -> None:
    """*path* is a whole PNG (signature, header chunk, end chunk) of a drawn picture, not an empty file."""
    assert path.is_file(), f"no plot at {path}"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG: {data[:8]!r}"
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, kind) == (13, b"IHDR") and 200 <= width <= 4000 and 100 <= height <= 4000, (kind, width, height)
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", f"{path} is cut short"
    assert len(data) >= min_bytes, f"{path}: only {len(data)} bytes"


def run_bench(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_purge_smoke_prints_its_tables_and_plot(tmp_path: Path) -> None:
    done = run_bench("bench/purge.py", "--smoke", "--plot-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "virtblocks" in done.stdout and "pointer-elimination" in done.stdout and "PE/VB time" in done.stdout
    assert_png(tmp_path / "purge.png")


def test_purge_failure_is_a_row_not_a_traceback(tmp_path: Path) -> None:
    done = run_bench("bench/purge.py", "--smoke", "--nvm-dir", "/nonexistent-hvext-dir", "--plot-dir", str(tmp_path))
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stdout.count("error: FileNotFoundError") == 2 and "PE/VB time" in done.stdout
    assert_png(tmp_path / "purge.png")  # the failed cells are notes on it


def test_rvm_one_case_prints_its_table_and_plot(tmp_path: Path) -> None:
    done = run_bench("bench/rvm.py", "--quick", "--seconds", "0.05", "--ranges", "1", "--threads", "0",
                     "--dir", str(tmp_path), "--plot-dir", str(tmp_path / "plots"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| ranges |" in done.stdout and "| 1 | flush |" in done.stdout
    assert_png(tmp_path / "plots" / "rvm.png")


def test_the_plot_directory_comes_from_the_environment_and_is_made(tmp_path: Path) -> None:
    plots = tmp_path / "a" / "b"
    done = subprocess.run([sys.executable, "bench/purge.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, HVEXT_PLOT_DIR=str(plots)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"plot: {plots / 'purge.png'}" in done.stdout
    assert_png(plots / "purge.png")


@pytest.mark.parametrize("bench", ["bench/boot.py", "bench/reclaim.py", "bench/migrate.py", "bench/hugepages.py",
                                   "bench/pmem_placement.py", "bench/ha.py", "bench/suspend.py"])
def test_a_guest_benchmark_that_cannot_start_prints_rows_not_a_traceback(bench: str, tmp_path: Path) -> None:
    """No guest image (here: no guest sources): every case is a row saying why, and the exit status is 1."""
    env = dict(os.environ, HVEXT_SOURCE_DIR=str(tmp_path / "missing"), HVEXT_CACHE_DIR=str(tmp_path))
    env.pop("HVEXT_IMAGE", None)
    done = subprocess.run([sys.executable, bench, "--quick", "--plot-dir", str(tmp_path / "plots")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FileNotFoundError" in done.stdout
    assert_png(tmp_path / "plots" / f"{Path(bench).stem}.png")  # the cases not run are notes on it


@pytest.mark.requires(shutil.which("make"), "make is not installed (the README's first step installs it)")
def test_make_bench_runs_every_benchmark_and_fails_at_the_end(tmp_path: Path) -> None:
    failing = tmp_path / "broken.py"
    failing.write_text("import sys\nsys.exit('broken benchmark')\n")
    done = subprocess.run(["make", "-s", "-o", "setup", "bench", f"PY={sys.executable}",
                           f"BENCHES={failing} bench/purge.py", "BENCH_ARGS=--smoke", f"PLOT_DIR={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "PE/VB time" in done.stdout, "make bench stopped at the first failure"
    assert f"make bench: failed: {failing}" in done.stderr
    assert_png(tmp_path / "purge.png")


@pytest.mark.requires(shutil.which("make"), "make is not installed (the README's first step installs it)")
def test_make_bench_runs_every_benchmark_but_not_the_plot_module() -> None:
    done = subprocess.run(["make", "-n", "-o", "setup", "bench"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(f"bench/{b}.py" in done.stdout
               for b in ("boot", "ha", "hugepages", "migrate", "pmem_placement", "purge", "reclaim", "rvm")), \
        done.stdout
    assert "bench/plot.py" not in done.stdout
