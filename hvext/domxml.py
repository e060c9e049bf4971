"""Domain XML for hvext guests, built by small declarative classes.

Each class renders one element; :class:`DomainXML` fixes the order of the
top-level elements (the order libvirt itself writes), so the same spec always
gives byte-identical XML (golden tests rely on that). Parsing helpers read
what hvext needs back from a live domain's XML.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from hvext.agent.protocol import CHANNEL_NAME
from hvext.errors import UsageError
from hvext.units import GIB, KIB, MIB, TIB

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def commandline_object(root: etree._Element, object_id: str) -> dict[str, object] | None:
    """The JSON ``-object`` with id *object_id* on the definition's ``<qemu:commandline>`` (None: not there)."""
    for arg in root.iterfind(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg"):
        value = arg.get("value", "")
        if not value.startswith("{") or object_id not in value:
            continue
        try:
            parsed = json.loads(value)
        except ValueError:
            continue
        if isinstance(parsed, dict) and parsed.get("id") == object_id:
            return parsed
    return None
HVEXT_NS = "https://hvext.dev/xmlns/domain/1"
AGENT_PORT = CHANNEL_NAME
QMP_CHARDEV_ID = "hvext-qmp"
QMP_CLI_CHARDEV_ID = "hvext-qmp-cli"
MEMORY_DEVICE_SLOTS = 8
MEMORY_DEVICE_ROOM_MIB = 64 * GIB // MIB
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    element = etree.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


@dataclass(frozen=True)
class OSBoot:
    """Direct kernel boot of the guest image's kernel and initrd."""

    kernel: Path
    initrd: Path
    cmdline: str
    machine: str = "q35"

    def render(self, parent: etree._Element) -> None:
        os_el = _sub(parent, "os")
        _sub(os_el, "type", "hvm", arch="x86_64", machine=self.machine)
        _sub(os_el, "kernel", str(self.kernel))
        _sub(os_el, "initrd", str(self.initrd))
        _sub(os_el, "cmdline", self.cmdline)


@dataclass(frozen=True)
class CPU:
    """host-passthrough under KVM; a fixed, TCG-friendly model under TCG.

    One NUMA cell holds the boot memory: libvirt needs it for memory devices
    (NVDIMM, virtio-pmem), which go to node 0.
    """

    kvm: bool
    vcpus: int
    memory_mib: int

    def render(self, parent: etree._Element) -> None:
        if self.kvm:
            cpu = _sub(parent, "cpu", mode="host-passthrough", check="none", migratable="on")
        else:
            cpu = _sub(parent, "cpu", mode="custom", match="exact", check="none")
            _sub(cpu, "model", "qemu64", fallback="forbid")
        numa = _sub(cpu, "numa")
        _sub(numa, "cell", id="0", cpus=f"0-{self.vcpus - 1}", memory=str(self.memory_mib), unit="MiB")


@dataclass(frozen=True)
class Disk:
    """A virtio disk from a qcow2 overlay on the shared guest image."""

    path: Path
    target: str = "vda"
    fmt: str = "qcow2"

    def render(self, devices: etree._Element) -> None:
        disk = _sub(devices, "disk", type="file", device="disk")
        _sub(disk, "driver", name="qemu", type=self.fmt, discard="unmap")
        _sub(disk, "source", file=str(self.path))
        _sub(disk, "target", dev=self.target, bus="virtio")


@dataclass(frozen=True)
class AgentChannel:
    """The virtio-serial port the hvext agent listens on, at a socket hvext chooses.

    (libvirt's default path lies in its private state dir, which a lab host's
    mount namespace hides from hvext.)
    """

    socket: Path
    name: str = AGENT_PORT

    def render(self, devices: etree._Element) -> None:
        channel = _sub(devices, "channel", type="unix")
        _sub(channel, "source", mode="bind", path=str(self.socket))
        _sub(channel, "target", type="virtio", name=self.name)


@dataclass(frozen=True)
class SerialConsole:
    """A pty serial console (``virsh console`` works) whose output is logged to a file."""

    log_file: Path

    def render(self, devices: etree._Element) -> None:
        serial = _sub(devices, "serial", type="pty")
        _sub(serial, "log", file=str(self.log_file), append="off")
        _sub(serial, "target", port="0")
        console = _sub(devices, "console", type="pty")
        _sub(console, "target", type="serial", port="0")


@dataclass(frozen=True)
class Balloon:
    """virtio-balloon with guest statistics polled every *stats_period* seconds."""

    stats_period: int = 2
    free_page_reporting: bool = False

    def render(self, devices: etree._Element) -> None:
        attrs = {"model": "virtio"}
        if self.free_page_reporting:
            attrs["freePageReporting"] = "on"
        balloon = _sub(devices, "memballoon", **attrs)
        _sub(balloon, "stats", period=str(self.stats_period))


@dataclass(frozen=True)
class SpareRootPorts:
    """PCIe root ports for the devices and beyond, so that devices can be hot-plugged
    (libvirt's, or hvext's own through QMP, which picks a port that is still empty).
    libvirt puts its four PCI devices (disk, virtio-serial, balloon, RNG) on the
    first ports, so four stay free."""

    count: int = 8

    def render(self, devices: etree._Element) -> None:
        _sub(devices, "controller", type="pci", index="0", model="pcie-root")
        for _ in range(self.count):
            _sub(devices, "controller", type="pci", model="pcie-root-port")


@dataclass(frozen=True)
class RNG:
    def render(self, devices: etree._Element) -> None:
        rng = _sub(devices, "rng", model="virtio")
        _sub(rng, "backend", "/dev/urandom", model="random")


@dataclass(frozen=True)
class QMPMonitor:
    """hvext's two extra QMP monitors (events included), added on QEMU's command line.

    QEMU serves one client per monitor, so hvextd has its own (*socket*) and
    every other caller (the CLI, scripts, tests) uses the second (*cli_socket*):
    a reclaim or a power-loss save in hvextd never locks `hvext qmp` out.
    """

    socket: Path
    cli_socket: Path

    def args(self) -> list[str]:
        return [*self._monitor(QMP_CHARDEV_ID, self.socket), *self._monitor(QMP_CLI_CHARDEV_ID, self.cli_socket)]

    @staticmethod
    def _monitor(chardev: str, socket: Path) -> list[str]:
        return ["-chardev", f"socket,id={chardev},path={socket},server=on,wait=off",
                "-mon", f"chardev={chardev},mode=control"]


#: QEMU merges repeated -machine options; libvirt sets nvdimm=on only when an
#: NVDIMM exists at start, which would make NVDIMM hot plug impossible later.
NVDIMM_HOTPLUG_ARGS = ["-machine", "nvdimm=on"]


def render_commandline(parent: etree._Element, args: list[str]) -> None:
    cmdline = etree.SubElement(parent, f"{{{QEMU_NS}}}commandline")
    for arg in args:
        etree.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=arg)


