"""The NVDIMM device XML (hvext.pmem.devices.device_xml): golden files, and libvirt reads it back as written.

``UPDATE_GOLDEN=1`` rewrites the golden files (review the diff).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from hvext.pmem import devices
from hvext.units import KIB, MIB

GOLDEN = Path(__file__).parent / "golden"
CASES = {
    "nvdimm-labelled": (Path("/var/lib/hvext/domains/vm/nvdimm0.img"), 256 * MIB, 128 * KIB, 0),
    "nvdimm-plain-node1": (Path("/dev/shm/hvext/vm/nvdimm1.img"), 64 * MIB, 0, 1),
}
DOMAIN = """<domain type='test'><name>{name}</name><memory unit='MiB'>512</memory>
<maxMemory slots='4' unit='MiB'>2048</maxMemory><vcpu>2</vcpu>
<cpu><numa><cell id='0' cpus='0' memory='256' unit='MiB'/><cell id='1' cpus='1' memory='256' unit='MiB'/></numa></cpu>
<os><type>hvm</type></os><devices>{devices}</devices></domain>"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    path = GOLDEN / f"{case}.xml"
    rendered = devices.device_xml(*CASES[case]) + "\n"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert rendered == path.read_text()


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    connection = libvirt.open("test:///default")
    try:
        yield connection
    finally:
        connection.close()


def test_libvirt_reads_the_devices_back_as_written(conn: libvirt.virConnect) -> None:
    """A domain defined with the devices (libvirt's test driver parses and re-serialises them):
    parse_devices finds each with its path, size (label included), label size and node."""
    name = f"hvext-unit-{os.getpid()}-nvdimm-xml"
    dom = conn.defineXML(DOMAIN.format(name=name, devices="".join(devices.device_xml(*c)
                                                                  for c in CASES.values())))
    try:
        found = devices.parse_devices(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    finally:
        dom.undefine()
    assert [(d.model, d.path, d.size, d.label_size, d.node) for d in found] == \
        [("nvdimm", path, size, label, node) for path, size, label, node in CASES.values()]

