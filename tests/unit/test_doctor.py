"""``hvext doctor``: structured JSON a script can test, and human output printed literally."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hvext.cli import doctor
from hvext.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
DEAD_URI = "qemu+unix:///system?socket=/nonexistent/hvext-test/libvirt-sock"
CHECK_KEYS = {"name", "status", "ok", "value", "reason", "fix", "detail"}
NAMES = ["accelerator", "libvirt", "virtlogd", "libvirt-qemu user", "host swap", "QEMU", "patched QEMU",
         "guest image", "userfaultfd", "KSM", "KSM general_profit", "ksm_stat", "transparent huge pages",
         "DAMON", "NVM RAM (virtio-mem)", "swap files", "swap reservation", "online defragmentation",
         "process_madvise"]


def check_schema(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Assert the documented shape; return the checks by name."""
    assert set(report) == {"verdict", "ok", "accelerator", "checks"}
    assert report["verdict"] in doctor.STATUSES and report["ok"] is (report["verdict"] != "fail")
    by_name = {}
    for check in report["checks"]:
        assert set(check) == CHECK_KEYS, check
        assert check["status"] in doctor.STATUSES and check["ok"] is (check["status"] == "ok"), check
        assert all(isinstance(check[k], str) for k in ("name", "reason", "fix", "detail")), check
        if check["status"] != "ok":
            assert check["reason"] and check["fix"], check  # a problem says why and what to do, separately
        by_name[check["name"]] = check
    assert list(by_name) == NAMES
    worst = max((c["status"] for c in report["checks"]), key=doctor.STATUSES.index)
    assert report["verdict"] == worst
    assert report["accelerator"] == by_name["accelerator"]["value"]
    return by_name


def doctor_process(*argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "-m", "hvext.cli.main", *argv], capture_output=True, text=True,
                          timeout=120, env=environment, cwd=ROOT)


def test_json_schema_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["-c", DEAD_URI, "doctor", "--json"])
    by_name = check_schema(json.loads(capsys.readouterr().out))
    assert status == 1
    libvirt = by_name["libvirt"]
    assert libvirt["status"] == "fail" and libvirt["value"] is None
    assert "cannot connect to libvirt" in libvirt["reason"] and "make libvirtd" in libvirt["fix"]
    assert by_name["accelerator"]["value"] in ("kvm", "tcg")
    assert isinstance(by_name["host swap"]["value"], int)
    assert isinstance(by_name["virtlogd"]["value"], bool)


@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_real_command_reports_the_accelerator_as_a_value(accel: str) -> None:
    result = doctor_process("-c", DEAD_URI, "doctor", "--json", HVEXT_ACCEL=accel)
    assert result.returncode == 1, result.stderr  # libvirt is unreachable
    report = json.loads(result.stdout)
    by_name = check_schema(report)
    assert report["accelerator"] == accel and report["verdict"] == "fail" and report["ok"] is False
    assert by_name["accelerator"]["reason"] == f"forced by HVEXT_ACCEL={accel}"
    assert by_name["accelerator"]["status"] == "ok"


def test_real_command_with_a_bad_accelerator_setting() -> None:
    result = doctor_process("-c", DEAD_URI, "doctor", "--json", HVEXT_ACCEL="bogus")
    report = json.loads(result.stdout)
    by_name = check_schema(report)
    assert result.returncode == 1 and report["accelerator"] is None
    assert by_name["accelerator"]["status"] == "fail" and "HVEXT_ACCEL='bogus'" in by_name["accelerator"]["reason"]


def test_real_command_on_this_host_agrees_with_the_human_output() -> None:
    """The real host's libvirt: both forms of output, one verdict (exit status) and the same checks."""
    as_json = doctor_process("doctor", "--json")
    human = doctor_process("doctor")
    report = json.loads(as_json.stdout)
    by_name = check_schema(report)
    assert as_json.returncode == human.returncode == (0 if report["ok"] else 1)
    for name, check in by_name.items():
        assert f"{check['status'].upper():<4} {name}: {check['detail']}" in human.stdout, human.stdout
        assert check["reason"] in human.stdout and check["fix"] in human.stdout  # the trade-offs too


def test_human_output_prints_details_literally(capsys: pytest.CaptureFixture[str]) -> None:
    """A libvirt error naming a path with brackets is shown as is, not read as rich markup."""
    status = main(["-c", "qemu+unix:///system?socket=/nonexistent/[bold]x[/bold]/sock", "doctor"])
    out = capsys.readouterr().out
    assert status == 1
    assert "/nonexistent/[bold]x[/bold]/sock" in out, out


@pytest.mark.parametrize(("setting", "status", "value"), [
    ("1", "ok", 1), ("0", "warn", 0), (None, "warn", None), ("garbage", "warn", None)])
def test_userfaultfd_check_states_the_trade_off(setting: str | None, status: str, value: int | None) -> None:
    check = doctor.userfaultfd_check(setting)
    assert (check.name, check.status, check.value) == ("userfaultfd", status, value)
    assert check.fix
    if value is not None:  # both ways the reason says what post-copy needs and what it costs
        assert "post-copy" in check.reason and "userfaultfd" in check.reason
        assert "local user" in check.reason + check.fix


