"""Dirty rates and dirty page lists on real guests, and the QEMU patch series' three additions.

With the patched QEMU (make qemu) these exercise all three patches under TCG:
dirty-bitmap rates without a crash, page lists that hold the pages a workload
wrote, and a flush event for a guest fsync on virtio-pmem. Without the patched
build its tests are skipped (failed under CI=true, where setup builds it); the
stock QEMU's fallbacks are checked on a guest running Debian's QEMU either way.
Each test asserts on every path; the CPU decides between the KVM and TCG ones.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from hvext import accel, aio
from hvext.agent.client import AgentClient, StressStatus
from hvext.cli.dirty import dirty_pages_over
from hvext.cli.main import main
from hvext.dirty import rate
from hvext.dirty.pages import DirtyLog
from hvext.errors import UnsupportedError
from hvext.host import Domain, RunState, emulator_path
from tests.support import require

# The patched QEMU is installed by setup (`make qemu`): missing, its tests skip locally and fail under CI=true.
patched = pytest.mark.requires(emulator_path() is not None, "needs the patched QEMU (make qemu)")
# What the CPU allows decides between the KVM and TCG complements.
T = TypeVar("T")
tcg_only = pytest.mark.skipif(accel.current().is_kvm, reason="runs under KVM, where this mode is available")


def agent(domain: Domain, call: Callable[[AgentClient], Awaitable[T]]) -> T:
    """What *call* returns, given a connected agent client of *domain*."""
    async def run() -> T:
        async with domain.agent(timeout=30) as client:
            return await call(client)
    return aio.run(run())


@pytest.fixture
def stress(booted_vm: Domain):  # type: ignore[no-untyped-def]
    started: list[bool] = []

    def start(rate_mib: float, wss_mib: int) -> StressStatus:
        agent(booted_vm, lambda client: client.stress_start(rate_mib, wss_mib))
        started.append(True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the working set is faulted in and writing starts
            status = agent(booted_vm, lambda client: client.stress_status())
            if (status.pages_written or 0) > 0:
                time.sleep(4)  # let the guest settle after faulting in (and freeing) working sets
                return status
            time.sleep(0.5)
        raise AssertionError("the stress workload never started writing")
    yield start
    if started:
        agent(booted_vm, lambda client: client.stress_stop())


def test_page_sampling_rate_follows_the_workload(booted_vm: Domain, stress) -> None:
    idle = aio.run(rate.measure(booted_vm, 2, "page-sampling", 4096))
    stress(24, 200)  # 24 MiB/s over a 200 MiB working set: 3 s dirty 72 MiB of distinct pages
    busy = aio.run(rate.measure(booted_vm, 3, "page-sampling", 4096))
    assert idle.rate_mib_s <= 4
    assert 12 <= busy.rate_mib_s <= 36, busy


@tcg_only
def test_dirty_ring_is_refused_under_tcg(booted_vm: Domain, capsys) -> None:
    status = main(["domdirtyrate", booted_vm.name, "--mode", "dirty-ring"])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith("error: ") and "needs KVM" in err, err
    assert booted_vm.state is RunState.RUNNING


def test_stock_qemu_refuses_what_would_crash_it(vm_factory, capsys) -> None:
    """A guest on Debian's stock QEMU, also where the patched build is installed (virsh-defined domains)."""
    stock = shutil.which("qemu-system-x86_64")
    require(stock, "needs Debian's QEMU (make setup installs qemu-system-x86)")
    domain = vm_factory.define(memory_mib=512)
    root = ET.fromstring(domain.xml())
    root.find("devices/emulator").text = stock  # type: ignore[union-attr]
    domain.redefine(ET.tostring(root, encoding="unicode"))
    vm_factory.boot(domain)
    with pytest.raises(UnsupportedError, match="patched QEMU"):
        aio.run(dirty_pages_over(domain, 1))
    status = main(["domdirtyrate", domain.name, "--mode", "dirty-bitmap", "--json"])
    out, err = capsys.readouterr()
    if accel.current().is_kvm:  # KVM's dirty log serves dirty-bitmap on any QEMU
        assert status == 0 and json.loads(out)["mode"] == "dirty-bitmap", err
    else:  # refused before QEMU was asked
        assert status == 1 and "crashes in dirty-bitmap mode" in err, err
    assert domain.state is RunState.RUNNING


@pytest.mark.kvm
def test_guests_run_under_kvm_and_dirty_bitmap_needs_no_patch(booted_vm: Domain, stress) -> None:
    """Where KVM is usable hvext's guests use it, and KVM's dirty log serves dirty-bitmap on any QEMU."""
    async def query_kvm() -> dict[str, Any]:
        async with booted_vm.qmp() as qmp:
            return await qmp.execute("query-kvm")
    assert aio.run(query_kvm()) == {"enabled": True, "present": True}
    stress(16, 200)
    result = aio.run(rate.measure(booted_vm, 3, "dirty-bitmap"))
    assert booted_vm.state is RunState.RUNNING
    assert 12 <= result.rate_mib_s <= 24, result


@patched
def test_dirty_bitmap_rate_under_tcg_does_not_crash(booted_vm: Domain, stress) -> None:
    stress(16, 200)
    result = aio.run(rate.measure(booted_vm, 3, "dirty-bitmap"))
    assert booted_vm.state is RunState.RUNNING
    assert 12 <= result.rate_mib_s <= 24, result  # 48 MiB of distinct pages in 3 s, plus a little guest noise