@dataclass(frozen=True)
class FileMemoryBacking:
    """Guest RAM in a file on disk, shared with it (C6: the VM's own swap file).

    ``<memoryBacking><source type='file'/><access mode='shared'/>``: libvirt
    9.0 gives QEMU a ``memory-backend-file`` per NUMA cell, its file at
    ``memory_backing_dir/<id>-<name>/ram-node0`` (qemu.conf, default
    /var/lib/libvirt/qemu/ram; libvirt has no per-domain path for boot RAM),
    created sparse by QEMU (``ftruncate``) and removed by libvirt when the
    domain stops. ``shared`` makes it ``MAP_SHARED``: pages the host reclaims
    are written back to that file. A private mapping would copy every page
    the guest writes into anonymous memory, which goes to host swap instead.
    """

    def render(self, parent: etree._Element) -> None:
        backing = _sub(parent, "memoryBacking")
        _sub(backing, "source", type="file")
        _sub(backing, "access", mode="shared")


@dataclass
class DomainXML:
    """A whole hvext domain; :meth:`render` writes elements in a fixed order."""

    name: str
    memory_mib: int
    vcpus: int
    domain_type: str  # "kvm" or "qemu"
    os_boot: OSBoot
    cpu: CPU
    disk: Disk
    console: SerialConsole
    qmp: QMPMonitor
    emulator: Path | None = None
    current_memory_mib: int | None = None
    uuid: str | None = None
    memory_backing: FileMemoryBacking | None = None
    devices: list = field(default_factory=list)  # the agent channel first, as libvirt orders it

    def render(self) -> str:
        root = etree.Element("domain", {"type": self.domain_type}, nsmap={"qemu": QEMU_NS})
        _sub(root, "name", self.name)
        if self.uuid:
            _sub(root, "uuid", self.uuid)
        metadata = _sub(root, "metadata")
        marker = etree.SubElement(metadata, f"{{{HVEXT_NS}}}domain", nsmap={"hvext": HVEXT_NS})
        etree.SubElement(marker, f"{{{HVEXT_NS}}}qmp", path=str(self.qmp.socket))
        etree.SubElement(marker, f"{{{HVEXT_NS}}}qmp-cli", path=str(self.qmp.cli_socket))
        etree.SubElement(marker, f"{{{HVEXT_NS}}}agent", port=AGENT_PORT)
        # Room for memory devices (NVDIMM, virtio-pmem) to be added later, cold or hot.
        _sub(root, "maxMemory", str(self.memory_mib + MEMORY_DEVICE_ROOM_MIB), slots=str(MEMORY_DEVICE_SLOTS),
             unit="MiB")
        _sub(root, "memory", str(self.memory_mib), unit="MiB")
        _sub(root, "currentMemory", str(self.current_memory_mib or self.memory_mib), unit="MiB")
        if self.memory_backing is not None:
            self.memory_backing.render(root)
        _sub(root, "vcpu", str(self.vcpus), placement="static")
        self.os_boot.render(root)
        features = _sub(root, "features")
        _sub(features, "acpi")
        _sub(features, "apic")
        self.cpu.render(root)
        _sub(root, "clock", offset="utc")
        _sub(root, "on_poweroff", "destroy")
        _sub(root, "on_reboot", "restart")
        _sub(root, "on_crash", "destroy")
        devices = _sub(root, "devices")
        if self.emulator:
            _sub(devices, "emulator", str(self.emulator))
        self.disk.render(devices)
        _sub(devices, "controller", type="usb", model="none")
        SpareRootPorts().render(devices)
        for device in self.devices[:1]:  # the agent channel comes before the console, as libvirt orders it
            device.render(devices)
        self.console.render(devices)
        for device in self.devices[1:]:
            device.render(devices)
        render_commandline(root, self.qmp.args() + NVDIMM_HOTPLUG_ARGS)
        return etree.tostring(root, pretty_print=True, encoding="unicode")


