"""The guest image's boot path: the PVH kernel, the initramfs archive and what goes into it, the hash."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvext import image
from hvext.errors import ImageError
from tests.support import require

KERNEL_VERSION = image.host_kernel_version() if list(Path("/boot").glob("vmlinuz-*")) else None
needs_kernel = pytest.mark.requires(KERNEL_VERSION is not None,
                                   "no Debian kernel in /boot (make setup installs linux-image-amd64)")


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev) of a newc cpio archive (a reader independent of the writer)."""
    entries = {}
    offset = 0
    while True:
        assert data[offset:offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i:offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name = data[offset + 110:offset + 110 + namesize - 1].decode()
        offset += 110 + namesize
        offset += -offset % 4
        body = data[offset:offset + size]
        offset += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, body, rdev)


def test_cpio_archive_is_newc_with_parents_links_and_devices(tmp_path: Path) -> None:
    archive = image.Cpio()
    archive.directory("dev")
    archive.char_device("dev/console", 5, 1)
    archive.file("a/b/c.txt", b"hello")
    archive.symlink("a/link", "b/c.txt")
    data = archive.finish()
    entries = read_newc(data)
    assert entries["a"][0] == entries["a/b"][0] == 0o040755
    assert entries["a/b/c.txt"] == (0o100644, b"hello", (0, 0))
    assert entries["a/link"] == (0o120777, b"b/c.txt", (0, 0))
    assert entries["dev/console"] == (0o020600, b"", (5, 1))
    with pytest.raises(ImageError, match="added twice"):
        archive.file("a/b/c.txt", b"again")
    if shutil.which("cpio"):  # the real tool agrees
        listing = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True).stdout
        assert set(listing.decode().split()) == set(entries)


def test_elf_dependencies_of_a_real_program() -> None:
    interp, needed = image.elf_dependencies(Path(sys.executable).resolve().read_bytes())
    assert interp and interp.startswith("/lib") and "ld-linux" in interp
    assert "libc.so.6" in needed
    with pytest.raises(ImageError, match="not a 64-bit"):
        image.elf_dependencies(b"#!/bin/sh\necho\n")


def test_resolve_in_keeps_absolute_links_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (tmp_path / "usr/lib/x86_64-linux-gnu/ld.so").write_text("loader")
    (tmp_path / "usr/lib64").mkdir()
    (tmp_path / "lib64").symlink_to("usr/lib64")
    (tmp_path / "usr/lib64/ld-linux-x86-64.so.2").symlink_to("/lib/x86_64-linux-gnu/ld.so")
    (tmp_path / "lib").symlink_to("usr/lib")
    resolved = image.resolve_in(tmp_path, "/lib64/ld-linux-x86-64.so.2")
    assert resolved == tmp_path / "usr/lib/x86_64-linux-gnu/ld.so" and resolved.read_text() == "loader"
    (tmp_path / "loop").symlink_to("/loop")
    with pytest.raises(ImageError, match="too many symlinks"):
        image.resolve_in(tmp_path, "/loop")


@needs_kernel
def test_pvh_kernel_is_the_bzimages_own_vmlinux() -> None:
    bzimage = Path(f"/boot/vmlinuz-{KERNEL_VERSION}").read_bytes()
    elf = image.pvh_kernel(bzimage)
    assert elf is not None and elf.startswith(b"\x7fELF") and image.has_pvh_entry(elf)
    assert len(elf) > 2 * len(bzimage)  # decompressed
    assert image.pvh_kernel(b"not a kernel" * 100) is None
    assert not image.has_pvh_entry(Path(sys.executable).resolve().read_bytes())


@needs_kernel
def test_initramfs_modules_come_dependencies_first() -> None:
    modules = image.initramfs_modules(KERNEL_VERSION)
    names = [Path(m).name for m in modules]
    assert len(names) == len(set(names))
    for before, after in [("virtio.ko", "virtio_blk.ko"), ("virtio_ring.ko", "virtio_pci.ko"),
                          ("jbd2.ko", "ext4.ko"), ("crc16.ko", "ext4.ko"), ("virtio.ko", "virtio_console.ko")]:
        assert names.index(before) < names.index(after)
    assert "virtio-rng.ko" in names and "crc32c_generic.ko" in names  # ext4's softdep is in the list
    assert "nd_pmem.ko" not in names and "nfit.ko" not in names and "virtio_mem.ko" not in names