def test_the_real_sysctl_is_reported() -> None:
    path = doctor.USERFAULTFD_SYSCTL
    if not path.exists():
        pytest.skip(f"{path}: this kernel has no such setting")  # not something setup installs
    check = next(c for c in doctor.run_checks(DEAD_URI) if c.name == "userfaultfd")
    assert check.value == int(path.read_text())


def test_sharing_checks_say_what_is_missing(tmp_path: Path) -> None:
    ksm = tmp_path / "ksm"
    ksm.mkdir()
    (ksm / "run").write_text("0\n")
    (ksm / "general_profit").write_text("4096\n")
    thp = tmp_path / "enabled"
    thp.write_text("always [madvise] never\n")
    stat = tmp_path / "ksm_stat"
    stat.write_text("ksm_rmap_items 0\n")
    checks = {c.name: c for c in doctor.sharing_checks(ksm, stat, thp)}
    assert [c.status for c in checks.values()] == ["ok"] * 4
    assert checks["KSM"].value == "0" and checks["transparent huge pages"].value == "madvise"
    missing = {c.name: c for c in doctor.sharing_checks(tmp_path / "none", tmp_path / "none", tmp_path / "none")}
    assert all(c.status == "warn" and c.reason and c.fix for c in missing.values())


def test_hugepage_checks_say_whether_damon_is_free(tmp_path: Path) -> None:
    assert doctor.hugepage_checks(tmp_path / "none")[0].status == "warn"
    (tmp_path / "kdamonds").mkdir()
    (tmp_path / "kdamonds" / "nr_kdamonds").write_text("0\n")
    assert doctor.hugepage_checks(tmp_path)[0].status == "ok"
    (tmp_path / "kdamonds" / "nr_kdamonds").write_text("1\n")
    busy = doctor.hugepage_checks(tmp_path)[0]
    assert busy.status == "warn" and busy.value == "busy" and "dirty page list" in busy.fix


def test_placement_check_says_which_advice_process_madvise_refuses() -> None:
    ok = doctor.placement_checks()[0]  # this host (6.18) has all three: a real call, not a fixture
    assert ok.status == "ok" and ok.value == ["MADV_COLD", "MADV_PAGEOUT", "MADV_WILLNEED"], ok
    missing = doctor.placement_checks({"MADV_WILLNEED": "process_madvise: EINVAL (Invalid argument)",
                                       "MADV_COLD": None, "MADV_PAGEOUT": None})[0]
    assert missing.status == "warn" and missing.value == ["MADV_COLD", "MADV_PAGEOUT"]
    assert "MADV_WILLNEED" in missing.detail and "EINVAL" in missing.reason and "5.10" in missing.fix


def test_nvm_ram_check_names_what_is_missing() -> None:
    config = "CONFIG_VIRTIO_MEM=m\nCONFIG_MEMORY_HOTPLUG=y\nCONFIG_MEMORY_HOTREMOVE=y\n"
    assert doctor.nvm_ram_check("9.0.0", config).status == "ok"
    old = doctor.nvm_ram_check("8.0.0", config)
    assert old.status == "warn" and "libvirt 8.0.0 < 8.2.0" in old.detail
    no_mem = doctor.nvm_ram_check("9.0.0", "# CONFIG_VIRTIO_MEM is not set\nCONFIG_MEMORY_HOTPLUG=y\n")
    assert no_mem.status == "warn" and "CONFIG_VIRTIO_MEM" in no_mem.detail and "CONFIG_MEMORY_HOTREMOVE" in no_mem.detail
    assert doctor.nvm_ram_check(None, None).detail == "guest kernel config unreadable"
def test_swapfile_checks_say_where_swap_files_go_and_what_is_missing(tmp_path: Path) -> None:
    from hvext.memory import swapfile

    conf = tmp_path / "qemu.conf"
    conf.write_text('#memory_backing_dir = "/nowhere"\nmemory_backing_dir = "/var/lib/x/ram"  # on ext4\n')
    assert swapfile.memory_backing_dir(conf) == Path("/var/lib/x/ram")
    conf.write_text('#memory_backing_dir = "/nowhere"\n')
    assert swapfile.memory_backing_dir(conf) == swapfile.DEFAULT_BACKING_DIR
    assert swapfile.memory_backing_dir(tmp_path / "none") == swapfile.DEFAULT_BACKING_DIR
    checks = {c.name: c for c in doctor.swapfile_checks(tmp_path / "ram", tmp_path / "state")}
    fstype = swapfile.filesystem_type(tmp_path)
    assert checks["swap files"].value == {"directory": str(tmp_path / "ram"), "fstype": fstype}
    assert checks["swap reservation"].status == "ok" and checks["swap reservation"].value["same_filesystem"]
    defrag = checks["online defragmentation"]
    assert defrag.status == ("ok" if fstype == "ext4" and shutil.which("e4defrag") else "warn")
    shm = {c.name: c for c in doctor.swapfile_checks(Path("/dev/shm/hvext-none/ram"), tmp_path)}
    if swapfile.filesystem_type(Path("/dev/shm")) == "tmpfs":
        assert shm["online defragmentation"].status == "warn" and "not ext4" in shm["online defragmentation"].detail
        assert shm["swap reservation"].status == "warn"  # /tmp and /dev/shm are two file systems
