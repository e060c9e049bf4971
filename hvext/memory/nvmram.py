"""NVM as volatile RAM (C8): a virtio-mem device whose memory lives in a file on the NVM tier.

libvirt 9.0 manages virtio-mem (size, requested size, the guest's current
size) but backs it with anonymous RAM: it ignores ``<source><path>`` for
virtio-mem (only NVDIMM and virtio-pmem take a path). So the device stays
libvirt's, with a fixed user alias, and hvext swaps its backend:

* ``<qemu:commandline>`` adds ``-object memory-backend-file`` (``share``: the
  guest's pages live in the file, and an unplug punches them out of it);
* ``<qemu:override>`` points the device's ``memdev`` at that object (the
  backend libvirt creates stays unused: ``reserve=false``, never touched).

Resizing is libvirt's (``virDomainUpdateDeviceFlags`` with the live device
XML and a new ``<requested>``, what ``virsh update-memory-device`` does);
libvirt's live XML reports ``<current>``, the size the guest has plugged.
The device goes into the persistent definition and is there from the next
start; the guest must online hot-plugged memory (docs/memory.md).

The NVM tier is a directory (``hvext nvm-ram --nvm-dir``, ``[nvm] dir`` in
hvextd's config): each domain's file is ``NVM_DIR/<domain>/nvmram.img``, in a
0750 directory of QEMU's group, the file 0600 and QEMU's (it holds guest memory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from hvext import paths
from hvext.domxml import QEMU_NS, commandline_object, libvirt_size
from hvext.errors import HostError, UsageError
from hvext.host import Domain
from hvext.pmem import devices
from hvext.units import GIB, KIB, MIB, format_size

ALIAS = "ua-hvext-nvmram0"  # a user alias ("ua-"): libvirt keeps it, so the override can name the device
BACKEND_ID = "hvext-nvmram0"
BLOCK_SIZE = 2 * MIB  # virtio-mem's block: the transparent huge page size, QEMU's default on x86
MAX_SIZE = 64 * GIB
BACKING_NAME = "nvmram.img"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NvmRam:
    """A domain's NVM-backed virtio-mem device, as libvirt and hvext's definition describe it."""

    path: Path | None  # the backing file (None: the device exists but not hvext's backend)
    size: int  # bytes the device can plug at most
    block_size: int
    requested: int  # bytes asked of the guest
    current: int | None  # bytes the guest has plugged (live XML only; None when off)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path) if self.path else None, "size": self.size, "block_size": self.block_size,
                "requested": self.requested, "current": self.current}


def check_size(size: int, what: str = "size", maximum: int = MAX_SIZE) -> int:
    """*size* if it is a multiple of the block size from 0 to *maximum*, else UsageError."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 0 or size % BLOCK_SIZE or size > maximum:
        raise UsageError(f"NVM RAM {what} {format_size(size) if isinstance(size, int) else size!r} must be a "
                         f"multiple of {BLOCK_SIZE // MIB} MiB from 0 to {format_size(maximum)}")
    return size


