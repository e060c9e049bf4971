"""The guest's own boot path (hvext/image.py): small guests boot, PMEM drivers load only with PMEM."""

from __future__ import annotations

import json
import time

import pytest

from hvext.host import Domain
from hvext.units import MIB
from tests.vm.helpers import cli, cli_json, guest_sh


@pytest.fixture(scope="module")
def small_vm(vm_factory_module) -> Domain:
    """A 256 MiB guest without PMEM (Debian's 30 MB initrd made such a guest panic at boot)."""
    return vm_factory_module.boot(vm_factory_module.define(memory_mib=256))


def loaded_modules(domain: Domain) -> set[str]:
    return set(guest_sh(domain, "ls /sys/module")["stdout"].split())


def test_a_256_mib_guest_boots_to_agent_ready(small_vm: Domain, vm_factory_module, capsys, record_property) -> None:
    record_property("boot_to_agent_s", round(vm_factory_module.boot_seconds[small_vm.name], 1))
    ping = cli_json(capsys, "agent-ping", small_vm.name)
    assert ping["kernel"].endswith("-amd64")
    total_kib = int(guest_sh(small_vm, "awk '/MemTotal/ {print $2}' /proc/meminfo")["stdout"])
    assert 100 * 1024 < total_kib <= 256 * 1024
    status, out, _ = cli(capsys, "console-log", small_vm.name)
    # hvext's initramfs switched to hvext-init, which started the agent
    assert status == 0 and "hvext-initramfs: switching to /sbin/hvext-init" in out
    assert "hvext-init: agent started" in out and "hvext-agent: ready" in out
    assert "ndctl/keys" not in out  # no NVDIMM security-key loading on a guest without PMEM


def test_pmem_drivers_load_only_with_pmem_and_on_hot_plug(small_vm: Domain, capsys) -> None:
    deadline = time.monotonic() + 60
    while not {"virtio_balloon", "nfit", "button"} <= (modules := loaded_modules(small_vm)):
        assert time.monotonic() < deadline, f"the modules hvext-init loads after the agent never came: {modules}"
        time.sleep(1)
    assert not {"nd_pmem", "dax_pmem", "virtio_pmem"} & modules, "PMEM drivers loaded without a PMEM device"
    status, _, err = cli(capsys, "pmem-attach", small_vm.name, "--size", "64M", "--live")
    assert status == 0, err
    deadline = time.monotonic() + 60
    while True:
        status, out, err = cli(capsys, "pmem-list", small_vm.name, "--json")
        assert status == 0, err
        if json.loads(out)["guest"] or time.monotonic() > deadline:
            break
        time.sleep(1)
    (namespace,) = json.loads(out)["guest"]
    assert namespace["size"] <= 64 * MIB
    assert "nd_pmem" in loaded_modules(small_vm)
