"""virtio-pmem devices, managed by hvext because Debian 12's libvirt cannot.

libvirt 9.0 refuses to start or reconnect to a domain whose QEMU reports a
virtio-pmem device among the memory devices it manages ("virtio-pmem memory
device info is not handled yet"). It only asks QEMU when its own definition
has memory devices, so hvext keeps virtio-pmem out of libvirt's device list:

* cold plug: ``-object memory-backend-file`` + ``-device virtio-pmem-pci`` in
  the domain's ``<qemu:commandline>`` (persistent definition);
* hot plug: the same through QMP on hvext's monitor, on a free PCIe root port;
* hvext's metadata in the domain XML records each device (id, backing, size).

A domain has either libvirt NVDIMMs or hvext virtio-pmem devices, not both
(libvirt would then query and fail); hvext refuses to mix them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from lxml import etree

from hvext import paths
from hvext.agent import protocol
from hvext.domxml import HVEXT_NS, QEMU_NS
from hvext.errors import HostError, QMPError, UnsupportedError, UsageError
from hvext.host import Domain
from hvext.pmem import devices
from hvext.pmem.devices import PmemDevice
from hvext.qmp import QMPSession

ID_PREFIX = "hvext-vpmem"
METADATA_URI = HVEXT_NS + "/virtio-pmem"


def _device_args(dev_id: str, path: Path, size: int, bus: str) -> list[str]:
    """Command-line arguments in QEMU's JSON syntax: libvirt writes its devices as JSON, and
    QEMU creates JSON devices in command-line order (after the root port *bus*)."""
    return ["-object", json.dumps({"qom-type": "memory-backend-file", "id": dev_id, "mem-path": str(path),
                                   "size": size, "share": True}, separators=(",", ":")),
            "-device", json.dumps({"driver": "virtio-pmem-pci", "id": dev_id, "memdev": dev_id, "bus": bus,
                                   "addr": "0x0"}, separators=(",", ":"))]


def _arg_json(value: str) -> dict:
    """The JSON object of a command-line argument, or {} (not JSON, not an object, beyond the bounded
    loader's limits: too deep, huge numbers). Total: the definition is not hvext's to trust."""
    try:
        parsed = protocol.loads(value, HostError, "the domain definition") if value.startswith("{") else {}
    except HostError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _free_port_in_definition(xml: str) -> str:
    """A PCIe root port of the definition that no device (libvirt's or hvext's) sits behind.

    libvirt assigns device addresses at define time, so the persistent XML
    says which ports stay empty; the highest one is taken.
    """
    root = etree.fromstring(xml.encode())
    ports = {int(c.get("index", "-1")) for c in root.iterfind("devices/controller[@type='pci']")
             if c.get("model") == "pcie-root-port"}
    used = {int(a.get("bus", "0"), 16) for a in root.iterfind("devices//address[@type='pci']")}
    for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        bus = str(_arg_json(arg.get("value", "")).get("bus", ""))
        if bus.startswith("pci.") and bus[4:].isdigit():
            used.add(int(bus[4:]))
    free = sorted(ports - used)
    if not free:
        raise HostError("no empty PCIe root port left in the definition for a virtio-pmem device")
    return f"pci.{free[-1]}"


def parse(xml: str) -> list[PmemDevice]:
    """hvext's virtio-pmem devices recorded in a domain's XML (from its commandline)."""
    root = etree.fromstring(xml.encode())
    found = []
    for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        fields = _arg_json(arg.get("value", ""))
        if fields.get("qom-type") == "memory-backend-file" and str(fields.get("id", "")).startswith(ID_PREFIX):
            path, size = fields.get("mem-path"), fields.get("size")
            if not isinstance(path, str) or not path or type(size) is not int or size <= 0:
                raise HostError(f"the domain's virtio-pmem backend {str(fields['id'])[:80]!r} is malformed: "
                                f"mem-path {path!r:.80} and size {size!r:.40} (hvext writes a path and a "
                                "positive byte count); fix the <qemu:commandline> with `virsh edit`")
            found.append(PmemDevice("virtio-pmem", Path(path), size, 0, alias=fields["id"]))
    return found


def _libvirt_memory_devices(xml: str) -> list[PmemDevice]:
    return [d for d in devices.parse_devices(xml) if d.model == "nvdimm"]


def free_root_port(reply: Any) -> str:
    """qdev id of a PCIe root port with nothing behind it, from QEMU's ``query-pci`` reply.

    The reply is untrusted: anything but a list of buses with device lists is a QMPError.
    """
    if not isinstance(reply, list):
        raise QMPError("malformed query-pci reply: not a list of buses")
    for bus in reply:
        bus_devices = bus.get("devices") if isinstance(bus, dict) else None
        if not isinstance(bus_devices, list):
            raise QMPError("malformed query-pci reply: a bus without a device list")
        for dev in bus_devices:
            if not isinstance(dev, dict):
                raise QMPError("malformed query-pci reply: a device that is not an object")
            bridge, qdev_id = dev.get("pci_bridge"), dev.get("qdev_id")
            if bridge is None or not qdev_id:
                continue
            if not isinstance(bridge, dict) or not isinstance(qdev_id, str):
                raise QMPError("malformed query-pci reply: a bridge with a bad qdev_id or pci_bridge")
            if not bridge.get("devices"):
                return qdev_id
    raise HostError("no free PCIe root port for hot-plugging (hvext domains start with 4 free ones)")


async def _free_root_port(qmp: QMPSession) -> str:
    return free_root_port(await qmp.execute("query-pci"))


def _edit_commandline(xml: str, add: list[str] | None = None, remove_id: str | None = None) -> str:
    root = etree.fromstring(xml.encode())
    cmdline = root.find(f"{{{QEMU_NS}}}commandline")
    if cmdline is None:
        cmdline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
    if remove_id:
        args = list(cmdline)
        for index, arg in enumerate(args):
            if _arg_json(arg.get("value", "")).get("id") == remove_id:
                cmdline.remove(args[index - 1])  # the -object / -device before it
                cmdline.remove(arg)
    for value in add or []:
        etree.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=value)
    return etree.tostring(root, encoding="unicode")


def _definitions(domain: Domain) -> tuple[bool, bool, str, str]:
    """Persistent?, active?, the inactive and the live XML (blocking: attach runs it in a thread)."""
    return domain.is_persistent(), domain.is_active(), domain.xml(inactive=True, secure=True), domain.xml()


async def attach(domain: Domain, size: int, *, backing: Path | None = None, live: bool = False) -> PmemDevice:
    """Add a virtio-pmem device (definition, and with *live* the running guest too).

    libvirt calls and file I/O run in threads: the caller's loop may be shared (hvextd).
    """
    size = devices.validate_sizes(size, 0)
    persistent, active, config_xml, live_xml = await asyncio.to_thread(_definitions, domain)
    if live and not active:
        raise UsageError(f"--live needs a running domain; {domain.name!r} is off")
    if not persistent:
        raise UsageError(f"domain {domain.name!r} is transient; hvext's virtio-pmem needs a persistent definition")
    if _libvirt_memory_devices(config_xml) or _libvirt_memory_devices(live_xml):
        raise UsageError(f"domain {domain.name!r} has NVDIMMs: with Debian 12's libvirt a domain cannot have "
                         "both NVDIMM and virtio-pmem devices")
    if active and not live:
        raise UsageError(f"domain {domain.name!r} is running: use --live (cold plug needs it shut off)")
    existing = parse(config_xml) + parse(live_xml)
    used_ids = {d.alias for d in existing}
    dev_id = next(f"{ID_PREFIX}{i}" for i in range(64) if f"{ID_PREFIX}{i}" not in used_ids)
    path = devices.backing_path(backing) if backing else paths.domain_dir(domain.name) / f"{dev_id}.img"
    if any(d.path == path for d in existing):
        raise UsageError(f"{path} already backs a pmem device of {domain.name!r}")
    uid, gid = await asyncio.to_thread(domain.host.qemu_user)
    # libvirt does not label files it does not know about: hvext hands this one to QEMU's user.
    created = await asyncio.to_thread(devices.prepare_backing, path, size, owner=(uid, gid), allowed_uids=(uid,))
    try:
        if live:
            async with domain.qmp() as qmp:
                port = await _free_root_port(qmp)
                args = _device_args(dev_id, path, size, port)
                await qmp.execute("object-add", json.loads(args[1]))
                try:
                    await qmp.execute("device_add", json.loads(args[3]))
                except BaseException:
                    await qmp.execute("object-del", {"id": dev_id})
                    raise
        else:
            args = _device_args(dev_id, path, size, _free_port_in_definition(config_xml))
        await asyncio.to_thread(domain.redefine, _edit_commandline(config_xml, add=args))
    except BaseException:
        if created:
            path.unlink(missing_ok=True)
        raise
    return PmemDevice("virtio-pmem", path, size, 0, alias=dev_id)


def detach(domain: Domain, path: Path, *, live: bool = False, remove_backing: bool = False) -> PmemDevice:
    config_xml = domain.xml(inactive=True, secure=True)
    active = domain.is_active()
    device = next((d for d in parse(config_xml) if d.path == devices.backing_path(path)), None)
    if device is None:
        raise UsageError(f"domain {domain.name!r} has no virtio-pmem device backed by {path}")
    if live or active:
        raise UnsupportedError("QEMU 7.2 cannot hot-unplug virtio-pmem devices; shut the domain down and "
                               "detach it without --live")
    domain.redefine(_edit_commandline(config_xml, remove_id=device.alias))
    if remove_backing and devices.backing_path(device.path).is_relative_to(paths.domain_dir(domain.name)):
        device.path.unlink(missing_ok=True)
    return device


def list_devices(domain: Domain) -> list[PmemDevice]:
    """virtio-pmem devices of the definition (which includes hot-plugged ones)."""
    return parse(domain.xml(inactive=True))
