"""Reclaim on real guests: the policy balloons a guest full of free memory and swaps one
whose balloon driver is gone, and both really return memory to the host (QEMU's RSS)."""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

from hvext import aio
from hvext.cli.main import main
from hvext.host import Domain
from hvext.memory import reclaim
from tests.vm.helpers import guest_sh as guest

MIB = 1 << 20


@pytest.fixture(scope="module")
def reclaim_vm(vm_factory_module) -> Domain:
    domain = vm_factory_module.boot(vm_factory_module.define(memory_mib=768))
    # touch 400 MiB and free it again: free guest memory that is resident on the host
    guest(domain, "python3 -c 'b = bytearray(400 << 20); b[::4096] = b\"x\" * len(b[::4096])'")
    return domain


def test_free_guest_is_ballooned_and_gives_memory_back(reclaim_vm: Domain, capsys) -> None:
    status = main(["reclaim", reclaim_vm.name, "200M", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    report = json.loads(out)
    assert report["method"] == "balloon", report["decision"]["reason"]
    assert report["balloon_actual_after"] <= report["balloon_actual_before"] - 190 * MIB
    assert report["returned"] >= 100 * MIB, report  # the QEMU process really shrank


def test_guest_without_balloon_driver_is_swapped(reclaim_vm: Domain) -> None:
    guest(reclaim_vm, "rmmod virtio_balloon")
    time.sleep(12)  # let the driver's last statistics go stale
    report = aio.run(reclaim.reclaim(reclaim_vm, 128 * MIB, "auto"))
    assert report.method == "swap" and "not responding" in report.decision["reason"]
    assert report.returned >= 100 * MIB, report
    assert guest(reclaim_vm, "echo alive")["stdout"] == "alive\n"  # swapped pages fault back in
    with pytest.raises(Exception, match="does not respond"):
        aio.run(reclaim.reclaim(reclaim_vm, 64 * MIB, "balloon"))


def test_reclaim_input_errors(reclaim_vm: Domain, capsys) -> None:
    for argv, message in [(["reclaim", reclaim_vm.name, "lots"], "invalid size"),
                          (["reclaim", reclaim_vm.name, "10G"], "keeps at least"),
                          (["reclaim", reclaim_vm.name, "64M", "--method", "magic"], "invalid choice")]:
        assert main(argv) == 1
        assert message in capsys.readouterr().err


def test_hvextd_reclaim_loop_logs_its_decisions(reclaim_vm: Domain, tmp_path) -> None:
    from tests.vm.test_daemon import Hvextd, scrape
    config = tmp_path / "hvextd.toml"
    # a floor above the host's memory: every round is short, so the loop acts on our VM only
    config.write_text(f'[reclaim]\ninterval_s = 2\nhost_available_min_mib = {1 << 30}\nstep_mib = 64\n'
                      f'domains = ["{reclaim_vm.name}"]\n'
                      f'[metrics]\nport = 0\ndomains = ["{reclaim_vm.name}"]\n')
    daemon = Hvextd("--config", str(config))
    try:
        url = re.search(r"http://\S+/metrics", daemon.expect("serving metrics on")).group(0)  # type: ignore[union-attr]
        line = daemon.expect(f"reclaimed from {reclaim_vm.name}", timeout=90)
        assert "swap" in line or "balloon" in line
        method = line.split(f"reclaimed from {reclaim_vm.name}: ", 1)[1].split(",", 1)[0]
        decisions = scrape(url)[("hvext_reclaim_decisions_total",
                                 (("domain", reclaim_vm.name), ("method", method)))]
        assert decisions >= 1
    finally:
        daemon.stop()
    bad = tmp_path / "bad.toml"
    bad.write_text("[reclaim]\nstep_mib = 1\n")
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "hvext.daemon.main", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "step_mib" in done.stderr


def test_reclaim_leaves_the_shared_loop_free(reclaim_vm: Domain, record_property) -> None:
    """The page-out (process_madvise, seconds) and libvirt calls ran on hvext's shared loop, which
    libvirt's keepalives and events and hvextd's SIGPWR save need: a heartbeat task measures it."""
    async def reclaim_with_heartbeat() -> tuple[reclaim.ReclaimReport, float]:
        lag = 0.0
        running = True

        async def heartbeat() -> None:
            nonlocal lag
            while running:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lag = max(lag, time.monotonic() - before - 0.01)

        beat = asyncio.ensure_future(heartbeat())
        try:
            report = await reclaim.reclaim(reclaim_vm, 384 * MIB, "swap")
        finally:
            running = False
            await beat
        return report, lag

    guest(reclaim_vm, "python3 -c 'b = bytearray(450 << 20); b[::4096] = b\"y\" * len(b[::4096])'")  # resident
    report, lag = aio.run(reclaim_with_heartbeat())
    pageout = next(n for n in report.notes if n.startswith("host swap:"))
    pageout_s = float(re.search(r"in ([0-9.]+) s", pageout).group(1))  # type: ignore[union-attr]
    record_property("pageout_s", pageout_s)
    record_property("loop_lag_s", round(lag, 3))
    print(f"page-out {pageout_s:.2f} s, loop lag {lag:.3f} s")
    assert pageout_s >= 0.1, f"the page-out was too quick to tell ({pageout}); the test needs a longer one"
    assert lag < pageout_s / 2, f"the loop stalled {lag:.2f} s during a {pageout_s:.2f} s page-out"
