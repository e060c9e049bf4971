"""Memory on a real guest: balloon targets (C1), memory usage classes (C2), free page reporting."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from hvext import aio
from hvext.cli.main import main
from hvext.host import Domain
from hvext.memory import classes
from hvext.units import MIB

GUEST_MIB = 512


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, " ".join(err.split())  # rich wraps long messages


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    status, out, err = cli(capsys, *argv, "--json")
    assert status == 0, err
    return json.loads(out)


def guest(domain: Domain, *argv: str, timeout: float = 120, check: bool = True) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with domain.agent(timeout=timeout + 10) as agent:
            return asdict(await agent.exec(list(argv), timeout=timeout))
    result = aio.run(run())
    assert not check or result["exitcode"] == 0, result
    return result


def retry(check, timeout: float = 30.0, interval: float = 1.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def ram_rss_kib(domain: Domain) -> int:
    """RSS of the QEMU mapping that holds the guest's RAM (the mapping as large as the RAM)."""
    pid = int(Path(f"/run/libvirt/qemu/{domain.name}.pid").read_text())
    size_ok = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size_ok = int(line.split()[1]) == GUEST_MIB * 1024
        elif line.startswith("Rss:") and size_ok:
            return int(line.split()[1])
    raise AssertionError("no guest RAM mapping found in QEMU's smaps")


@pytest.fixture(scope="module")
def vm(vm_factory_module) -> Domain:
    """One 512 MiB guest with free page reporting, shared by the module."""
    return vm_factory_module.boot(vm_factory_module.define(memory_mib=GUEST_MIB, free_page_reporting=True))


def test_balloon_inflates_and_deflates_to_its_targets(vm: Domain, capsys, record_property) -> None:
    before = cli_json(capsys, "memclass", vm.name)
    status, out, err = cli(capsys, "setmem", vm.name, "300M", "--wait", "60")
    assert status == 0 and "reached 300.00 MiB" in out and "from 512.00 MiB" in out, err
    stats = cli_json(capsys, "dommemstat", vm.name)
    assert stats["balloon_actual"] == 300 * MIB
    assert stats["balloon_target"]["bytes"] == 300 * MIB and stats["balloon_target"]["source"] == "hvext"
    assert vm.dom.info()[2] == 300 * 1024  # libvirt's view agrees
    after = cli_json(capsys, "memclass", vm.name)
    # Linux takes inflated pages out of MemTotal; the classes still add up
    assert abs(after["ballooned"] * 4096 - 212 * MIB) <= MIB
    assert abs((before["total_bytes"] - after["total_bytes"]) - 212 * MIB) <= 2 * MIB
    assert after["status"] == "ok" and after["host_limit_bytes"] == 300 * MIB
    deflate = cli_json(capsys, "setmem", vm.name, "512M", "--wait", "60")
    assert deflate["reached"] and deflate["actual"] == 512 * MIB and deflate["start"] == 300 * MIB
    record_property("deflate_s", deflate["elapsed_s"])
    status, out, _ = cli(capsys, "dommemstat", vm.name)
    assert "balloon target" in out and "512.00 MiB" in out


def test_balloon_input_errors(vm: Domain, capsys) -> None:
    for argv, message in [
        (["setmem", vm.name, "1G"], "balloon target 1.00 GiB is above the maximum of"),
        (["setmem", vm.name, "32M"], "absurdly small: the minimum is 64.00 MiB"),
        (["setmem", vm.name, "lots"], "invalid size 'lots'"),
        (["setmem", vm.name, "1.5Q"], "invalid size"),
        (["setmem", vm.name, "100M"], "is the lowest safe target; --force tries anyway"),
        (["setmem", vm.name, "300M", "--wait", "-1"], "must be positive"),
        (["setmem", "hvext-test-no-such-domain", "300M"], "no such domain"),
        (["memclass", vm.name, "--count", "2"], "--count needs --watch"),
    ]:
        status, _, err = cli(capsys, *argv)
        assert status == 1 and "error: " in err and message in err, (argv, err)
    assert cli_json(capsys, "dommemstat", vm.name)["balloon_actual"] == 512 * MIB  # nothing moved


def test_setmem_reports_where_the_guest_stopped(vm: Domain, capsys) -> None:
    guest(vm, "rmmod", "virtio_balloon")
    try:
        status, out, err = cli(capsys, "setmem", vm.name, "300M", "--wait", "60", "--stall", "5", "--json")
        assert status == 1 and out, err
        result = json.loads(out)
        assert result["outcome"] == "stalled" and result["actual"] == 512 * MIB and result["target"] == 300 * MIB
        assert result["stalled_for_s"] >= 5 and result["guest_free"] is not None
        assert err.startswith("error: balloon of") and "stopped at 512.00 MiB, target 300.00 MiB" in err
        assert "did not move its balloon at all" in err and "MiB free and" in err
    finally:
        guest(vm, "modprobe", "virtio_balloon")
    # the reloaded driver picks up the pending target; then give it all back
    assert retry(lambda: cli(capsys, "setmem", vm.name, "512M", "--wait", "30")[0] == 0, timeout=60)