@needs_kernel
def test_initramfs_holds_init_busybox_with_its_libraries_and_the_modules(tmp_path: Path) -> None:
    root = tmp_path / "root"
    # a root file system with a real dynamically linked program standing in for busybox
    program = Path(sys.executable).resolve()
    interp, needed = image.elf_dependencies(program.read_bytes())
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(program, root / "usr/bin/busybox")
    for soname in needed:
        host = next(p for d in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu") if (p := Path(d, soname)).exists())
        (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True, exist_ok=True)
        shutil.copy(host, root / "usr/lib/x86_64-linux-gnu" / soname)
    (root / interp.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(interp, root / interp.lstrip("/"))
    entries = read_newc(gzip.decompress(image.build_initramfs(root, KERNEL_VERSION)))
    assert entries["init"][1] == (image.SOURCE_DIR / image.INITRAMFS_INIT).read_bytes()
    assert entries["init"][0] == 0o100755 and entries["dev/console"][2] == (5, 1)
    assert entries["bin/sh"][1] == b"busybox" and entries["bin/modprobe"][1] == b"busybox"
    for soname in needed:
        assert f"usr/lib/x86_64-linux-gnu/{soname}" in entries
    assert interp.lstrip("/") in entries
    order = entries["etc/hvext-modules"][1].decode().split()
    assert order.index("virtio") < order.index("virtio_console") and order.index("jbd2") < order.index("ext4")
    assert {"virtio_rng", "evdev", "button"} <= set(order)
    moddir = f"lib/modules/{KERNEL_VERSION}"
    dep = entries[f"{moddir}/modules.dep"][1].decode().splitlines()
    assert len(dep) == len(order) and all(f"{moddir}/{line.rstrip(':')}" in entries for line in dep)


def test_the_image_hash_covers_the_boot_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "src"
    shutil.copytree(image.SOURCE_DIR / "guest-agent", source / "guest-agent")
    shutil.copytree(image.SOURCE_DIR / "hvext", source / "hvext")
    monkeypatch.setattr(image, "SOURCE_DIR", source)
    before = image.input_hash("6.1.0-1-amd64")
    assert image.input_hash("6.1.0-1-amd64") == before
    init = source / image.INITRAMFS_INIT
    init.write_text(init.read_text() + "\n# changed\n")
    changed_init = image.input_hash("6.1.0-1-amd64")
    assert changed_init != before
    monkeypatch.setattr(image, "INITRAMFS_MODULES", image.INITRAMFS_MODULES + ["virtio_net"])
    assert image.input_hash("6.1.0-1-amd64") not in (before, changed_init)


def _fake_image(cache: Path, name: str, age: float) -> Path:
    """A cached image directory (manifest and a 1 MiB raw rootfs) last touched *age* seconds ago."""
    directory = cache / "images" / name
    directory.mkdir(parents=True)
    (directory / image.MANIFEST).write_text('{"kernel_version": "6.1.0-test"}')
    with open(directory / image.ROOTFS, "wb") as f:
        f.truncate(1 << 20)
    then = time.time() - age
    for path in (directory / image.MANIFEST, directory / image.ROOTFS, directory):
        os.utime(path, (then, then))
    return directory


def test_prune_keeps_images_that_overlays_use_or_that_were_used_lately(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three sessions' worth of old images beyond the limit: the one a domain's qcow2 overlay (a real
    ``qemu-img create -b``) still has as its backing file, and the one another test session just
    found, stay; the others beyond the limit go (the protected ones count towards it)."""
    require(shutil.which("qemu-img"), "needs qemu-img (setup installs it)")
    cache, state = tmp_path / "cache", tmp_path / "state"
    monkeypatch.setattr(image, "CACHE_DIR", cache)
    monkeypatch.setattr(image, "STATE_DIR", state)
    monkeypatch.delenv("HVEXT_IMAGE", raising=False)
    day = 86400.0
    keep = _fake_image(cache, "new", 0)
    _fake_image(cache, "recent1", 1 * day)
    _fake_image(cache, "recent2", 2 * day)
    backing = _fake_image(cache, "backs-a-domain", 5 * day)
    unused = _fake_image(cache, "unused", 6 * day)
    found = _fake_image(cache, "found-just-now", 7 * day)
    overlay_dir = state / "domains" / "hvext-test-1-1"
    overlay_dir.mkdir(parents=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing / image.ROOTFS),
                    str(overlay_dir / "disk.qcow2")], check=True)
    monkeypatch.setattr(image, "input_hash", lambda kernel_version=None: "found-just-now")
    monkeypatch.setattr(image, "host_kernel_version", lambda: "6.1.0-test")
    assert image.find_image() == image.GuestImage(found, "6.1.0-test")  # marks it used now
    image.prune(keep=keep, max_images=3)
    left = sorted(p.name for p in (cache / "images").iterdir())
    assert left == ["backs-a-domain", "found-just-now", "new", "recent1"], left
    assert not unused.exists()
    (overlay_dir / "disk.qcow2").unlink()  # the domain is gone: its image may go too
    image.prune(keep=keep, max_images=3)
    assert not backing.exists() and found.exists()


def test_backing_file_of_reads_the_qcow2_header(tmp_path: Path) -> None:
    require(shutil.which("qemu-img"), "needs qemu-img (setup installs it)")
    base = tmp_path / "base.img"
    base.write_bytes(bytes(4096))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base),
                    str(tmp_path / "top.qcow2")], check=True)
    assert image.backing_file_of(tmp_path / "top.qcow2") == base
    assert image.backing_file_of(base) is None  # not a qcow2 file
    (tmp_path / "short").write_bytes(b"QFI\xfb\0\0\0\3")
    assert image.backing_file_of(tmp_path / "short") is None


def test_every_hvext_module_the_guest_imports_is_shipped() -> None:
    """hvext.rvm runs in the guest: each hvext module it imports (and those import) is in the image."""
    import ast

    shipped = {dest.removeprefix("opt/hvext/") for _src, dest in image._guest_files() if dest.startswith("opt/hvext/")}
    todo = [name for name in shipped if name.startswith("hvext/")]
    seen: set[str] = set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        for node in ast.walk(ast.parse((image.SOURCE_DIR / rel).read_text())):
            modules: list[str] = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for module in modules:
                if module.split(".")[0] != "hvext":
                    continue
                path = module.replace(".", "/")
                for candidate in (f"{path}.py", f"{path}/__init__.py"):
                    if (image.SOURCE_DIR / candidate).exists():
                        assert candidate in shipped, f"{rel} imports {module}, which the guest image lacks"
                        todo.append(candidate)
