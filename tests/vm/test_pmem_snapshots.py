"""Guest PMEM snapshots in an NVM region (C14 guest integration): snapshot, purge, restore on a real guest."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from hvext import paths
from hvext.host import Domain, RunState
from hvext.pmem import guestsnap
from tests.vm.test_power import cli, guest_sha256, guest_write

BLOCK = 64 * 1024
MIB = 1 << 20


@pytest.fixture(scope="module")
def snap_vm(vm_factory_module) -> Domain:
    domain = vm_factory_module.define(memory_mib=512)
    assert cli_main(["pmem-attach", domain.name, "--size", "32M"]) == 0
    yield vm_factory_module.boot(domain)
    shutil.rmtree(paths.STATE_DIR / "pmem-regions" / domain.name, ignore_errors=True)


def cli_main(argv: list[str]) -> int:
    from hvext.cli.main import main
    return main(argv)


def test_snapshot_purge_restore(snap_vm: Domain, capsys) -> None:
    vm = snap_vm
    first = bytearray(32 * MIB)
    first[MIB:3 * MIB] = guest_write(vm, MIB, 2 * MIB, seed=11)
    status, out, err = cli(capsys, "pmem-snapshot", vm.name, "nvdimm0", "s1", "--json")
    assert status == 0, err
    s1 = json.loads(out)
    assert s1["bytes_written"] == 2 * MIB and vm.state is RunState.RUNNING, s1
    second = bytearray(first)
    second[2 * MIB:2 * MIB + 4096] = guest_write(vm, 2 * MIB, 4096, seed=12)
    status, out, err = cli(capsys, "pmem-snapshot", vm.name, "nvdimm0", "s2", "--json")
    assert status == 0, err
    assert json.loads(out)["bytes_written"] == BLOCK  # only the changed block since s1
    status, out, err = cli(capsys, "pmem-purge", vm.name, "nvdimm0", "--json")
    assert status == 0, err
    purged = json.loads(out)
    assert purged["blocks_moved"] == 1  # s1's version of the block s2 changed: only s1 holds it now
    # restore needs the guest paused or off
    status, _, err = cli(capsys, "pmem-restore", vm.name, "nvdimm0", "s1")
    assert status == 1 and "is running" in err
    vm.suspend()
    status, out, err = cli(capsys, "pmem-restore", vm.name, "nvdimm0", "s1", "--json")
    assert status == 0, err
    assert json.loads(out)["bytes_written"] == BLOCK
    vm.resume()
    assert guest_sha256(vm) == hashlib.sha256(first).hexdigest()
    # the restore copied s1's bytes into the running point: s2's version is non-active now
    status, out, err = cli(capsys, "pmem-purge", vm.name, "nvdimm0", "--json")
    purged = json.loads(out)
    assert status == 0 and purged["blocks_moved"] == 1, purged
    status, out, _ = cli(capsys, "pmem-snapshots", vm.name, "nvdimm0", "--json")
    listing = json.loads(out)
    assert listing["snapshots"] == ["s1", "s2"] and listing["stats"]["mass_blocks"] == 2
    device = guestsnap.resolve_device(vm, "nvdimm0")
    with guestsnap.open_region(vm, device) as region:
        assert region.read_snapshot("s2", 0, 32 * MIB) == bytes(second)  # both read back from mass storage
        assert region.read_snapshot("s1", 0, 32 * MIB) == bytes(first)
    for argv, message in [(["pmem-snapshot", vm.name, "nvdimm9", "x"], "no pmem device"),
                          (["pmem-snapshot", vm.name, "nvdimm0", "s1"], "already exists"),
                          (["pmem-restore", vm.name, "nvdimm0", "nope"], "no snapshot")]:
        status, _, err = cli(capsys, *argv)
        assert status == 1 and err.startswith("error: ") and message in err, (argv, err)
