"""NVM RAM on a real guest (C8): virtio-mem backed by a file on the NVM tier, grown and shrunk
by `hvext nvm-ram` and by hvextd's reclaim loop; the guest's MemTotal follows."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

from hvext import aio
from hvext.daemon import reclaim_loop
from hvext.memory import nvmram, swap
from hvext.memory.stats import agent_meminfo
from hvext.units import MIB
from tests.vm.helpers import cli, cli_json


def _mem_total(domain) -> int:
    return aio.run(agent_meminfo(domain))["meminfo_kb"]["MemTotal"] * 1024


def _mem_total_after(domain, expected: int, timeout: float = 60) -> int:
    """The guest's MemTotal once it is within 8 MiB of *expected* (onlining follows plugging), or at *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        total = _mem_total(domain)
        if abs(total - expected) <= 8 * MIB or time.monotonic() > deadline:
            return total
        time.sleep(1)


def test_nvm_ram_grows_and_shrinks_the_guest_and_lives_on_the_tier(vm_factory, capsys) -> None:
    tier = Path("/dev/shm") / f"hvext-test-nvm-{os.getpid()}"
    tier.mkdir(mode=0o711)
    os.chmod(tier, 0o711)  # QEMU's user must reach its file inside; umask may have cut the mode
    try:
        domain = vm_factory.define(memory_mib=512)
        status, out, err = cli(capsys, "nvm-ram", domain.name, "--attach", "256M", "--nvm-dir", str(tier))
        assert status == 0, err
        backing = tier / domain.name / "nvmram.img"
        st = os.lstat(backing)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 256 * MIB
        shown = cli_json(capsys, "nvm-ram", domain.name)
        assert (shown["size"], shown["requested"], shown["path"]) == (256 * MIB, 0, str(backing))

        vm_factory.boot(domain)
        pid = swap.qemu_pid(domain.name)
        assert str(backing) in Path(f"/proc/{pid}/maps").read_text(), "QEMU does not map the NVM tier file"
        base = _mem_total(domain)

        grown = cli_json(capsys, "nvm-ram", domain.name, "--size", "128M", "--wait", "120")
        assert (grown["requested"], grown["current"]) == (128 * MIB, 128 * MIB)
        total = _mem_total_after(domain, base + 128 * MIB)
        assert abs(total - base - 128 * MIB) <= 8 * MIB, (base, total)

        # hvextd's reclaim loop: the host short (a floor above anything), room on the tier -> grow by a step
        config = reclaim_loop.ReclaimConfig(host_available_min_mib=1 << 30, domains=(domain.name,), nvm_ram=True,
                                            nvm_dir=str(tier), nvm_free_min_mib=0, nvm_free_high_mib=0,
                                            nvm_step_mib=64).validate()
        done = aio.run(reclaim_loop.nvm_round(domain.host, config, 100 * MIB))
        assert [(d["domain"], d["nvm_ram_requested"]) for d in done] == [(domain.name, 192 * MIB)]
        assert nvmram.wait_settled(domain, 120).current == 192 * MIB
        assert abs(_mem_total_after(domain, base + 192 * MIB) - base - 192 * MIB) <= 8 * MIB
        # the tier short (its minimum above anything): give a step back, whatever the host says
        short = reclaim_loop.ReclaimConfig(host_available_min_mib=1 << 30, domains=(domain.name,), nvm_ram=True,
                                           nvm_dir=str(tier), nvm_free_min_mib=1 << 40, nvm_free_high_mib=1 << 40,
                                           nvm_step_mib=64).validate()
        done = aio.run(reclaim_loop.nvm_round(domain.host, short, 100 * MIB))
        assert [(d["domain"], d["nvm_ram_requested"]) for d in done] == [(domain.name, 128 * MIB)]
        assert nvmram.wait_settled(domain, 120).current == 128 * MIB

        shrunk = cli_json(capsys, "nvm-ram", domain.name, "--size", "0", "--wait", "120")
        assert (shrunk["requested"], shrunk["current"]) == (0, 0)
        total = _mem_total_after(domain, base)
        assert abs(total - base) <= 8 * MIB, (base, total)
        assert shrunk["allocated"] == 0, "the unplugged memory was not punched out of the tier's file"

        domain.destroy()
        vm_factory.domains.remove(domain)
        domain.undefine()  # the file holds the guest's last RAM contents: it goes with the definition
        assert not backing.parent.exists()
    finally:
        shutil.rmtree(tier, ignore_errors=True)
