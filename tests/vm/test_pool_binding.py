"""Pools that bind (C3) on real guests: a VM in a pool limited below its demand cannot hold more than
its limit on the host (its QEMU cgroup's usage), and a reserved VM keeps its memory when a sibling pool
presses for the host's capacity.

The pool tree is a temporary store ($HVEXT_POOLS_DB), never the shared one. Host swap is on, so what a
limited guest touches beyond its hard limit goes to swap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext.cli.main import main
from hvext.host import Domain
from hvext.memory import balloon, swap
from hvext.memory.memtune import overhead_mib
from tests.vm.helpers import guest_sh as guest

MIB = 1 << 20
CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


def cgroup_dir(domain: Domain) -> Path:
    """The memory cgroup (v1) libvirt put the domain's QEMU process in."""
    pid = swap.qemu_pid(domain.name)
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _id, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_MEMORY / path.lstrip("/")
    pytest.fail(f"{domain.name}: QEMU has no v1 memory cgroup")


def read_bytes(domain: Domain, name: str) -> int:
    return int((cgroup_dir(domain) / name).read_text())


def qemu_swap(domain: Domain) -> int:
    return swap.process_memory(swap.qemu_pid(domain.name))["swap"]


@pytest.fixture
def pools_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "pools.sqlite"
    monkeypatch.setenv("HVEXT_POOLS_DB", str(path))
    yield path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "warning" not in err, err
    return out


def test_limit_binds_and_reservation_holds_when_a_sibling_presses(vm_factory, pools_db: Path, capsys) -> None:
    reserved = vm_factory.boot(vm_factory.define(memory_mib=512))
    limited = vm_factory.boot(vm_factory.define(memory_mib=1024))
    # A guest that does not cooperate (no balloon driver): only the host-side limit can stop it.
    guest(limited, "rmmod virtio_balloon")
    # touch 200 MiB in the reserved guest and keep it: its memory is resident on the host
    guest(reserved, "mkdir -p /dev/shm && dd if=/dev/urandom of=/dev/shm/keep bs=1M count=200 2>/dev/null; echo ok")

    run(capsys, "pool-set", "/", "--capacity", "1024M")
    run(capsys, "pool-create", "/res", "--reservation", "384M")
    run(capsys, "pool-create", "/lim", "--limit", "384M")
    run(capsys, "pool-assign", reserved.name, "/res/vm", "--create")
    run(capsys, "pool-assign", limited.name, "/lim/vm", "--create")

    # the limited VM: entitled to its pool's limit, hard limit = limit + QEMU's overhead margin
    hard = (384 + overhead_mib(1024)) * MIB
    tune = limited.memory_parameters()
    assert tune["hard_limit"] * 1024 == hard, tune
    assert read_bytes(limited, "memory.limit_in_bytes") == hard
    assert limited.memory_parameters(live=False)["hard_limit"] * 1024 == hard  # the definition too
    target = balloon.recorded_target(limited)
    # the balloon follows the limit (the guest has no driver to obey: the hard limit binds)
    assert target is not None and target.source == "hvext" and 384 * MIB <= target.bytes < 1024 * MIB, target
    # the reserved VM: soft limit = reservation + margin (QEMU has no min_guarantee)
    margin = overhead_mib(512)
    assert reserved.memory_parameters()["soft_limit"] * 1024 == (384 + margin) * MIB

    # applied again: nothing differs
    report = json.loads(run(capsys, "pool-apply", "--dry-run", "--json"))
    assert [d["memtune_changes"] for d in report["domains"]] == [{}, {}], report

    # the limited guest touches 700 MiB (more than its limit plus margin): its cgroup never holds more
    (cgroup_dir(limited) / "memory.max_usage_in_bytes").write_text("0")
    touch = "python3 -c 'b = bytearray(700 << 20)\nfor r in range(2): b[::4096] = bytes([r + 1]) * len(b[::4096])'"
    result = guest(limited, touch, timeout=600)
    assert result["exitcode"] == 0, result
    assert read_bytes(limited, "memory.max_usage_in_bytes") <= hard
    assert qemu_swap(limited) >= 100 * MIB  # the rest went to the host's swap
    assert limited.memory_kib()[1] * 1024 > hard  # its demand (balloon actual) is above the limit

    # a sibling presses: the capacity shrinks to 768 MiB; the reserved VM keeps what it holds
    reserved_usage = read_bytes(reserved, "memory.usage_in_bytes")
    reserved_tune = reserved.memory_parameters()
    reserved_swap = qemu_swap(reserved)
    run(capsys, "pool-set", "/", "--capacity", "768M")
    assert reserved.memory_parameters() == reserved_tune  # entitled to its whole demand still
    pressed = limited.memory_parameters()["hard_limit"] * 1024
    assert pressed == (768 - 512 + overhead_mib(1024)) * MIB  # what the reserved VM leaves
    assert guest(limited, touch, timeout=600)["exitcode"] == 0
    assert read_bytes(limited, "memory.usage_in_bytes") <= pressed
    assert qemu_swap(reserved) - reserved_swap <= 4 * MIB  # nothing of the reserved VM was pushed out
    assert read_bytes(reserved, "memory.usage_in_bytes") >= reserved_usage - 16 * MIB

    # leaving its pool removes a domain's limits
    run(capsys, "pool-unassign", limited.name)
    assert limited.memory_parameters()["hard_limit"] == 9007199254740991
    run(capsys, "pool-unassign", reserved.name)
