"""The guest image: a Debian root file system (ext4), the Debian kernel and initrd.

Built with mmdebstrap from Debian packages and cached under
``CACHE_DIR/images/<hash>``, where the hash covers every input (package list,
guest files, the kernel), so a changed input means a new image and an
unchanged one costs nothing. ``python -m hvext.image build`` builds it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hvext.errors import ImageError
from hvext.paths import CACHE_DIR, SOURCE_DIR

BUILDER_VERSION = "1"
SUITE = "bookworm"
PACKAGES = ["python3", "busybox", "kmod", "ndctl", "e2fsprogs", "mount", "procps", "util-linux"]
MODULES = ["virtio_pci", "virtio_blk", "virtio_console", "virtio_balloon", "virtio_net",
           "virtio_pmem", "nd_pmem", "nd_btt", "dax_pmem", "device_dax", "virtio_mem",
           "nfit", "evdev", "button", "ext4"]
IMAGE_SIZE = "2G"
ROOTFS, KERNEL, INITRD, MANIFEST = "rootfs.img", "vmlinuz", "initrd.img", "manifest.json"
#: The kernel command line the image expects (agent testing hooks stay off).
CMDLINE = "root=/dev/vda rw console=ttyS0 init=/sbin/hvext-init quiet"


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
        return self.directory / KERNEL

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
    for name in ("__init__.py", "errors.py"):
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
    digest.update(json.dumps([base_hash(kernel_version), IMAGE_SIZE]).encode())
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
        return GuestImage(directory, kernel_version)
    return None


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


def build(*, force: bool = False) -> GuestImage:
    """Build the image for the current inputs unless it is cached."""
    kernel_version = host_kernel_version()
    final = CACHE_DIR / "images" / input_hash(kernel_version)
    if (final / MANIFEST).is_file() and not force:
        print(f"guest image up to date: {final}")
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
        _run(["mke2fs", "-q", "-t", "ext4", "-L", "hvext-root", "-d", str(root), str(work / ROOTFS), IMAGE_SIZE])
        shutil.copy2(f"/boot/vmlinuz-{kernel_version}", work / KERNEL)
        shutil.copy2(f"/boot/initrd.img-{kernel_version}", work / INITRD)
        shutil.rmtree(root)
        manifest = {"hash": final.name, "base": base.name, "kernel_version": kernel_version,
                    "packages": PACKAGES, "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "build_seconds": round(time.monotonic() - started, 1)}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in work.iterdir():
            path.chmod(0o644)
        work.chmod(0o755)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _publish(work, final)
    prune(keep=final)
    print(f"guest image built in {time.monotonic() - started:.1f} s: {final}")
    return GuestImage(final, kernel_version)


def prune(*, keep: Path, max_images: int = 3) -> None:
    """Drop the oldest cached images beyond *max_images* (never *keep*)."""
    images = sorted((p for p in (CACHE_DIR / "images").iterdir() if (p / MANIFEST).is_file() and p != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in images[max_images - 1:]:
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
