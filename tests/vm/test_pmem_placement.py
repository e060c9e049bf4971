"""Hot PMEM in DRAM (C15) on a real guest: a guest with a file-backed NVDIMM (on disk) declares one file
hot; after host pressure evicts it (MADV_PAGEOUT of QEMU's mapping), `hvext pmem-placement --apply` makes
it resident again, and pages out a cold (merely persistent) file the guest had read; no byte changes."""

from __future__ import annotations

import os

from hvext import aio
from hvext.daemon import placement_loop
from hvext.daemon.placement_loop import PlacementConfig
from hvext.memory import swap
from hvext.pmem import devices, placement
from hvext.pmem.placement_policy import VMState, translate
from tests.vm.helpers import cli, cli_json, guest_sh

MIB = 1 << 20
WRITE = r'''
import os
for name, byte in (("hot", b"H"), ("cold", b"C")):
    fd = os.open(f"/mnt/pm/{name}", os.O_RDWR | os.O_CREAT)
    os.write(fd, byte * (8 << 20))
    os.fsync(fd)
    os.close(fd)
'''


def test_hot_range_resident_after_pressure_and_cold_range_paged_out(vm_factory, capsys) -> None:
    domain = vm_factory.define(memory_mib=512)
    assert cli(capsys, "pmem-attach", domain.name, "--size", "64M")[0] == 0
    (device,) = devices.list_devices(domain)
    backing = device.path
    assert not placement.on_tmpfs(backing), backing  # a file on disk: the slower tier
    vm_factory.boot(domain)
    assert cli(capsys, "pmem-mount", domain.name, "pmem0", "/mnt/pm", "--format")[0] == 0
    guest_sh(domain, f"python3 -c '{WRITE}' && python3 -m hvext_agent.hints declare /mnt/pm/hot hot && "
                     "python3 -m hvext_agent.hints declare /mnt/pm/cold persistent")
    fd = devices.open_backing(backing, os.O_RDONLY)
    try:
        os.fsync(fd)  # the guest's DAX writes sit dirty in the host page cache: write them back (clean pages)
    finally:
        os.close(fd)
    digest = guest_sh(domain, "cat /mnt/pm/hot /mnt/pm/cold | sha256sum")["stdout"]  # both read: resident

    report = cli_json(capsys, "pmem-hints", domain.name)
    ranges = report["devices"][str(backing)]["ranges"]
    hot, cold = [tuple(r) for r in ranges["hot"]], [tuple(r) for r in ranges["persistent"]]
    assert sum(n for _, n in hot) >= 8 * MIB and sum(n for _, n in cold) >= 8 * MIB and not report["rejected"]
    data = backing.read_bytes()
    assert all(data[o:o + n] == b"H" * n for o, n in hot), "the hot range is not where the guest's file is"
    assert all(data[o:o + n] == b"C" * n for o, n in cold)
    assert placement.resident(backing, cold) >= 0.9 * sum(n for _, n in cold)

    # host pressure evicts the hot range (what reclaim does to this page cache under a memory hog)
    pid = swap.qemu_pid(domain.name)
    vmas = placement.backing_vmas(pid, backing)
    addresses, refused = translate(hot, vmas, device.size)
    assert refused == 0
    placement.advise(pid, addresses, placement.MADV_PAGEOUT)
    placement.drop_cached(backing, hot)
    before = placement.resident(backing, hot)
    assert before <= 0.2 * sum(n for _, n in hot), before

    placed = cli_json(capsys, "pmem-placement", domain.name, "--apply", "--cold", "pageout", "--budget", "32M")
    (entry,) = placed["devices"]
    assert entry["advice"]["refused_bytes"] == 0 and not entry["advice"]["willneed_error"], entry
    # MADV_WILLNEED's read-ahead is asynchronous: on a loaded host it may land after the report's 2 s
    after_hot = placement.wait_readahead(backing, hot, 20.0)
    after_cold = placement.resident(backing, cold)
    print(f"hot resident {before / MIB:.1f} -> {after_hot / MIB:.1f} MiB; cold resident -> {after_cold / MIB:.1f} MiB")
    assert after_hot >= 0.95 * sum(n for _, n in hot), entry
    assert after_cold <= 0.1 * sum(n for _, n in cold), entry
    assert guest_sh(domain, "cat /mnt/pm/hot /mnt/pm/cold | sha256sum")["stdout"] == digest  # nothing lost
    now = backing.read_bytes()  # (the guest's file system writes its journal meanwhile: compare the files' bytes)
    assert all(now[o:o + n] == data[o:o + n] for o, n in hot + cold)

    # hvextd's round does the same for this domain (budget split, hysteresis state kept for the next round)
    placement.advise(pid, addresses, placement.MADV_PAGEOUT)
    placement.drop_cached(backing, hot)
    states: dict[str, VMState] = {}
    config = PlacementConfig(enabled=True, budget_mib=32, cold="pageout", domains=(domain.name,))
    (round_report,) = aio.run(placement_loop.one_round(vm_factory.host, config, states))
    assert round_report["domain"] == domain.name and round_report["share_bytes"] >= sum(n for _, n in hot)
    assert placement.wait_readahead(backing, hot, 20.0) >= 0.95 * sum(n for _, n in hot), round_report
    assert states[domain.name].kept[str(backing)], states


def test_placement_refuses_a_domain_without_running_qemu(vm_factory, capsys) -> None:
    domain = vm_factory.define(memory_mib=256)
    status, _, err = cli(capsys, "pmem-placement", domain.name)
    assert status == 1 and "not running" in err.lower(), err