@patched
def test_page_list_holds_the_pages_the_workload_wrote(booted_vm: Domain, stress, capsys) -> None:
    status = stress(64, 64)  # the whole 64 MiB working set is rewritten every second
    frames = status.pfn_sample
    assert len(frames) >= 32
    pages = aio.run(dirty_pages_over(booted_vm, 2.0))
    ram = max(pages.blocks.values(), key=lambda b: b.length)  # libvirt's ram-node0: guest RAM from address 0
    missing = [f for f in frames if not ram.contains(f)]
    assert not missing, f"{len(missing)} of {len(frames)} workload pages not in the dirty list"
    assert pages.dirty * pages.page_size >= 64 << 20
    assert pages.fetch_seconds < 2.0
    status_code = main(["dirtylog", booted_vm.name, "--seconds", "1", "--json"])
    listing = json.loads(capsys.readouterr().out)
    assert status_code == 0 and listing["dirty"] > 0


@patched
def test_dirtylog_watch_takes_count_samples_of_the_workload(booted_vm: Domain, stress, capsys) -> None:
    stress(16, 32)
    started = time.monotonic()
    status = main(["dirtylog", booted_vm.name, "--watch", "1", "--count", "3", "--json"])
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    samples = [json.loads(line) for line in out.splitlines()]  # one JSON object per line
    assert status == 0, err
    assert [s["sample"] for s in samples] == [1, 2, 3] and {s["domain"] for s in samples} == {booted_vm.name}
    for sample in samples:  # each covers one interval, and the workload wrote in each
        assert 500 <= sample["interval_ms"] <= 5000 and sample["dirty"] > 0 and sample["mib_per_s"] > 0
        assert sample["dirty"] == sum(b["dirty"] for b in sample["blocks"].values())
    assert elapsed >= 3.0
    # Without --json (not a terminal): each sample printed in turn, with the history plot.
    assert main(["dirtylog", booted_vm.name, "--watch", "0.5", "--count", "2"]) == 0
    text = capsys.readouterr().out
    assert "sample 1 at" in text and "sample 2 at" in text and "last 2 intervals" in text
    # The watch stopped its dirty log: a one-off log starts and stops as usual.
    assert main(["dirtylog", booted_vm.name, "--seconds", "0.5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dirty"] > 0


@patched
def test_dirty_log_coexists_with_dirty_rate(booted_vm: Domain, stress) -> None:
    stress(16, 100)

    async def both() -> tuple[int, int]:
        async with booted_vm.qmp() as qmp, DirtyLog(qmp) as log:
            await log.fetch()
            measured = await rate.measure_with(qmp, 2, "dirty-bitmap")
            return (await log.fetch()).dirty, measured.rate_mib_s
    dirty, measured = aio.run(both())
    assert dirty > 0 and measured > 0


@pytest.fixture(scope="module")
def vpmem_vm(vm_factory_module) -> Domain:
    domain = vm_factory_module.define(memory_mib=512)
    assert main(["pmem-attach", domain.name, "--size", "64M", "--type", "virtio-pmem"]) == 0
    return vm_factory_module.boot(domain)


@pytest.fixture(scope="module")
def vpmem_fs(vpmem_vm: Domain) -> Domain:
    """The guest with an ext4 file system on its virtio-pmem device mounted at /mnt/f (made once,
    whichever test of the module asks first)."""
    from tests.vm.helpers import guest_sh
    guest_sh(vpmem_vm, "mountpoint -q /mnt/f || { mkfs.ext4 -q -F -b 4096 /dev/pmem0 && mkdir -p /mnt/f && "
                       "mount /dev/pmem0 /mnt/f; }")
    return vpmem_vm


@patched
def test_guest_fsync_on_virtio_pmem_raises_a_flush_event(vpmem_fs: Domain) -> None:
    vpmem_vm = vpmem_fs
    async def run() -> list[dict[str, Any]]:
        async with vpmem_vm.qmp() as qmp:
            events: list[dict[str, Any]] = []

            async def collect() -> None:
                async for event in qmp.events("X_HVEXT_PMEM_FLUSH"):
                    events.append(event["data"])
            watcher = asyncio.ensure_future(collect())
            await asyncio.sleep(0)
            async with vpmem_vm.agent(timeout=120) as client:
                before = len(events)
                await client.exec(["python3", "-c", "import os; fd = os.open('/mnt/f/x', os.O_WRONLY | os.O_CREAT);"
                                                    " os.write(fd, b'durable'); os.fsync(fd)"])
            deadline = time.monotonic() + 10
            while len(events) <= before and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            watcher.cancel()
            return events[before:]
    flushes = aio.run(run(), timeout=240)
    assert flushes, "no X_HVEXT_PMEM_FLUSH event after the guest's fsync"
    assert all(f["device"] == "hvext-vpmem0" and f["error"] is False for f in flushes)
    sequence = [f["seq"] for f in flushes]
    assert sequence == sorted(sequence) and len(set(sequence)) == len(sequence)


@patched
def test_a_pause_for_a_save_follows_a_guest_flush(vpmem_fs: Domain) -> None:
    from hvext.pmem import hints
    from tests.vm.helpers import guest_sh
    vpmem_vm = vpmem_fs
    guest_sh(vpmem_vm, "setsid sh -c 'while true; do date > /mnt/f/tick; sync; sleep 0.2; done' "
                       ">/dev/null 2>&1 </dev/null &")
    report = hints.before_pause(vpmem_vm)
    assert report["paused_after_flush"]["device"] == "hvext-vpmem0", report
    assert report["paused_after_flush"]["seq"] > 0
    hints.after_resume(vpmem_vm)
