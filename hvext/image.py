"""The guest image: a Debian root file system (ext4), the Debian kernel and hvext's initramfs.

Built with mmdebstrap from Debian packages and cached under
``CACHE_DIR/images/<hash>``, where the hash covers every input (package list,
guest files, the kernel, the initramfs's modules), so a changed input means a
new image and an unchanged one costs nothing. ``python -m hvext.image build``
builds it.

The kernel is Debian's, unpacked from its bzImage into the ELF ``vmlinux``
it carries (:func:`pvh_kernel`): QEMU starts that directly at its PVH entry,
where the bzImage would first spend seconds under TCG in its own xz
decompressor (the kernel is the same; only the wrapper is skipped, and with it
KASLR). A kernel without a PVH entry is booted as the bzImage.

The initramfs is hvext's own, not Debian's (30 MB, every module, udev): busybox
and the handful of modules the root disk, the agent's channel, the random pool
and the power button need (:data:`INITRAMFS_MODULES`), assembled into a gzip'd cpio by
:func:`build_initramfs`. Its ``/init`` (guest-agent/image/initramfs-init)
mounts the root disk and switches to hvext-init, which starts the agent
before loading anything else. It boots a 256 MiB guest, which Debian's
initrd cannot (the kernel runs out of memory unpacking it).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hvext.errors import ImageError
from hvext.paths import CACHE_DIR, SOURCE_DIR, STATE_DIR

BUILDER_VERSION = "1"
SUITE = "bookworm"
PACKAGES = ["python3", "busybox", "kmod", "ndctl", "e2fsprogs", "mount", "procps", "util-linux"]
MODULES = ["virtio_pci", "virtio_blk", "virtio_console", "virtio_balloon", "virtio_net",
           "virtio_pmem", "nd_pmem", "nd_btt", "dax_pmem", "device_dax", "virtio_mem",
           "nfit", "evdev", "button", "ext4"]
#: What the initramfs loads (with their dependencies, in order): the root disk,
#: its file system, the agent's virtio-serial port, virtio-rng, which seeds the
#: kernel's random pool at once (without it every Python start waits about 1.5 s
#: under TCG for the pool, reading /dev/urandom for its hash seed), the power
#: button (hvext-init watches it before the agent answers) and the balloon (its
#: statistics are there when the agent is: hvext's reclaim reads both). Everything
#: else (virtio-mem, virtio-net, PMEM drivers, ...) hvext-init loads from the root
#: file system after the agent started.
INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "ext4", "virtio_console", "virtio_rng", "evdev", "button",
                     "virtio_balloon"]
#: busybox applets the initramfs's /init calls (linked to /bin/busybox).
INITRAMFS_APPLETS = ["sh", "mount", "modprobe", "usleep", "cat", "switch_root"]
#: Bumped when the boot path (kernel unpacking, initramfs layout) changes in a way its inputs do not show.
BOOT_VERSION = "2"
IMAGE_SIZE = "2G"
ROOTFS, KERNEL, INITRD, MANIFEST = "rootfs.img", "vmlinux", "initrd.img", "manifest.json"
#: The kernel command line the image expects (agent testing hooks stay off).
#: cryptomgr.notests skips the crypto self-tests (about 0.4 s of every boot under TCG).
#: Hot-plugged memory (virtio-mem NVM RAM, docs/memory.md) comes online by itself (Debian's kernel leaves it
#: offline and the image has no udev rule), in ZONE_MOVABLE as far as the kernel's auto-movable ratio allows,
#: so that it can be unplugged again.
GUEST_MEMORY_HOTPLUG = "memhp_default_state=online memory_hotplug.online_policy=auto-movable"
CMDLINE = f"root=/dev/vda rw console=ttyS0 init=/sbin/hvext-init quiet cryptomgr.notests {GUEST_MEMORY_HOTPLUG}"
INITRAMFS_INIT = "guest-agent/image/initramfs-init"
#: Touched whenever :func:`find_image` or :func:`build` hands out an image (what :func:`prune` goes by).
USED_STAMP = "last-used"
#: An image handed out this recently is never pruned: a test session or a `define` may be about to use it.
IN_USE_SECONDS = 6 * 3600


@dataclass(frozen=True)
class GuestImage:
    """A built image: its files and the kernel command line to boot it with."""

    directory: Path
    kernel_version: str

    @property
    def rootfs(self) -> Path:
        return self.directory / ROOTFS

    @property
    def kernel(self) -> Path:
        legacy = self.directory / "vmlinuz"  # images built before the PVH kernel (pinned by HVEXT_IMAGE)
        return legacy if not (self.directory / KERNEL).exists() and legacy.exists() else self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD


def host_kernel_version() -> str:
    """The newest Debian kernel installed on the host (package linux-image-amd64)."""
    versions = sorted(
        (p.name.removeprefix("vmlinuz-") for p in Path("/boot").glob("vmlinuz-*")),
        key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)],
    )
    if not versions:
        raise ImageError("no kernel in /boot: install linux-image-amd64 (make setup does)")
    return versions[-1]


def _guest_files() -> list[tuple[Path, str]]:
    """(source file, path inside the image) for every file hvext puts in the guest."""
    files = [(SOURCE_DIR / "guest-agent/image/hvext-init", "sbin/hvext-init")]
    for src in sorted((SOURCE_DIR / "guest-agent/hvext_agent").glob("*.py")):
        files.append((src, f"opt/hvext/hvext_agent/{src.name}"))
    pkg = SOURCE_DIR / "hvext"
    for name in ("__init__.py", "errors.py", "durable.py"):  # what hvext.rvm imports
        files.append((pkg / name, f"opt/hvext/hvext/{name}"))
    for src in sorted((pkg / "rvm").rglob("*.py")):
        files.append((src, f"opt/hvext/hvext/rvm/{src.relative_to(pkg / 'rvm')}"))
    return files


def base_hash(kernel_version: str) -> str:
    """Hash of the Debian part of the image (packages and kernel modules)."""
    return hashlib.sha256(json.dumps([BUILDER_VERSION, SUITE, PACKAGES, MODULES, kernel_version]).encode()
                          ).hexdigest()[:16]


def input_hash(kernel_version: str | None = None) -> str:
    """Hash of everything the image is built from (the base plus hvext's own files)."""
    kernel_version = kernel_version or host_kernel_version()
    digest = hashlib.sha256()
    digest.update(json.dumps([base_hash(kernel_version), IMAGE_SIZE, BOOT_VERSION, INITRAMFS_MODULES,
                              INITRAMFS_APPLETS]).encode())
    digest.update((SOURCE_DIR / INITRAMFS_INIT).read_bytes() + b"\0")
    for src, dest in _guest_files():
        digest.update(dest.encode() + b"\0" + src.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def find_image() -> GuestImage | None:
    """The cached image for the current inputs, or None when it is not built.

    ``HVEXT_IMAGE=DIR`` pins an image directory (one with a manifest) instead.
    """
    pinned = os.environ.get("HVEXT_IMAGE")
    if pinned:
        try:
            manifest = json.loads((Path(pinned) / MANIFEST).read_text())
        except (OSError, ValueError) as err:
            raise ImageError(f"HVEXT_IMAGE={pinned} is not a built guest image ({err})") from err
        return GuestImage(Path(pinned), manifest["kernel_version"])
    kernel_version = host_kernel_version()
    directory = CACHE_DIR / "images" / input_hash(kernel_version)
    if (directory / MANIFEST).is_file():
        _mark_used(directory)
        return GuestImage(directory, kernel_version)
    return None


def _mark_used(directory: Path) -> None:
    """Stamp *directory* as used now (best effort: a user who cannot write the cache only reads it)."""
    try:
        (directory / USED_STAMP).touch()
    except OSError:
        pass


def _last_used(directory: Path) -> float:
    for path in (directory / USED_STAMP, directory):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0


def backing_file_of(path: Path) -> Path | None:
    """The backing file a qcow2 image names in its header (absolute; relative names are relative to
    the image's directory), or None for anything else. Reads the header only: offset 8 holds the
    name's offset (u64, big-endian), offset 16 its length (u32)."""
    try:
        with open(path, "rb") as f:
            header = f.read(20)
            if len(header) < 20 or header[:4] != b"QFI\xfb":
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not 0 < size <= 4096:
                return None
            f.seek(offset)
            name = f.read(size)
    except OSError:
        return None
    if len(name) != size:
        return None
    return Path(os.path.normpath(path.parent / os.fsdecode(name)))


def _images_in_use() -> set[Path]:
    """Image directories whose rootfs a domain's qcow2 overlay under STATE_DIR has as backing file."""
    used = set()
    for overlay in (STATE_DIR / "domains").glob("*/*.qcow2"):
        backing = backing_file_of(overlay)
        if backing is not None:
            used.add(backing.parent)
    return used


def require_image() -> GuestImage:
    image = find_image()
    if image is None:
        raise ImageError("the guest image is not built: run `make image` (or `python -m hvext.image build`)")
    return image


def _run(args: list[str], **kwargs) -> None:
    print("+ " + " ".join(args), flush=True)
    try:
        subprocess.run(args, check=True, **kwargs)
    except (OSError, subprocess.CalledProcessError) as err:
        raise ImageError(f"image build step failed: {' '.join(args[:2])}: {err}") from err


def _module_files(kernel_version: str) -> set[Path]:
    """Module files for MODULES and their dependencies, from the host's modules.dep."""
    files: set[Path] = set()
    for module in MODULES:
        out = subprocess.run(["modprobe", "-S", kernel_version, "--show-depends", module],
                             capture_output=True, text=True)
        for line in out.stdout.splitlines():
            parts = line.split()
            if parts and parts[0] == "insmod":
                files.add(Path(parts[1]))
    if not files:
        raise ImageError(f"no kernel modules found for {kernel_version}")
    return files


def _publish(work: Path, final: Path) -> None:
    """Move a finished build into place (a half-built one never has the final name)."""
    if final.exists():
        shutil.rmtree(final)
    os.rename(work, final)


def build_base(kernel_version: str) -> Path:
    """The Debian root file system with the kernel's modules, cached as a directory.

    Changing hvext's guest files does not rebuild it; only packages or kernel do.
    """
    final = CACHE_DIR / "base" / base_hash(kernel_version)
    if (final / ".complete").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=final.parent))
    try:
        root = work / "root"
        _run(["mmdebstrap", "--mode=root", "--variant=essential", "--include=" + ",".join(PACKAGES),
              "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
              "--dpkgopt=path-exclude=/usr/share/locale/*", "--dpkgopt=path-exclude=/usr/share/info/*",
              SUITE, str(root)])
        for module in _module_files(kernel_version):
            dest = root / module.relative_to("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(module, dest)
        moddir = Path("/lib/modules") / kernel_version
        for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
            if (moddir / name).exists():
                shutil.copy2(moddir / name, root / "lib/modules" / kernel_version / name)
        _run(["depmod", "-b", str(root), kernel_version])
        (root / "etc/hostname").write_text("hvext-guest\n")
        (root / "etc/fstab").write_text("/dev/vda / ext4 rw 0 1\n")
        for cache in ("var/cache/apt", "var/lib/apt/lists"):
            shutil.rmtree(root / cache, ignore_errors=True)
        (work / ".complete").write_text("")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _publish(work, final)
    return final


# -- the kernel --------------------------------------------------------------

_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_ELF_PHDR = struct.Struct("<IIQQQQQQ")
_ELF_DYN = struct.Struct("<qQ")
_ELF_NOTE = struct.Struct("<III")
_PT_LOAD, _PT_DYNAMIC, _PT_INTERP, _PT_NOTE = 1, 2, 3, 4
_DT_NEEDED, _DT_STRTAB = 1, 5
XEN_ELFNOTE_PHYS32_ENTRY = 18


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit ELF kernel carries the PVH entry note QEMU needs to boot it directly."""
    header = _ELF_HEADER.unpack_from(elf)
    phoff, phentsize, phnum = header[5], header[9], header[10]
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz, _, _ = _ELF_PHDR.unpack_from(elf, phoff + i * phentsize)
        if p_type != _PT_NOTE:
            continue
        offset, end = p_offset, p_offset + p_filesz
        while offset + _ELF_NOTE.size <= end:
            namesz, descsz, note_type = _ELF_NOTE.unpack_from(elf, offset)
            name = elf[offset + 12:offset + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            offset += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def pvh_kernel(bzimage: bytes) -> bytes | None:
    """The ELF vmlinux inside an xz-compressed bzImage when it has a PVH entry, else None.

    The boot protocol's setup header (2.08+) says where the payload lies
    (payload_offset and payload_length, from the start of the protected-mode
    code); it is an xz stream followed by the 4-byte decompressed size.
    """
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS" or struct.unpack_from("<H", bzimage, 0x206)[0] < 0x208:
        return None
    start = ((bzimage[0x1F1] or 4) + 1) * 512
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    payload = bzimage[start + offset:start + offset + length]
    if not payload.startswith(b"\xfd7zXZ\x00"):
        return None  # gzip, zstd, ...: Debian's amd64 kernels are xz
    decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        elf = decompressor.decompress(payload)
        return elf if decompressor.eof and elf.startswith(b"\x7fELF") and has_pvh_entry(elf) else None
    except (lzma.LZMAError, struct.error):
        return None


# -- the initramfs ----------------------------------------------------------


def elf_dependencies(data: bytes) -> tuple[str | None, list[str]]:
    """(program interpreter, DT_NEEDED sonames) of a 64-bit little-endian ELF file."""
    if len(data) < _ELF_HEADER.size or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ImageError("not a 64-bit little-endian ELF file")
    header = _ELF_HEADER.unpack_from(data)
    phoff, phentsize, phnum = header[5], header[9], header[10]
    interp, dynamic, loads = None, None, []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = _ELF_PHDR.unpack_from(data, phoff + i * phentsize)
        if p_type == _PT_INTERP:
            interp = data[p_offset:p_offset + p_filesz].rstrip(b"\0").decode()
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
        elif p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
    if dynamic is None:
        return interp, []
    entries = [_ELF_DYN.unpack_from(data, dynamic[0] + off) for off in range(0, dynamic[1], _ELF_DYN.size)]
    strtab_addr = next((value for tag, value in entries if tag == _DT_STRTAB), None)
    strtab = next((off + strtab_addr - vaddr for vaddr, off, size in loads
                   if strtab_addr is not None and vaddr <= strtab_addr < vaddr + size), None)
    if strtab is None:
        raise ImageError("ELF file has a dynamic section but no string table")
    needed = [data[strtab + value:data.index(b"\0", strtab + value)].decode()
              for tag, value in entries if tag == _DT_NEEDED]
    return interp, needed


def _library(root: Path, soname: str) -> Path:
    for directory in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu", "usr/lib", "lib"):
        if (root / directory / soname).exists():
            return Path("/") / directory / soname
    raise ImageError(f"library {soname} not found in the guest root file system")


def resolve_in(root: Path, path: str) -> Path:
    """*path* inside the tree *root* with every symlink resolved as if *root* were "/" (like chroot)."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            resolved = resolved[:-1]
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise ImageError(f"too many symlinks resolving {path} in the guest root file system")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def initramfs_modules(kernel_version: str, modules_root: Path = Path("/")) -> list[str]:
    """Module files (relative to /lib/modules/<kernel>) for INITRAMFS_MODULES, dependencies first.

    From the host's module tree, like the base image's modules (the image boots
    the host's /boot/vmlinuz-<kernel>, so these are that kernel's).
    """
    ordered: list[str] = []
    moddir = modules_root / "lib/modules" / kernel_version
    for module in INITRAMFS_MODULES:
        out = subprocess.run(["modprobe", "-d", str(modules_root), "-S", kernel_version, "--show-depends", module],
                             capture_output=True, text=True)
        lines = [line.split() for line in out.stdout.splitlines()]
        # modprobe -d / writes "//lib/...", which pathlib would keep as a distinct root
        files = [Path("/" + parts[1].lstrip("/")) for parts in lines if len(parts) >= 2 and parts[0] == "insmod"]
        if out.returncode != 0 or not files:
            raise ImageError(f"kernel module {module} not found for {kernel_version} "
                             f"({out.stderr.strip() or 'modprobe listed no module file'})")
        for path in files:
            if not path.is_relative_to(moddir):
                raise ImageError(f"module file {path} lies outside {moddir}")
            relative = str(path.relative_to(moddir))
            if relative not in ordered:
                ordered.append(relative)
    return ordered


class Cpio:
    """A cpio archive in the kernel's "newc" format, deterministic (owner root, mtime 0)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.names: set[str] = set()
        self._ino = 0

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self.names:
            raise ImageError(f"initramfs: {name} added twice")
        self.names.add(name)
        self._ino += 1
        fields = [self._ino, mode, 0, 0, 2 if mode & 0o170000 == 0o040000 else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % value for value in fields) + name.encode() + b"\0"
        self.chunks.append(header + b"\0" * (-len(header) % 4))
        self.chunks.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            if "/".join(parts[:i]) not in self.names:
                self._add("/".join(parts[:i]), 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        parent = Path(name.strip("/")).parent
        if parent != Path("."):
            self.directory(str(parent))
        self._add(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(name, 0o120777, target.encode())

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._add(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return b"".join(self.chunks)


def build_initramfs(root: Path, kernel_version: str, modules_root: Path = Path("/")) -> bytes:
    """hvext's initramfs (gzip'd cpio): busybox and the libraries it links from the guest
    root file system *root*, the kernel's modules for INITRAMFS_MODULES (from
    *modules_root*), their load order in /etc/hvext-modules, and
    guest-agent/image/initramfs-init as /init.
    """
    archive = Cpio()
    for directory in ("dev", "proc", "sys", "root", "run", "tmp", "etc", "bin"):
        archive.directory(directory)
    archive.char_device("dev/console", 5, 1)
    busybox = (root / "usr/bin/busybox").read_bytes()
    archive.file("bin/busybox", busybox, 0o755)
    for applet in INITRAMFS_APPLETS:
        archive.symlink(f"bin/{applet}", "busybox")
    interp, needed = elf_dependencies(busybox)
    libraries = [_library(root, soname) for soname in needed] + ([Path(interp)] if interp else [])
    for library in libraries:
        real = resolve_in(root, str(library))
        # the guest's /lib and /lib64 are links into /usr; the initramfs keeps the paths the loader asks for
        archive.file(str(library), real.read_bytes(), 0o755)
    moddir = f"lib/modules/{kernel_version}"
    modules = initramfs_modules(kernel_version, modules_root)
    for module in modules:
        archive.file(f"{moddir}/{module}", (modules_root / moddir / module).read_bytes())
    # One busybox modprobe loads them all (one process: each exec costs tens of ms under TCG).
    # It finds files by name in modules.dep; the names come in dependency order, so no
    # line needs to list its dependencies (busybox ignores softdeps like ext4's crc32c).
    archive.file(f"{moddir}/modules.dep", "".join(f"{m}:\n" for m in modules).encode())
    names = [Path(m).name.removesuffix(".ko").replace("-", "_") for m in modules]
    archive.file("etc/hvext-modules", " ".join(names).encode() + b"\n")
    archive.file("init", (SOURCE_DIR / INITRAMFS_INIT).read_bytes(), 0o755)
    return gzip.compress(archive.finish(), compresslevel=9, mtime=0)


def build(*, force: bool = False) -> GuestImage:
    """Build the image for the current inputs unless it is cached."""
    kernel_version = host_kernel_version()
    final = CACHE_DIR / "images" / input_hash(kernel_version)
    if (final / MANIFEST).is_file() and not force:
        print(f"guest image up to date: {final}")
        _mark_used(final)
        return GuestImage(final, kernel_version)
    started = time.monotonic()
    base = build_base(kernel_version)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=final.parent))
    try:
        root = work / "root"
        _run(["cp", "-a", "--reflink=auto", str(base / "root"), str(root)])
        for src, dest in _guest_files():
            target = root / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
        # byte-compiled once here, not by every guest at every boot (each boots a fresh overlay)
        _run(["chroot", str(root), "/usr/bin/python3", "-m", "compileall", "-q", "/opt/hvext"])
        # inode tables zeroed now: otherwise every guest's ext4lazyinit zeroes them at boot, into its overlay
        _run(["mke2fs", "-q", "-t", "ext4", "-L", "hvext-root", "-E", "lazy_itable_init=0,lazy_journal_init=0",
              "-d", str(root), str(work / ROOTFS), IMAGE_SIZE])
        bzimage = Path(f"/boot/vmlinuz-{kernel_version}").read_bytes()
        vmlinux = pvh_kernel(bzimage)
        (work / KERNEL).write_bytes(vmlinux or bzimage)
        (work / INITRD).write_bytes(build_initramfs(root, kernel_version))
        shutil.rmtree(root)
        manifest = {"hash": final.name, "base": base.name, "kernel_version": kernel_version,
                    "packages": PACKAGES, "kernel_entry": "PVH" if vmlinux else "bzImage",
                    "initramfs_modules": INITRAMFS_MODULES, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.monotonic() - started, 1)}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in work.iterdir():
            path.chmod(0o644)
        work.chmod(0o755)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _publish(work, final)
    _mark_used(final)
    prune(keep=final)
    print(f"guest image built in {time.monotonic() - started:.1f} s: {final}")
    return GuestImage(final, kernel_version)


def prune(*, keep: Path, max_images: int = 3) -> None:
    """Drop the least recently used cached images beyond *max_images* (never *keep*).

    Never one a domain's disk overlay still has as backing file, nor one handed out within
    :data:`IN_USE_SECONDS` (other worktrees' test sessions build and use other images at once)."""
    images = sorted((p for p in (CACHE_DIR / "images").iterdir() if (p / MANIFEST).is_file() and p != keep),
                    key=_last_used, reverse=True)
    in_use = {p.resolve() for p in _images_in_use()}
    now = time.time()
    for old in images[max_images - 1:]:
        if old.resolve() in in_use or now - _last_used(old) < IN_USE_SECONDS:
            continue
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hvext.image", description=__doc__)
    parser.add_argument("action", choices=["build", "path", "hash"])
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = parser.parse_args(argv)
    try:
        if args.action == "build":
            build(force=args.force)
        elif args.action == "hash":
            print(input_hash())
        else:
            print(require_image().directory)
    except ImageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
