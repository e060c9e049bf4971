"""The guest benchmarks run to their tables and plots in a smoke run (one case each), so a broken one cannot land.

Each is the real benchmark script as a separate process (`--smoke`: one case,
short measurements); failures would be rows and exit status 1, tracebacks fail too.
Each writes its PNG into the test's own plot directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import missing
from tests.unit.test_bench_smoke import assert_png

from hvext import image

ROOT = Path(__file__).resolve().parents[2]


def run_bench(guest_image: image.GuestImage, plots: Path, bench: str,
              timeout: float) -> subprocess.CompletedProcess[str]:
    """Run *bench* --smoke; check it succeeded and drew its plot into *plots*."""
    env = dict(os.environ, HVEXT_IMAGE=str(guest_image.directory))  # the image this session built
    done = subprocess.run([sys.executable, bench, "--smoke", "--plot-dir", str(plots)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert done.returncode == 0, done.stdout + done.stderr
    assert_png(plots / f"{Path(bench).stem}.png")
    return done


def test_boot_bench_smoke(guest_image: image.GuestImage, tmp_path: Path, record_property) -> None:
    done = run_bench(guest_image, tmp_path, "bench/boot.py", timeout=300)
    total = next(line for line in done.stdout.splitlines() if line.strip().startswith("total"))
    record_property("boot_total", total.split()[1])
    for phase in ("firmware", "kernel", "initramfs", "init", "agent"):
        assert any(line.strip().startswith(phase) for line in done.stdout.splitlines()), phase


def test_reclaim_bench_smoke(guest_image: image.GuestImage, tmp_path: Path) -> None:
    done = run_bench(guest_image, tmp_path, "bench/reclaim.py", timeout=600)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| free | auto |")]
    assert len(rows) == 1 and "error" not in rows[0] and "| 1/1 |" in rows[0], done.stdout
    faults = rows[0].split("|")[7]  # the guest's and the QEMU process's own major faults, counted
    assert faults.strip().isdigit(), rows[0]


def test_pmem_placement_bench_smoke(guest_image: image.GuestImage, tmp_path: Path) -> None:
    done = run_bench(guest_image, tmp_path, "bench/pmem_placement.py", timeout=600)
    rows = [line.split() for line in done.stdout.splitlines()
            if line.split()[:1] in (["none"], ["placement"]) and line.split()[1:2] != ["/"]]
    assert [r[:2] for r in rows] == [["none", "1"], ["placement", "1"]] and "error" not in done.stdout, done.stdout
    assert "placement / none, ops/s per repetition" in done.stdout


@pytest.mark.requires(os.geteuid() == 0, "the lab needs root (namespaces, libvirtd)")
@pytest.mark.requires(shutil.which("libvirtd") or os.path.exists("/usr/sbin/libvirtd"), "libvirtd is not installed")
def test_migrate_bench_smoke(guest_image: image.GuestImage, tmp_path: Path) -> None:
    from hvext.lab import Lab
    if Lab.load() is not None:
        missing("a lab is already up; it may belong to someone else (bench/migrate.py would use it)")
    done = run_bench(guest_image, tmp_path, "bench/migrate.py", timeout=600)
    rows = [line for line in done.stdout.splitlines() if line.split()[:2] == ["0%", "auto"]]
    assert len(rows) == 1 and "not run" not in rows[0], done.stdout


def test_hugepages_bench_smoke(guest_image: image.GuestImage, tmp_path: Path) -> None:
    """All three cases measured; the priority case maps more of guest RAM large than the split one."""
    done = run_bench(guest_image, tmp_path, "bench/hugepages.py", timeout=600)
    cases = ("4 KiB (khugepaged)", "priority", "all large")
    rows = {case: line.strip()[len(case):].split() for line in done.stdout.splitlines() for case in cases
            if line.strip().startswith(case + " ")}
    assert set(rows) == set(cases), done.stdout
    assert not any("error:" in r for r in rows.values()), done.stdout
    assert float(rows["priority"][-1]) > float(rows["4 KiB (khugepaged)"][-1]), done.stdout  # AnonHuge MiB
@pytest.mark.requires(os.geteuid() == 0, "the lab needs root (namespaces, libvirtd)")
@pytest.mark.requires(shutil.which("libvirtd") or os.path.exists("/usr/sbin/libvirtd"), "libvirtd is not installed")
def test_ha_bench_smoke(guest_image: image.GuestImage, tmp_path: Path) -> None:
    """One failover (the richest protection mode this checkout has): a row with its RTO and, for a PMEM mode,
    every durable record recovered (the battery path's RPO is 0)."""
    from hvext.lab import Lab
    if Lab.load() is not None:
        missing("a lab is already up; it may belong to someone else (bench/ha.py refuses it)")
    done = run_bench(guest_image, tmp_path, "bench/ha.py", timeout=1200)
    assert "protection modes in this checkout: restart" in done.stdout, done.stdout
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[2:3] == ["1/1"]]
    assert len(rows) == 1, done.stdout
    if rows[0][0] != "restart":
        assert rows[0][5] == "0", done.stdout  # lost: none on the battery path


def test_suspend_bench_smoke(guest_image: image.GuestImage, tmp_path: Path) -> None:
    done = run_bench(guest_image, tmp_path, "bench/suspend.py", timeout=600)
    written = next(line.split() for line in done.stdout.splitlines() if line.strip().startswith("MiB written"))
    to_ram, to_disk = float(written[2]), float(written[3])
    assert to_ram < 5 < 100 < to_disk, done.stdout  # device state only vs the guest's RAM
    assert "error" not in done.stdout, done.stdout


def test_mirror_bench_smoke(guest_image: image.GuestImage, tmp_path: Path) -> None:
    """bench/mirror.py: each case measured (no error row), with paired ratios and the mirror's syncs counted."""
    done = run_bench(guest_image, tmp_path, "bench/mirror.py", timeout=600)
    rows = {line.split("|")[2].strip(): line.split("|") for line in done.stdout.splitlines()
            if line.startswith("| writes |")}
    assert set(rows) == {"none", "1000ms", "100ms"} and "error" not in done.stdout, done.stdout
    for case in ("1000ms", "100ms"):
        assert float(rows[case][9].split("/")[0]) > 0, rows[case]  # syncs/s
