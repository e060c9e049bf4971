"""NVDIMM devices on real guests: cold and hot plug, DAX in the guest, and hvext.rvm surviving resets."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from hvext import aio
from hvext.cli.main import main
from hvext.host import Domain
from hvext.units import MIB
from tests.vm.helpers import cli, cli_json
from tests.vm.helpers import guest_exec as guest


@pytest.fixture(scope="module")
def pmem_vm(vm_factory_module) -> Domain:
    """A guest with a 256 MiB NVDIMM attached before boot."""
    domain = vm_factory_module.define(memory_mib=512)
    status = main(["pmem-attach", domain.name, "--size", "256M"])
    assert status == 0
    return vm_factory_module.boot(domain)


def test_cold_plugged_nvdimm_is_seen_and_dax_writes_reach_the_backing_file(pmem_vm: Domain, capsys) -> None:
    status, out, err = cli(capsys, "pmem-list", pmem_vm.name, "--json")
    assert status == 0, err
    listing = json.loads(out)
    (device,) = listing["devices"]
    assert device["model"] == "nvdimm" and device["size"] == 256 * MIB
    assert [ns["mode"] for ns in listing["guest"]] == ["raw"]
    status, out, err = cli(capsys, "pmem-mount", pmem_vm.name, "pmem0", "/mnt/pmem", "--format", "--json")
    assert status == 0, err
    assert json.loads(out)["dax"] is True
    marker = f"hvext-dax-{random.getrandbits(64):016x}".encode()
    guest(pmem_vm, "python3", "-c",
          "import mmap, os, sys\n"
          "fd = os.open('/mnt/pmem/dax-probe', os.O_RDWR | os.O_CREAT)\n"
          "os.ftruncate(fd, 4096)\n"
          "m = mmap.mmap(fd, 4096)\n"
          f"m[0:{len(marker)}] = {marker!r}\n"
          "m.flush()\n")
    # DAX: the store went straight to the NVDIMM, i.e. into the host file (no guest page cache, no sync)
    assert marker in Path(device["path"]).read_bytes()
    status, out, _ = cli(capsys, "pmem-list", pmem_vm.name, "--json")
    (namespace,) = json.loads(out)["guest"]
    assert namespace["mode"] == "fsdax" and namespace["mount"] == {"mountpoint": "/mnt/pmem", "fstype": "ext4",
                                                                    "dax": True}


def test_dommemstat_target_does_not_count_pmem(pmem_vm: Domain, capsys) -> None:
    """libvirt adds the NVDIMM to currentMemory: dommemstat showed a 768 MiB target for this 512 MiB guest."""
    stats = cli_json(capsys, "dommemstat", pmem_vm.name)
    assert stats["balloon_target"] == {"bytes": 512 * MIB, "source": "definition", "set_at": None}
    assert stats["balloon_actual"] == 512 * MIB


def test_hot_plugged_nvdimm_appears_in_the_guest(pmem_vm: Domain, capsys) -> None:
    status, _, err = cli(capsys, "pmem-attach", pmem_vm.name, "--size", "64M", "--live")
    assert status == 0, err

    def namespaces() -> list[dict[str, Any]]:
        status, out, _ = cli(capsys, "pmem-list", pmem_vm.name, "--json")
        return json.loads(out)["guest"]
    deadline = time.monotonic() + 30
    while len(namespaces()) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    sizes = sorted(ns["size"] for ns in namespaces())
    assert len(sizes) == 2 and sizes[0] <= 64 * MIB


def test_pmem_input_errors(pmem_vm: Domain, capsys) -> None:
    for argv, message in [
        (["pmem-attach", pmem_vm.name, "--size", "3M"], "multiple of 2 MiB"),
        (["pmem-attach", pmem_vm.name, "--size", "lots"], "invalid size"),
        (["pmem-attach", pmem_vm.name, "--size", "64M", "--label-size", "4K"], "at least 128 KiB"),
        (["pmem-attach", pmem_vm.name, "--size", "64M", "--type", "virtio-pmem", "--live"], "both NVDIMM and virtio-pmem"),
        (["pmem-attach", pmem_vm.name, "--size", "64M", "--backing", "/nonexistent-dir/x.img"], "does not exist"),
        (["pmem-detach", pmem_vm.name, "/no/such/backing.img"], "no pmem device backed by"),
        (["pmem-mount", pmem_vm.name, "pmem0", "/mnt/elsewhere"], "already mounted"),
        (["pmem-mount", pmem_vm.name, "sda", "/mnt/x"], "must look like pmem0"),
    ]:
        status, _, err = cli(capsys, *argv)
        assert status == 1 and err.startswith("error: ") and message in err, (argv, err)


def test_rvm_on_dax_pmem_survives_guest_resets(pmem_vm: Domain, capsys) -> None:
    """hvext.rvm on ext4-DAX on /dev/pmem0: after `virsh reset` at a random moment the
    segment equals the model after a prefix of the transactions that includes every
    transaction whose flush commit had returned (issue C20)."""
    status, _, err = cli(capsys, "pmem-mount", pmem_vm.name, "pmem0", "/mnt/pmem")  # already mounted, or:
    assert status == 0 or "already mounted" in err
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    guest(pmem_vm, "mkdir", "-p", "/mnt/pmem/rvm")
    durable_before = 0
    for round_ in range(2):
        guest(pmem_vm, "sh", "-c", f"rm -f /run/rvm-progress; setsid python3 -m hvext_agent.rvm_workload run "
                                   f"/mnt/pmem/rvm --seed {seed} >/run/rvm.out 2>&1 </dev/null &")
        time.sleep(rng.uniform(2.0, 6.0))
        progress = guest(pmem_vm, "sh", "-c", "cat /run/rvm-progress 2>/dev/null || echo 0")["stdout"]
        durable = int(progress.strip() or 0)
        pmem_vm.dom.reset(0)  # like `virsh reset`: no shutdown, no sync
        aio.run(pmem_vm.wait_agent(240))
        # guest block device names can change across boots: find the fsdax namespace again
        status, out, _ = cli(capsys, "pmem-list", pmem_vm.name, "--json")
        (blockdev,) = [ns["blockdev"] for ns in json.loads(out)["guest"] if ns["mode"] == "fsdax"]
        status, _, err = cli(capsys, "pmem-mount", pmem_vm.name, blockdev, "/mnt/pmem")
        assert status == 0, err
        result = json.loads(guest(pmem_vm, "python3", "-m", "hvext_agent.rvm_workload", "check",
                                  "/mnt/pmem/rvm", "--seed", str(seed))["stdout"])
        assert result["ok"], f"round {round_}: segment is not the model after {result['recovered']} transactions"
        assert result["recovered"] >= max(durable, durable_before), (round_, durable, result)
        assert result["recovered"] > durable_before, "the workload made no progress"
        durable_before = result["recovered"]


@pytest.fixture(scope="module")
def virtio_pmem_vm(vm_factory_module) -> Domain:
    """A guest with a 128 MiB virtio-pmem device cold-plugged by hvext (libvirt 9.0 cannot)."""
    domain = vm_factory_module.define(memory_mib=512)
    assert main(["pmem-attach", domain.name, "--size", "128M", "--type", "virtio-pmem"]) == 0
    return vm_factory_module.boot(domain)


def test_virtio_pmem_cold_and_hot_plug_with_dax(virtio_pmem_vm: Domain, capsys) -> None:
    vm = virtio_pmem_vm
    status, _, err = cli(capsys, "pmem-attach", vm.name, "--size", "64M", "--type", "virtio-pmem", "--live")
    assert status == 0, err
    deadline = time.monotonic() + 30
    while True:
        listing = json.loads(cli(capsys, "pmem-list", vm.name, "--json")[1])
        if len(listing["guest"]) == 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sorted(d["size"] for d in listing["devices"]) == [64 * MIB, 128 * MIB]
    assert {d["model"] for d in listing["devices"]} == {"virtio-pmem"}
    assert sorted(ns["size"] for ns in listing["guest"]) == [64 * MIB, 128 * MIB]
    big = next(ns for ns in listing["guest"] if ns["size"] == 128 * MIB)
    status, out, err = cli(capsys, "pmem-mount", vm.name, big["blockdev"], "/mnt/vp", "--format", "--json")
    assert status == 0 and json.loads(out)["dax"] is True, err
    marker = f"hvext-vpmem-{random.getrandbits(64):016x}".encode()
    guest(vm, "python3", "-c",
          "import mmap, os\n"
          "fd = os.open('/mnt/vp/probe', os.O_RDWR | os.O_CREAT)\n"
          "os.ftruncate(fd, 4096)\n"
          "m = mmap.mmap(fd, 4096)\n"
          f"m[0:{len(marker)}] = {marker!r}\n"
          "m.flush()\n")  # msync on virtio-pmem: the guest asks the host to flush
    backing = next(d["path"] for d in listing["devices"] if d["size"] == 128 * MIB)
    assert marker in Path(backing).read_bytes()
    status, _, err = cli(capsys, "pmem-detach", vm.name, backing, "--live")
    assert status == 1 and "cannot hot-unplug virtio-pmem" in err
    status, _, err = cli(capsys, "pmem-attach", vm.name, "--size", "64M", "--live")
    assert status == 1 and "both NVDIMM and virtio-pmem" in err
