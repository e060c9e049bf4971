"""NVDIMM devices for guests (C11): attach, detach and list through libvirt.

An NVDIMM is a ``<memory model='nvdimm' access='shared'>`` device backed by a
host file that QEMU maps into the guest's physical address space; the guest
sees ``/dev/pmem*`` and can use it with DAX (a load/store memory) or as a
block device (VPM's two forms).

virtio-pmem is not offered: Debian 12's libvirt 9.0 refuses to start a
domain that has one ("virtio-pmem memory device info is not handled yet").
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from hvext import paths
from hvext.errors import HostError, UsageError
from hvext.host import Domain, libvirt_errors
from hvext.domxml import libvirt_size
from hvext.units import MIB, format_size

#: libvirt rounds memory device sizes up to 2 MiB; the guest kernel wants
#: NVDIMM regions 16 MiB aligned for fsdax namespaces.
SIZE_ALIGN = 2 * MIB
FSDAX_ALIGN = 16 * MIB
MAX_SIZE = 64 * 1024 * MIB


@dataclass(frozen=True)
class PmemDevice:
    """One persistent-memory device of a domain, as libvirt describes it."""

    model: str
    path: Path
    size: int  # bytes, including the label area
    label_size: int
    alias: str | None = None
    node: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def parse_devices(xml: str) -> list[PmemDevice]:
    """The NVDIMM devices in a domain's XML."""
    root = etree.fromstring(xml.encode())
    devices = []
    for memory in root.iterfind("devices/memory"):
        model = memory.get("model")
        if model not in ("nvdimm", "virtio-pmem"):
            continue
        size = memory.find("target/size")
        label = memory.find("target/label/size")
        node = memory.find("target/node")
        alias = memory.find("alias")
        devices.append(PmemDevice(
            model=model, path=Path(memory.findtext("source/path") or ""),
            size=libvirt_size(size.text, size.get("unit")) if size is not None else 0,
            label_size=libvirt_size(label.text, label.get("unit")) if label is not None else 0,
            alias=alias.get("name") if alias is not None else None,
            node=int(node.text) if node is not None and node.text else None,
        ))
    return devices


def device_xml(path: Path, size: int, label_size: int = 0, node: int = 0) -> str:
    """The ``<memory model='nvdimm'>`` element for a device of *size* bytes (label included)."""
    memory = etree.Element("memory", model="nvdimm", access="shared")
    etree.SubElement(etree.SubElement(memory, "source"), "path").text = str(path)
    target = etree.SubElement(memory, "target")
    etree.SubElement(target, "size", unit="KiB").text = str(size // 1024)
    etree.SubElement(target, "node").text = str(node)
    if label_size:
        label = etree.SubElement(target, "label")
        etree.SubElement(label, "size", unit="KiB").text = str(label_size // 1024)
    return etree.tostring(memory, encoding="unicode")


def validate_sizes(size: int, label_size: int) -> int:
    """Check user sizes; return the device size (usable size plus label, 2 MiB aligned)."""
    if size <= 0 or size % SIZE_ALIGN:
        raise UsageError(f"pmem size {format_size(size)} must be a positive multiple of 2 MiB "
                         f"(16 MiB multiples allow fsdax/DAX in the guest)")
    if size > MAX_SIZE:
        raise UsageError(f"pmem size {format_size(size)} is over the {format_size(MAX_SIZE)} hvext allows")
    if label_size < 0 or label_size % 1024 or (label_size and label_size < 128 * 1024):
        raise UsageError("label size must be 0 (no labels) or at least 128 KiB, in whole KiB")
    total = size + label_size
    return -(-total // SIZE_ALIGN) * SIZE_ALIGN


def prepare_backing(path: Path, size: int) -> bool:
    """Create a sparse backing file of *size* bytes, or check an existing one (its data is kept).

    Returns whether it was created, so a failed attach can remove it again.
    """
    if path.exists():
        if not path.is_file():
            raise UsageError(f"backing {path} is not a regular file")
        if path.stat().st_size != size:
            raise UsageError(f"backing {path} has {path.stat().st_size} bytes; the device needs exactly {size} "
                             "(the size plus any label area, 2 MiB aligned)")
        return False
    if not path.parent.is_dir():
        raise UsageError(f"directory {path.parent} for the backing file does not exist")
    with open(path, "xb") as handle:
        handle.truncate(size)
    return True


def _default_backing(domain: Domain, existing: list[PmemDevice]) -> Path:
    used = {d.path for d in existing}
    for index in range(64):
        candidate = paths.domain_dir(domain.name) / f"pmem{index}.img"
        if candidate not in used and not candidate.exists():
            return candidate
    raise HostError(f"domain {domain.name!r} has too many pmem backing files")


def attach(domain: Domain, size: int, *, label_size: int = 0, backing: Path | None = None,
           live: bool = False) -> PmemDevice:
    """Add an NVDIMM of *size* usable bytes to the domain's definition (and, with *live*, to the running guest).

    A new backing file is created sparse; an existing one must already have the
    device's size (its contents are the guest's data and are kept).
    """
    device_size = validate_sizes(size, label_size)
    with libvirt_errors(f"domain {domain.name!r}"):
        persistent = bool(domain.dom.isPersistent())
        active = bool(domain.dom.isActive())
        existing = parse_devices(domain.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if persistent else 0))
    if live and not active:
        raise UsageError(f"--live needs a running domain; {domain.name!r} is off (omit --live to add it "
                         "to the definition)")
    if not live and not persistent:
        raise UsageError(f"domain {domain.name!r} is transient: use --live")
    path = Path(backing) if backing else _default_backing(domain, existing)
    if any(d.path == path for d in existing):
        raise UsageError(f"{path} already backs a pmem device of {domain.name!r}")
    created = prepare_backing(path, device_size)
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if persistent else 0
    if live:
        flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
    try:
        with libvirt_errors(f"attaching pmem to {domain.name!r}"):
            domain.dom.attachDeviceFlags(device_xml(path, device_size, label_size), flags)
    except BaseException:
        if created:
            path.unlink(missing_ok=True)
        raise
    return PmemDevice("nvdimm", path, device_size, label_size, node=0)


def detach(domain: Domain, path: Path, *, live: bool = False, remove_backing: bool = False) -> PmemDevice:
    """Remove the device backed by *path* from the definition (and the running guest with *live*)."""
    with libvirt_errors(f"domain {domain.name!r}"):
        persistent = bool(domain.dom.isPersistent())
        xml = domain.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if persistent and not live else 0)
    device = next((d for d in parse_devices(xml) if d.path == Path(path)), None)
    if device is None:
        raise UsageError(f"domain {domain.name!r} has no pmem device backed by {path}; `hvext pmem-list` shows them")
    if not live and domain.is_active():
        raise UsageError(f"domain {domain.name!r} is running: use --live (the guest must release the device), "
                         "or shut it down first")
    flags = (libvirt.VIR_DOMAIN_AFFECT_CONFIG if persistent else 0) | (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0)
    with libvirt_errors(f"detaching pmem from {domain.name!r}"):
        domain.dom.detachDeviceFlags(device_xml(device.path, device.size, device.label_size, device.node or 0),
                                     flags)
    if remove_backing and device.path.is_relative_to(paths.domain_dir(domain.name)):
        os.unlink(device.path)
    return device


def list_devices(domain: Domain) -> list[PmemDevice]:
    """Devices of the running domain (live XML), or of its definition when it is off."""
    with libvirt_errors(f"domain {domain.name!r}"):
        return parse_devices(domain.dom.XMLDesc(0))
