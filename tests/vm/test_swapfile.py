"""Per-VM swap files (C6) on a real guest: its RAM in a thin file on disk, pushed there (not to host swap)
when its QEMU cgroup is limited, the reservation rebalanced against it, and the live file defragmented.

The reservation is made in a temporary STATE_DIR on the same file system as
libvirt's memory_backing_dir (never the host's own reservation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hvext.memory import swap, swapfile
from hvext.memory.memtune import overhead_mib
from tests.vm.helpers import cli, cli_json
from tests.vm.helpers import guest_sh as guest

MIB = 1 << 20
RAM_MIB = 512
DATA_MIB = 256
#: What the QEMU process may keep of guest RAM: DATA_MIB does not fit, the rest must reach the file.
LIMIT_MIB = 128
#: The guest fills DATA_MIB with a pattern, checks it later; prints the sha256 each time.
FILL = ("python3 -c \"import hashlib,os,time\nb = bytearray(os.urandom(1 << 20)) * %d\n"
        "print(hashlib.sha256(b).hexdigest(), flush=True)\nopen('/run/ready', 'w').close()\n"
        "while os.path.exists('/run/ready'): time.sleep(0.5)\nprint(hashlib.sha256(b).hexdigest())\" "
        "> /run/fill.out 2>&1 </dev/null &" % DATA_MIB)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The reservation's directory (the domains keep hvext's own STATE_DIR)."""
    root = tmp_path / "swap"
    monkeypatch.setattr(swapfile, "swap_root", lambda: root)
    return root


def wait_for(domain, path: str, timeout: float = 300) -> None:
    result = guest(domain, f"for i in $(seq {int(timeout * 2)}); do [ -e {path} ] && exit 0; sleep 0.5; done; exit 1",
                   timeout=timeout + 30)
    assert result["exitcode"] == 0, result


def test_guest_ram_reaches_its_own_file_under_a_cgroup_limit(vm_factory, state: Path, capsys) -> None:
    domain = vm_factory.define(memory_mib=RAM_MIB, swap_file=True)
    vm_factory.boot(domain)
    pid = swap.qemu_pid(domain.name)
    path = swapfile.domain_file(domain)
    assert path.parent.parent == swapfile.memory_backing_dir()  # libvirt's <id>-<name>/ram-node0

    # rapid power-on: the guest booted on a file much smaller than its RAM (sparse, created by QEMU)
    booted = cli_json(capsys, "swapfile", domain.name)
    assert booted["file"]["apparent_bytes"] == RAM_MIB * MIB
    assert booted["file"]["allocated_bytes"] < RAM_MIB * MIB // 2, booted
    assert booted["fstype"] == swapfile.filesystem_type(path)

    # a reservation on the same file system; the first rebalance gives back what the VM's file holds
    total = 1024 * MIB
    assert cli(capsys, "swap-reservation", "create", "1G")[0] == 0
    first = cli_json(capsys, "swap-reservation", "rebalance")
    assert first["balance"]["conserved"] and first["balance"]["drift_bytes"] == 0, first
    assert first["vms"][domain.name]["allocated_bytes"] == first["balance"]["vm_sum_bytes"] > 0
    assert first["balance"]["reservation_bytes"] == total - first["balance"]["vm_sum_bytes"]

    # the QEMU process may hold LIMIT_MIB of guest RAM (plus its own margin): the rest must go to the file
    hard_kib = (LIMIT_MIB + overhead_mib(RAM_MIB)) << 10
    domain.set_memory_parameters({"hard_limit": hard_kib}, live=True, config=False)
    guest(domain, "rm -f /run/ready; setsid " + FILL)
    wait_for(domain, "/run/ready")
    pressed = cli_json(capsys, "swapfile", domain.name)
    # the guest holds DATA_MIB, its QEMU holds at most the limit: the pages went to its file, not host swap.
    # Host swap is read for the guest-RAM mapping alone (smaps of the file's mapping): QEMU's own anonymous
    # memory (its heap, TCG's translation buffer) may go to host swap under the limit (68 MB in one CI run).
    assert pressed["resident_bytes"] <= hard_kib << 10, pressed
    assert pressed["file"]["allocated_bytes"] >= DATA_MIB * MIB, pressed
    ram = swapfile.mapping_residency(pid, path)
    assert ram["rss"] > 0 and ram["swap"] == 0, ram  # (Rss: the mapping was found by its path)

    # the file grew: the reservation gives as much back, the sum stays the total
    grown = cli_json(capsys, "swap-reservation", "rebalance")
    assert grown["move"]["punched_bytes"] > 0 and grown["balance"]["drift_bytes"] == 0, grown
    assert grown["balance"]["held_bytes"] == total
    assert swapfile.info(swapfile.reservation_path()).allocated == total - grown["balance"]["vm_sum_bytes"]

    # defragment the live file (ext4), the guest's data held meanwhile. Linux 6.18 refuses to move the
    # extents of a file QEMU maps shared and writes (EPERM): then the refusal must say so, and change nothing.
    why = swapfile.defrag_support(path)
    assert not why, why  # /var/lib/libvirt is ext4 on the hosts hvext sets up
    before = swapfile.info(path)
    status, out, err = cli(capsys, "swapfile", domain.name, "--defrag", "--json")
    if status == 0:
        done = json.loads(out)
        assert done["after"]["fragments"] <= done["before"]["fragments"], done
        assert done["after"]["allocated_bytes"] == done["before"]["allocated_bytes"], done
        outcome = {k: done[k] for k in ("before", "after")}
    else:
        assert status == 1 and err.startswith("error: the kernel refused to move the extents of"), err
        assert "EXT4_IOC_MOVE_EXT: Operation not permitted" in err and not out
        assert swapfile.info(path).allocated == before.allocated
        assert not list(path.parent.glob("*.defrag"))  # e4defrag's donor file is gone
        outcome = {"refused": err.strip()}
    assert domain.state.value == "running"
    status, out, err = cli(capsys, "swapfile", domain.name)
    assert status == 0 and "fragments" in out and "Reservation total" in out, err

    # what the guest wrote came back intact: from its file, through the limit and the defragmentation
    guest(domain, "rm /run/ready")
    result = guest(domain, "for i in $(seq 600); do [ $(wc -l < /run/fill.out) -ge 2 ] && break; sleep 0.5; done;"
                           " cat /run/fill.out", timeout=400)
    hashes = result["stdout"].split()
    assert len(hashes) == 2 and hashes[0] == hashes[1], result
    print(json.dumps({"booted": booted["file"], "pressed": pressed["file"], "resident": pressed["resident_bytes"],
                      "qemu_swap": swap.process_memory(pid)["swap"], "defrag": outcome}))