def device_xml(size: int, requested: int = 0, node: int = 0) -> str:
    """The libvirt ``<memory model='virtio-mem'>`` element with hvext's user alias."""
    memory = etree.Element("memory", model="virtio-mem")
    target = etree.SubElement(memory, "target")
    etree.SubElement(target, "size", unit="KiB").text = str(size // KIB)
    etree.SubElement(target, "node").text = str(node)
    etree.SubElement(target, "block", unit="KiB").text = str(BLOCK_SIZE // KIB)
    etree.SubElement(target, "requested", unit="KiB").text = str(requested // KIB)
    etree.SubElement(memory, "alias", name=ALIAS)
    return etree.tostring(memory, encoding="unicode")


def backend_arg(path: Path, size: int) -> str:
    """The ``-object`` value (QEMU's JSON syntax, as libvirt writes its own) of the file backend."""
    return json.dumps({"qom-type": "memory-backend-file", "id": BACKEND_ID, "mem-path": str(path), "size": size,
                       "share": True}, separators=(",", ":"))


def add_to_definition(xml: str, path: Path, size: int) -> str:
    """The domain definition *xml* with the device, its file backend and the override (pure).

    UsageError when the definition has hvext's device already.
    """
    root = etree.fromstring(xml.encode())
    if _device(root) is not None or _override(root) is not None:
        raise UsageError("the domain has an NVM RAM device already (`hvext nvm-ram DOMAIN` shows it)")
    devices_el = root.find("devices")
    if devices_el is None:
        raise HostError("the domain definition has no <devices>")
    devices_el.append(etree.fromstring(device_xml(size).encode()))
    total = root.find("memory")  # libvirt's <memory> counts the boot memory plus every memory device
    if total is None:
        raise HostError("the domain definition has no <memory>")
    total.text = str(libvirt_size(total.text, total.get("unit")) // KIB + size // KIB)
    total.set("unit", "KiB")
    commandline = root.find(f"{{{QEMU_NS}}}commandline")
    if commandline is None:
        commandline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
    etree.SubElement(commandline, f"{{{QEMU_NS}}}arg", value="-object")
    etree.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=backend_arg(path, size))
    override = etree.Element(f"{{{QEMU_NS}}}override")
    commandline.addnext(override)  # libvirt's order: commandline, capabilities, override
    device = etree.SubElement(override, f"{{{QEMU_NS}}}device", alias=ALIAS)
    frontend = etree.SubElement(device, f"{{{QEMU_NS}}}frontend")
    etree.SubElement(frontend, f"{{{QEMU_NS}}}property", name="memdev", type="string", value=BACKEND_ID)
    return etree.tostring(root, encoding="unicode")


def _device(root: etree._Element) -> etree._Element | None:
    for memory in root.iterfind("devices/memory"):
        alias = memory.find("alias")
        if memory.get("model") == "virtio-mem" and alias is not None and alias.get("name") == ALIAS:
            return memory
    return None


def _override(root: etree._Element) -> etree._Element | None:
    return root.find(f"{{{QEMU_NS}}}override/{{{QEMU_NS}}}device[@alias='{ALIAS}']")


def _backend_path(root: etree._Element) -> Path | None:
    """The mem-path of hvext's backend object on the definition's command line (None: not there)."""
    backend = commandline_object(root, BACKEND_ID)
    if backend is not None and isinstance(backend.get("mem-path"), str):
        return Path(str(backend["mem-path"]))
    return None


def _size(target: etree._Element, tag: str) -> int | None:
    element = target.find(tag)
    if element is None:
        return None
    try:
        value = libvirt_size((element.text or "").strip(), element.get("unit"))
    except ValueError as err:
        raise HostError(f"NVM RAM device: <{tag}> is not a size: {element.text!r:.40}") from err
    if value < 0 or value > MAX_SIZE * 4:
        raise HostError(f"NVM RAM device: <{tag}> {value} is out of range")
    return value


def parse(xml: str) -> NvmRam | None:
    """hvext's NVM RAM device in a domain's XML (live or persistent); None when it has none.

    ``<current>`` comes from QEMU, which takes it from the guest: checked to
    lie within the device (HostError otherwise).
    """
    root = etree.fromstring(xml.encode())
    memory = _device(root)
    if memory is None:
        return None
    target = memory.find("target")
    if target is None:
        raise HostError("NVM RAM device without <target>")
    size = _size(target, "size") or 0
    current = _size(target, "current")
    if current is not None and current > size:
        raise HostError(f"NVM RAM device reports {current} bytes plugged, more than its size {size}")
    return NvmRam(path=_backend_path(root) if _override(root) is not None else None, size=size,
                  block_size=_size(target, "block") or BLOCK_SIZE, requested=_size(target, "requested") or 0,
                  current=current)


def backing_file(nvm_dir: Path, domain_name: str) -> Path:
    """Where a domain's NVM RAM lives on the tier."""
    return Path(os.path.abspath(nvm_dir)) / domain_name / BACKING_NAME


def attach(domain: Domain, nvm_dir: Path, size: int) -> NvmRam:
    """Add an NVM RAM device of at most *size* bytes (none plugged) to the persistent definition.

    It is in the guest from the next start. The backing file is created
    sparse in the domain's directory on the tier; a failure removes what
    was created.
    """
    check_size(size)
    if size == 0:
        raise UsageError("NVM RAM size must be positive")
    if not domain.is_persistent():
        raise UsageError(f"domain {domain.name!r} is transient: NVM RAM goes into a persistent definition")
    nvm_dir = Path(os.path.abspath(nvm_dir))
    try:
        st = os.stat(nvm_dir)
    except OSError as err:
        raise UsageError(f"NVM tier {nvm_dir}: {err.strerror}") from err
    uid, gid = domain.host.qemu_user()
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"NVM tier {nvm_dir} is not a directory")
    if uid and not (st.st_mode & 0o001 or (st.st_mode & 0o010 and st.st_gid == gid)):
        raise UsageError(f"NVM tier {nvm_dir} (mode {stat.S_IMODE(st.st_mode):04o}) cannot be entered by QEMU's "
                         f"user (uid {uid}): make it searchable, e.g. chmod 0711")
    xml = domain.xml(inactive=True)
    path = backing_file(nvm_dir, domain.name)
    new_xml = add_to_definition(xml, path, size)  # refuses a second device before anything is created
    paths.private_dir(path.parent, mode=0o750, gid=gid)
    created = devices.prepare_backing(path, size, owner=(uid, gid), allowed_uids=(uid,))
    try:
        domain.redefine(new_xml)
    except BaseException:
        if created:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only when empty
        raise
    device = parse(domain.xml(inactive=True))
    if device is None:
        raise HostError(f"libvirt dropped the NVM RAM device of {domain.name!r} from its definition")
    return device


def status(domain: Domain) -> NvmRam:
    """The device of the running domain (live XML), or of its definition when it is off."""
    device = parse(domain.xml())
    if device is None:
        raise UsageError(f"domain {domain.name!r} has no NVM RAM device (add one with "
                         "`hvext nvm-ram DOMAIN --attach SIZE --nvm-dir DIR`)")
    return device


def resize(domain: Domain, requested: int) -> NvmRam:
    """Ask the running guest to plug *requested* bytes of NVM RAM (libvirt's update of the live device).

    Returns the device as libvirt shows it right after: ``current`` follows
    when the guest has (un)plugged the memory, which takes a moment.
    """
    if not domain.is_active():
        raise UsageError(f"domain {domain.name!r} is not running: NVM RAM is resized in a running guest")
    xml = domain.xml()
    device = parse(xml)
    memory = _device(etree.fromstring(xml.encode()))
    if device is None or memory is None:
        raise UsageError(f"domain {domain.name!r} has no NVM RAM device in the running guest "
                         "(a device added to the definition appears at the next start)")
    check_size(requested, "requested size", device.size)
    target = memory.find("target")
    assert target is not None  # parse() checked it
    for element in target.findall("current"):  # the guest's figure, not something to update
        target.remove(element)
    requested_el = target.find("requested")
    if requested_el is None:
        requested_el = etree.SubElement(target, "requested")
    requested_el.text = str(requested // KIB)
    requested_el.set("unit", "KiB")
    domain.update_device(etree.tostring(memory, encoding="unicode"), config=False, live=True)
    device = parse(domain.xml())
    assert device is not None
    return device


def wait_settled(domain: Domain, timeout: float) -> NvmRam:
    """The device once the guest has plugged what was requested (``current == requested``), polled.

    After *timeout* seconds, the device as it is (the caller compares): a
    guest may take long, refuse, or unplug only part (memory it cannot move).
    """
    deadline = time.monotonic() + timeout
    while True:
        device = status(domain)
        if device.current == device.requested or time.monotonic() >= deadline:
            return device
        time.sleep(0.5)


def remove_backing(domain_name: str, definition: str) -> None:
    """Remove the NVM RAM file (and its directory) of an undefined domain: it holds the guest's last RAM
    contents (QEMU punches it only at the next start) and the tier's space.

    Only hvext's layout (``NVM_DIR/<domain>/nvmram.img``) is removed, never
    through a link; what cannot be removed is logged.
    """
    try:
        device = parse(definition)
    except (HostError, etree.XMLSyntaxError):
        return
    path = device.path if device else None
    if path is None or path.name != BACKING_NAME or path.parent.name != domain_name:
        return
    try:
        if os.path.lexists(path) and not stat.S_ISREG(os.lstat(path).st_mode):
            raise OSError(f"{path} is not a regular file")
        path.unlink(missing_ok=True)
        if not path.parent.is_symlink() and path.parent.is_dir():
            path.parent.rmdir()
    except OSError as err:
        log.warning("%s: undefined, but its NVM RAM file %s was not removed: %s", domain_name, path, err)


def tier_free(nvm_dir: Path) -> int:
    """Bytes free on the NVM tier's file system (for an unprivileged user; root's reserve excluded)."""
    try:
        st = os.statvfs(nvm_dir)
    except OSError as err:
        raise UsageError(f"NVM tier {nvm_dir}: {err.strerror}") from err
    return st.f_bavail * st.f_frsize


__all__ = ["NvmRam", "add_to_definition", "attach", "device_xml", "parse", "remove_backing", "resize",
           "status", "tier_free", "wait_settled"]
