"""RAM-file domains in the domain XML: hvext's file backend as the machine's memory, the NUMA cell and
<maxMemory> dropped (libvirt then names its own backend on -machine, which a later -machine overrides),
and reading it back, untrusted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lxml import etree

from hvext import paths
from hvext.domxml import QEMU_NS
from hvext.errors import HostError, UsageError
from hvext.memory import ramfile
from hvext.units import MIB
from tests.unit.test_domxml import make

RAM = Path("/dev/shm/hvext/golden/ram.0123abcd")


def test_definition_reads_back_as_written() -> None:
    xml = ramfile.add_to_definition(make(False).render(), RAM)
    ram = ramfile.parse(xml)
    assert ram == ramfile.RamFile(RAM, 1024 * MIB, "hvext-ram")
    root = etree.fromstring(xml.encode())
    assert root.find("maxMemory") is None and root.find("cpu/numa") is None
    args = [a.get("value") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    i = args.index("-object", args.index("-machine") - 2)
    assert json.loads(args[i + 1]) == {"qom-type": "memory-backend-file", "id": "hvext-ram", "mem-path": str(RAM),
                                       "size": 1024 * MIB, "share": True}
    assert args[-2:] == ["-machine", "memory-backend=hvext-ram"]  # after libvirt's own -machine: it wins
    assert ramfile.parse(make(False).render()) is None
    with pytest.raises(UsageError, match="already"):
        ramfile.add_to_definition(xml, RAM)


def test_refuses_swap_file_and_memory_devices() -> None:
    xml = make(False).render()
    with pytest.raises(UsageError, match="memoryBacking"):
        ramfile.add_to_definition(xml.replace("<vcpu", "<memoryBacking><source type='file'/></memoryBacking><vcpu"),
                                  RAM)
    with pytest.raises(UsageError, match="memory devices"):
        ramfile.add_to_definition(xml.replace("</devices>", "<memory model='nvdimm'/></devices>"), RAM)


@pytest.mark.parametrize("change", [
    lambda v: v.replace('"share":true', '"share":false'),
    lambda v: v.replace('"mem-path":"/dev', '"mem-path":"dev'),
    lambda v: v.replace('"size":1073741824', '"size":"1G"'),
])
def test_untrusted_backend_is_refused(change) -> None:
    xml = ramfile.add_to_definition(make(False).render(), RAM)
    backend = ramfile.backend_arg(RAM, 1024 * MIB)
    with pytest.raises(HostError):
        ramfile.parse(xml.replace(backend.replace('"', "&quot;"), change(backend).replace('"', "&quot;")))


def test_backend_without_machine_override_is_refused() -> None:
    xml = ramfile.add_to_definition(make(False).render(), RAM)
    with pytest.raises(HostError, match="machine"):
        ramfile.parse(xml.replace("memory-backend=hvext-ram", "nvdimm=on"))


def test_paths_are_per_domain_and_host() -> None:
    a, b = ramfile.ram_path("vm1", "aaaa1111"), ramfile.ram_path("vm1", "bbbb2222")
    assert a != b and a.parent == b.parent == paths.VOLATILE_DIR / "vm1"
    assert ramfile.ram_path("vm2", "aaaa1111").parent == paths.VOLATILE_DIR / "vm2"
    for name, host in (("../x", "a"), ("vm", "../a"), ("", "a"), ("vm", "")):
        with pytest.raises(UsageError):
            ramfile.ram_path(name, host)
    assert ramfile.block_id() == ramfile.BACKEND_ID == "hvext-ram"


def test_a_migration_destination_gets_its_own_ram_file() -> None:
    """Hosts of a lab share /dev/shm: the destination's QEMU must map its own file, not the source's."""
    from hvext.host import rewrite_host_paths
    source = ramfile.ram_path("golden", "aaaa1111")
    xml = ramfile.add_to_definition(make(False).render(), source)
    dest = ramfile.parse(rewrite_host_paths(xml, "golden", "aaaa1111", "bbbb2222"))
    assert dest == ramfile.moved(ramfile.parse(xml), "golden", "bbbb2222")
    assert dest.path == ramfile.ram_path("golden", "bbbb2222") != source


def test_incoming_start_definition() -> None:
    xml = ramfile.add_to_definition(make(False).render(), RAM)
    incoming = ramfile.with_incoming(xml)
    root = etree.fromstring(incoming.encode())
    args = [a.get("value") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args[-2:] == ["-incoming", "defer"]
    assert ramfile.parse(incoming) == ramfile.parse(xml)
