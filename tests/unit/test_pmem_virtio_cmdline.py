"""The virtio-pmem command-line edit (hvext.pmem.virtio): hvext's devices live in ``<qemu:commandline>``.

Adding a device appends its ``-object``/``-device`` pair on a free PCIe root
port and leaves every other argument as it was; removing one takes out
exactly its pair; :func:`virtio.parse` reads back what was written.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from hvext.domxml import QEMU_NS
from hvext.errors import HostError
from hvext.pmem import virtio
from hvext.pmem.devices import PmemDevice
from hvext.units import MIB

# A definition as libvirt writes it: root ports 1-4 with indexes, a disk behind port 1.
DEFINITION = f"""<domain type='kvm' xmlns:qemu='{QEMU_NS}'><name>vm</name><devices>
<controller type='pci' index='0' model='pcie-root'/>
<controller type='pci' index='1' model='pcie-root-port'/>
<controller type='pci' index='2' model='pcie-root-port'/>
<controller type='pci' index='3' model='pcie-root-port'/>
<controller type='pci' index='4' model='pcie-root-port'/>
<disk type='file' device='disk'><address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></disk>
</devices>
<qemu:commandline><qemu:arg value='-machine'/><qemu:arg value='nvdimm=on'/></qemu:commandline>
</domain>"""
A, B = Path("/var/lib/hvext/domains/vm/hvext-vpmem0.img"), Path("/dev/shm/hvext/vm/hvext-vpmem1.img")


def args_of(xml: str) -> list[str]:
    root = etree.fromstring(xml.encode())
    return [a.get("value") for a in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]


def with_two_devices() -> str:
    first = virtio._edit_commandline(DEFINITION, add=virtio._device_args(
        "hvext-vpmem0", A, 64 * MIB, virtio._free_port_in_definition(DEFINITION)))
    return virtio._edit_commandline(first, add=virtio._device_args(
        "hvext-vpmem1", B, 128 * MIB, virtio._free_port_in_definition(first)))


def test_added_devices_are_read_back_and_other_arguments_kept() -> None:
    xml = with_two_devices()
    assert virtio.parse(xml) == [PmemDevice("virtio-pmem", A, 64 * MIB, 0, alias="hvext-vpmem0"),
                                 PmemDevice("virtio-pmem", B, 128 * MIB, 0, alias="hvext-vpmem1")]
    args = args_of(xml)
    assert args[:2] == ["-machine", "nvdimm=on"] and args[2::2] == ["-object", "-device"] * 2
    assert args[3] == '{"qom-type":"memory-backend-file","id":"hvext-vpmem0","mem-path":"%s",' \
                      '"size":%d,"share":true}' % (A, 64 * MIB)
    assert args[4:6] == ["-device", '{"driver":"virtio-pmem-pci","id":"hvext-vpmem0","memdev":"hvext-vpmem0",'
                                    '"bus":"pci.4","addr":"0x0"}']  # the highest empty root port
    assert '"bus":"pci.3"' in args[9]  # the next device takes the next empty one


def test_removing_a_device_takes_out_exactly_its_pair() -> None:
    xml = virtio._edit_commandline(with_two_devices(), remove_id="hvext-vpmem0")
    assert [d.alias for d in virtio.parse(xml)] == ["hvext-vpmem1"]
    assert args_of(xml)[:2] == ["-machine", "nvdimm=on"] and len(args_of(xml)) == 6
    assert args_of(virtio._edit_commandline(xml, remove_id="hvext-vpmem1")) == ["-machine", "nvdimm=on"]
    assert args_of(virtio._edit_commandline(xml, remove_id="hvext-vpmem7")) == args_of(xml)  # not there


def test_a_definition_without_a_commandline_gets_one() -> None:
    plain = "<domain type='kvm'><name>vm</name><devices/></domain>"
    xml = virtio._edit_commandline(plain, add=virtio._device_args("hvext-vpmem0", A, 64 * MIB, "pci.1"))
    assert [d.alias for d in virtio.parse(xml)] == ["hvext-vpmem0"]


def test_no_free_root_port_is_a_host_error() -> None:
    full = DEFINITION
    for index in range(3):  # ports 2-4 (the disk is behind port 1)
        full = virtio._edit_commandline(full, add=virtio._device_args(
            f"hvext-vpmem{index}", Path(f"/p{index}"), 2 * MIB, virtio._free_port_in_definition(full)))
    with pytest.raises(HostError, match="no empty PCIe root port"):
        virtio._free_port_in_definition(full)