def validate_name(name: str) -> str:
    """Refuse names libvirt or hvext's file layout would choke on."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(f"invalid domain name {name!r}: use 1-64 letters, digits, '_', '.', '+', '-'")
    return name


# -- reading live XML -----------------------------------------------------


@dataclass(frozen=True)
class DomainFacts:
    """What hvext needs from a domain's (live) XML."""

    hvext_managed: bool
    qmp_socket: Path | None  # hvextd's monitor
    qmp_cli_socket: Path | None  # everyone else's; None for domains defined before hvext had two
    agent_socket: Path | None
    has_agent_channel: bool
    console_log: Path | None
    max_memory_kib: int
    current_memory_kib: int

    def monitor_socket(self, which: str) -> Path | None:
        """The socket of hvext's monitor *which* ("daemon" or "cli"); None without hvext monitors.

        Domains defined before hvext gave them two have one: everybody shares it.
        """
        if which == "cli" and self.qmp_cli_socket is not None:
            return self.qmp_cli_socket
        return self.qmp_socket


def read_facts(xml: str) -> DomainFacts:
    """Parse a domain's XML (from ``XMLDesc``) into :class:`DomainFacts`."""
    root = etree.fromstring(xml.encode())
    marker = root.find(f"metadata/{{{HVEXT_NS}}}domain")
    qmp = marker.find(f"{{{HVEXT_NS}}}qmp") if marker is not None else None
    qmp_cli = marker.find(f"{{{HVEXT_NS}}}qmp-cli") if marker is not None else None
    agent_socket = None
    has_channel = False
    for channel in root.iterfind("devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_PORT:
            has_channel = True
            source = channel.find("source")
            if source is not None and source.get("path"):
                agent_socket = Path(source.get("path"))
    log = root.find("devices/serial/log")
    return DomainFacts(
        hvext_managed=marker is not None,
        qmp_socket=Path(qmp.get("path")) if qmp is not None and qmp.get("path") else None,
        qmp_cli_socket=Path(qmp_cli.get("path")) if qmp_cli is not None and qmp_cli.get("path") else None,
        agent_socket=agent_socket,
        has_agent_channel=has_channel,
        console_log=Path(log.get("file")) if log is not None and log.get("file") else None,
        max_memory_kib=_kib(root.find("memory")),
        current_memory_kib=_kib(root.find("currentMemory")),
    )


#: libvirt's memory units (its default is KiB); "KB", "MB", ... are powers of 1000.
_UNIT_BYTES = {"b": 1, "bytes": 1, "k": KIB, "kib": KIB, "kb": 1000, "m": MIB, "mib": MIB, "mb": 1000**2,
               "g": GIB, "gib": GIB, "gb": 1000**3, "t": TIB, "tib": TIB, "tb": 1000**4}


def libvirt_size(text: str | None, unit: str | None) -> int:
    """Bytes of a libvirt memory size (a number and a unit attribute, KiB by default); 0 when empty."""
    if not text:
        return 0
    return int(text) * _UNIT_BYTES.get((unit or "KiB").lower(), KIB)


def _kib(element: etree._Element | None) -> int:
    if element is None:
        return 0
    return libvirt_size(element.text, element.get("unit")) // KIB
