"""NVM RAM in the domain XML (golden): libvirt's virtio-mem device with hvext's alias, the file backend on
QEMU's command line and the override that points the device at it; and reading it back, untrusted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvext.errors import HostError, UsageError
from hvext.memory import nvmram
from hvext.units import MIB
from tests.unit.test_domxml import GOLDEN, make

BACKING = Path("/srv/nvm/golden/nvmram.img")


def test_golden_definition_with_nvm_ram() -> None:
    """maxMemory/slots stay; <memory> grows by the device (libvirt counts memory devices in it)."""
    rendered = nvmram.add_to_definition(make(False).render(), BACKING, 512 * MIB)
    path = GOLDEN / "domain-tcg-nvmram.xml"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert rendered == path.read_text()
    assert "<memory unit=\"KiB\">1572864</memory>" in rendered.replace("'", '"')
    assert '<maxMemory slots="8" unit="MiB">' in rendered


def test_definition_reads_back_as_written() -> None:
    xml = nvmram.add_to_definition(make(False).render(), BACKING, 512 * MIB)
    assert nvmram.parse(xml) == nvmram.NvmRam(BACKING, 512 * MIB, 2 * MIB, 0, None)
    assert nvmram.parse(make(False).render()) is None
    with pytest.raises(UsageError, match="already"):
        nvmram.add_to_definition(xml, BACKING, 512 * MIB)


def live(current: str, requested: str = "131072") -> str:
    xml = nvmram.add_to_definition(make(False).render(), BACKING, 256 * MIB)
    return xml.replace("<requested unit=\"KiB\">0</requested>",
                       f"<requested unit=\"KiB\">{requested}</requested><current unit=\"KiB\">{current}</current>")


def test_live_current_is_read_and_checked() -> None:
    assert nvmram.parse(live("131072")).current == 128 * MIB
    with pytest.raises(HostError, match="more than its size"):
        nvmram.parse(live(str(512 * 1024)))
    with pytest.raises(HostError, match="not a size"):
        nvmram.parse(live("12x"))
    with pytest.raises(HostError, match="out of range"):
        nvmram.parse(live(str(1 << 60)))


def test_a_virtio_mem_device_without_hvexts_backend_is_not_on_the_tier() -> None:
    """Someone's virtio-mem with hvext's alias but no override is libvirt's RAM: path None (not managed)."""
    xml = make(False).render().replace("</devices>", nvmram.device_xml(64 * MIB) + "</devices>")
    assert nvmram.parse(xml) == nvmram.NvmRam(None, 64 * MIB, 2 * MIB, 0, None)


@pytest.mark.parametrize("size", [-2 * MIB, MIB, 3 * MIB, nvmram.MAX_SIZE + 2 * MIB, True, 2.0])
def test_sizes_must_be_whole_blocks_in_range(size: object) -> None:
    with pytest.raises(UsageError, match="multiple of 2 MiB"):
        nvmram.check_size(size)  # type: ignore[arg-type]


def test_undefine_removes_only_hvexts_layout_never_through_a_link(tmp_path: Path) -> None:
    tier = tmp_path / "nvm"
    (tier / "vm1").mkdir(parents=True)
    backing = nvmram.backing_file(tier, "vm1")
    backing.write_bytes(b"guest ram")
    xml = nvmram.add_to_definition(make(False).render(), backing, 64 * MIB)
    nvmram.remove_backing("vm1", xml)
    assert not (tier / "vm1").exists()
    # another domain's name in the path, or a file hvext did not lay out: left alone
    other = tier / "vm2" / "nvmram.img"
    other.parent.mkdir()
    other.write_bytes(b"x")
    nvmram.remove_backing("vm1", nvmram.add_to_definition(make(False).render(), other, 64 * MIB))
    assert other.exists()
    # a link in place of the file is not followed (its target stays)
    (tier / "vm1").mkdir()
    os.symlink(other, nvmram.backing_file(tier, "vm1"))
    nvmram.remove_backing("vm1", xml)
    assert other.exists() and os.path.islink(nvmram.backing_file(tier, "vm1"))