def test_memory_classes_add_up_and_follow_workloads(vm: Domain, capsys, record_property) -> None:
    def sample() -> dict[str, Any]:
        report = cli_json(capsys, "memclass", vm.name)
        assert report["status"] == "ok", report["problems"]
        assert abs(report["unaccounted"]) <= classes.TOLERANCE * report["total_pages"], report
        assert sum(report["classes"].values()) + report["unaccounted"] == report["total_pages"]
        return report

    def mib(report: dict[str, Any], *names: str) -> float:
        return sum(report["classes"][n] for n in names) * report["page_size"] / MIB

    base = sample()
    assert set(base["classes"]) == set(classes.CLASSES)
    assert base["kpageflags"] == "full" and base["anon_split"] == "kpageflags"
    record_property("unaccounted_percent_idle", base["unaccounted_percent"])
    try:
        guest(vm, "sh", "-c", "dd if=/dev/zero of=/root/hvext-100m bs=1M count=100 2>/dev/null && sync")
        cached = sample()
        assert mib(cached, "page_cache_clean") - mib(base, "page_cache_clean") >= 90
        assert mib(base, "free") - mib(cached, "free") >= 90
        guest(vm, "sh", "-c", "setsid python3 -c 'import time; b = bytearray(b\"\\x01\") * (100 << 20); "
                              "open(\"/run/hvext-anon\", \"w\").close(); time.sleep(600)' "
                              ">/dev/null 2>&1 </dev/null &")
        assert retry(lambda: guest(vm, "test", "-e", "/run/hvext-anon", check=False)["exitcode"] == 0)
        anon = sample()
        assert mib(anon, "anon_active", "anon_inactive") - mib(cached, "anon_active", "anon_inactive") >= 90
        assert mib(cached, "free") - mib(anon, "free") >= 90
        assert abs(mib(anon, "page_cache_clean") - mib(cached, "page_cache_clean")) < 30
        record_property("unaccounted_percent_loaded", anon["unaccounted_percent"])
    finally:
        guest(vm, "pkill", "-f", "hvext-anon", check=False)  # (a shell running this would match too)
        guest(vm, "sh", "-c", "rm -f /root/hvext-100m /run/hvext-anon; echo 3 > /proc/sys/vm/drop_caches")
    assert retry(lambda: mib(sample(), "free") >= mib(base, "free") - 20, timeout=30)


def test_memclass_watch_reads_the_agents_periodic_samples(vm: Domain, capsys) -> None:
    # The module's guest may have just freed memory (the test above frees 200 MiB): its free page reporting
    # then takes blocks of free pages off the free lists for a while (in no class; the agent reads again
    # while they are in flight). The watch starts once a sample adds up.
    assert retry(lambda: cli_json(capsys, "memclass", vm.name)["status"] == "ok", timeout=60)
    status, out, err = cli(capsys, "memclass", vm.name, "--watch", "1", "--count", "3", "--json")
    assert status == 0, err
    reports = [json.loads(line) for line in out.splitlines()]
    brief = [{k: r[k] for k in ("sampled_at", "age_s", "sample_ms", "periodic_interval_s", "status", "problems")}
             for r in reports]
    assert len(reports) == 3 and all(r["periodic_interval_s"] == 1.0 and r["status"] == "ok" for r in reports), brief
    stamps = [r["sampled_at"] for r in reports]
    # cached samples are at most max_age (1.5 intervals) old; a fresh one is as old as its sampling took
    assert stamps == sorted(stamps) and len(set(stamps)) >= 2, brief
    assert all(r["age_s"] <= 1.5 or r["age_s"] <= r["sample_ms"] / 1000 + 0.5 for r in reports), brief
    status, out, _ = cli(capsys, "memclass", vm.name)
    assert status == 0 and "Memory classes of" in out and "unaccounted" in out and "status ok" in out


def test_free_page_reporting_returns_freed_guest_memory(vm: Domain, record_property) -> None:
    """The guest allocates 300 MiB, frees it; without any ballooning QEMU's RAM RSS drops again."""
    before = ram_rss_kib(vm)
    guest(vm, "sh", "-c", "setsid python3 -c 'import time; b = bytearray(b\"\\x01\") * (300 << 20); "
                          "open(\"/run/hvext-fpr\", \"w\").close(); time.sleep(4)' >/dev/null 2>&1 </dev/null &")
    assert retry(lambda: guest(vm, "test", "-e", "/run/hvext-fpr", check=False)["exitcode"] == 0)
    peak = ram_rss_kib(vm)
    assert peak >= before and peak >= 300 * 1024
    assert retry(lambda: ram_rss_kib(vm) <= peak - 150 * 1024, timeout=45), \
        f"QEMU's RAM RSS stayed at {ram_rss_kib(vm)} KiB (peak {peak} KiB)"
    after = ram_rss_kib(vm)
    record_property("ram_rss_kib", {"before": before, "peak": peak, "after": after})
    assert cli_balloon_actual(vm) == 512 * MIB  # the balloon played no part


def cli_balloon_actual(vm: Domain) -> int:
    async def query() -> int:
        async with vm.qmp() as qmp:
            return int((await qmp.execute("query-balloon"))["actual"])
    return aio.run(query())
