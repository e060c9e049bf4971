#!/usr/bin/env python3
"""QMP checks of the hvext QEMU patch series against a given binary.

Boots the host's Debian kernel with a small initramfs made here (klibc's
utilities, an init script, the virtio-pci and virtio-pmem modules) under the
given qemu-system-x86_64, drives the guest over a serial socket and checks
through QMP:

  bitmap-rate      calc-dirty-rate mode=dirty-bitmap works (no crash) and
                   measures a guest workload (patch 1)
  dirty-pages      x-hvext-* commands exist; page lists contain exactly the
                   pages the guest wrote to the virtio-pmem device, contain
                   a tmpfs workload in pc.ram, and change between intervals;
                   runs and bitmap encodings agree (patch 2)
  migration        a live migration to a second QEMU while page lists are
                   fetched every 100 ms completes, and source and
                   destination RAM are identical afterwards (the queries do
                   not take dirty pages away from migration) (patch 2)
  pmem-flush       a guest flush of the virtio-pmem region emits one
                   X_HVEXT_PMEM_FLUSH event each, with increasing seq (patch 3)

Usage: check.py [BINARY] [--accel tcg|kvm] [--only NAME,...] [-v]
BINARY defaults to /usr/local/lib/hvext/qemu-system-x86_64.
Needs /boot/vmlinuz-* with its /lib/modules, klibc-utils (both on a Debian 12
host) and the qemu.qmp package.  Prints one line per check and a closing
"N passed, N failed" line; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import glob
import hashlib
import lzma
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

DEFAULT_BINARY = "/usr/local/lib/hvext/qemu-system-x86_64"
MEM_MB = 256
PMEM_MB = 16
PAGE = 4096
MODULES = ["virtio_pci", "nd_pmem", "virtio_pmem", "crc32c_generic", "ext4"]

GUEST_INIT = r"""#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=128m tmpfs /tmp
for m in MODULES; do insmod /hvext/$m; done
i=0
while [ ! -b /dev/pmem1 ] && [ $i -lt 50 ]; do sleep 1; i=$((i+1)); done
mount -t ext4 /dev/pmem1 /mnt
echo "@@READY $?"
while read -r line; do
  eval "$line"
  echo "@@DONE $?"
done
echo "@@EOF"
"""


# --------------------------------------------------------------------------
# guest initramfs


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    namez = name.encode() + b"\0"
    hdr = "070701" + "".join(
        f"{v:08x}"
        for v in (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0)
    )
    out = hdr.encode() + namez
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def find_kernel() -> tuple[str, str]:
    """(vmlinuz, modules dir) of the newest kernel whose modules are here."""
    for vmlinuz in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        mods = "/lib/modules/" + vmlinuz[len("/boot/vmlinuz-"):]
        if os.path.isfile(f"{mods}/modules.dep"):
            return vmlinuz, mods
    raise SystemExit("check.py: no /boot/vmlinuz-* with /lib/modules/*/modules.dep")


def module_order(mods: str, wanted: list[str]) -> list[str]:
    """Paths (relative to mods) of the wanted modules and their dependencies,
    dependencies first."""
    deps = {}
    for line in open(f"{mods}/modules.dep"):
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {re.sub(r"\.ko(\.xz)?$", "", os.path.basename(m)): m for m in deps}
    order: list[str] = []

    def visit(mod):
        if mod in order:
            return
        for dep in reversed(deps[mod]):
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise SystemExit(f"check.py: kernel module {name} not in {mods}")
        visit(by_name[name])
    return order


def build_initrd(path: str, mods: str) -> None:
    """A small initramfs: klibc's utilities (klibc-utils, which Debian's
    initramfs-tools depends on), the init script and the virtio-pmem and
    virtio-pci modules.  (Debian's own initrd needs more RAM to unpack than
    the guest has.)"""
    klibc = glob.glob("/lib/klibc-*.so") or glob.glob("/usr/lib/klibc-*.so")
    if not klibc or not os.path.isdir("/usr/lib/klibc/bin"):
        raise SystemExit("check.py: klibc-utils not installed")
    ino = iter(range(1000, 100000))
    entries = [_cpio_entry(d, 0o040755, ino=next(ino))
               for d in ("bin", "lib", "hvext", "dev", "proc", "sys", "tmp",
                         "mnt")]
    entries.append(_cpio_entry("dev/console", 0o020600, ino=next(ino)))
    entries.append(_cpio_entry("lib/" + os.path.basename(klibc[0]), 0o100755,
                               open(klibc[0], "rb").read(), next(ino)))
    for tool in sorted(os.listdir("/usr/lib/klibc/bin")):
        entries.append(_cpio_entry(
            f"bin/{tool}", 0o100755,
            open(f"/usr/lib/klibc/bin/{tool}", "rb").read(), next(ino)))
    order = module_order(mods, MODULES)
    script = GUEST_INIT.replace("MODULES", " ".join(
        re.sub(r"\.xz$", "", os.path.basename(m)) for m in order))
    entries.append(_cpio_entry("init", 0o100755, script.encode(), next(ino)))
    for mod in order:
        data = open(f"{mods}/{mod}", "rb").read()
        if mod.endswith(".xz"):
            data = lzma.decompress(data)
        entries.append(_cpio_entry("hvext/" + re.sub(r"\.xz$", "",
                                   os.path.basename(mod)), 0o100644, data,
                                   next(ino)))
    entries.append(_cpio_entry("TRAILER!!!", 0, ino=0))
    with open(path, "wb") as f:
        f.write(b"".join(entries))


# --------------------------------------------------------------------------
# one QEMU with a serial console and QMP


class Serial:
    """The guest's ttyS0, through a unix socket QEMU connects to."""

    def __init__(self, path: str, log):
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(path)
        self.lsock.listen(1)
        self.buf = b""
        self.cond = threading.Condition()
        self.conn = None
        self.closed = False
        self.log = log
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        self.conn, _ = self.lsock.accept()
        while True:
            data = self.conn.recv(65536)
            if not data:
                with self.cond:
                    self.closed = True
                    self.cond.notify_all()
                break
            if self.log:
                self.log.write(data)
                self.log.flush()
            with self.cond:
                self.buf += data
                self.cond.notify_all()

    def wait_for(self, pattern: bytes, timeout: float) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                m = rx.search(self.buf)
                if m:
                    self.buf = self.buf[m.end():]
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"guest did not print {pattern!r}")
                if self.closed:
                    raise RuntimeError(f"guest console closed (QEMU exited) "
                                       f"before {pattern!r}")
                self.cond.wait(min(left, 1.0))

    def run(self, cmd: str, timeout: float = 60) -> int:
        """Run a shell command in the guest; returns its exit status."""
        self.conn.sendall(cmd.encode() + b"\n")
        return int(self.wait_for(rb"@@DONE (\d+)", timeout).group(1))


class Qemu:
    def __init__(self, binary, workdir, name, accel, kernel, initrd, pmem_files,
                 extra=(), incoming=False, verbose=False):
        self.name = name
        # unique file names: a VM killed by a check is booted again
        tag = f"{name}-{time.monotonic_ns()}"
        self.qmp_path = os.path.join(workdir, f"{tag}.qmp")
        ser_path = os.path.join(workdir, f"{tag}.serial")
        self.serial = Serial(ser_path, sys.stderr.buffer if verbose else None)
        args = [
            binary, "-name", name, "-accel", accel, "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot",
            "-m", f"{MEM_MB}M,slots=2,maxmem=1G", "-smp", "1",
            "-kernel", kernel, "-initrd", initrd,
            "-append", "console=ttyS0 quiet "
                       "loglevel=1 "
                       "panic=-1",
            "-chardev", f"socket,id=ser0,path={ser_path}",
            "-serial", "chardev:ser0",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-object", f"memory-backend-file,id=pmemdev0,share=on,"
                       f"mem-path={pmem_files[0]},size={PMEM_MB}M",
            "-device", "virtio-pmem-pci,id=pmem0,memdev=pmemdev0",
            "-object", f"memory-backend-file,id=pmemdev1,share=on,"
                       f"mem-path={pmem_files[1]},size={PMEM_MB}M",
            "-device", "virtio-pmem-pci,id=pmem1,memdev=pmemdev1",
            *extra,
        ]
        if incoming:
            args += ["-S", "-incoming", "defer"]
        self.log_path = os.path.join(workdir, f"{tag}.log")
        self.proc = subprocess.Popen(args, stdout=open(self.log_path, "wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: QEMU did not start: "
                                   + open(self.log_path).read()[-2000:])
            time.sleep(0.1)
        self.qmp = QEMUMonitorProtocol(self.qmp_path)
        self.qmp.connect()
        self.qmp.settimeout(120)

    def cmd(self, name, **args):
        return self.qmp.cmd(name, **args)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self):
        if self.alive():
            try:
                self.qmp.cmd("quit")
            except Exception:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            self.qmp.close()
        except Exception:
            pass


# --------------------------------------------------------------------------
# checks


class Failed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise Failed(msg)


def runs_to_set(runs):
    pages = set()
    for i in range(0, len(runs), 2):
        pages.update(range(runs[i], runs[i] + runs[i + 1]))
    return pages


def bitmap_to_set(b64):
    data = base64.b64decode(b64)
    return {i * 8 + b for i, byte in enumerate(data) for b in range(8)
            if byte >> b & 1}


def blocks_by_id(res):
    return {b["id"]: b for b in res["blocks"]}


def check_bitmap_rate(vm: Qemu) -> str:
    vm.cmd("calc-dirty-rate", **{"calc-time": 1, "mode": "dirty-bitmap"})
    time.sleep(0.3)
    expect(vm.alive(), "QEMU died during calc-dirty-rate mode=dirty-bitmap")
    # a workload: rewrite 32 MiB of tmpfs until told to stop
    expect(vm.serial.run(
        "(while [ ! -e /tmp/stop ]; do dd if=/dev/zero of=/tmp/rate "
        "bs=1048576 count=32 conv=notrunc 2>/dev/null; done; "
        "echo @@WORKLOAD-END) &") == 0, "could not start the guest workload")
    deadline = time.monotonic() + 10
    while vm.cmd("query-dirty-rate")["status"] != "measured":
        expect(time.monotonic() < deadline, "first measurement did not end")
        time.sleep(0.2)
    vm.cmd("calc-dirty-rate", **{"calc-time": 2, "mode": "dirty-bitmap"})
    time.sleep(2.2)
    deadline = time.monotonic() + 10
    while (info := vm.cmd("query-dirty-rate"))["status"] != "measured":
        expect(vm.alive(), "QEMU died during calc-dirty-rate")
        expect(time.monotonic() < deadline, "measurement did not end")
        time.sleep(0.2)
    vm.serial.run("> /tmp/stop")
    vm.serial.wait_for(rb"@@WORKLOAD-END", 60)
    expect(info["mode"] == "dirty-bitmap", f"mode is {info['mode']}")
    # 32 MiB rewritten (plus dd's buffer) during 2 s: >= 16 MB/s unique pages
    expect(info["dirty-rate"] >= 10,
           f"dirty-rate {info['dirty-rate']} MB/s with a 32 MiB workload")
    return f"dirty-bitmap rate {info['dirty-rate']} MB/s with a 32 MiB rewrite loop"


def check_dirty_pages(vm: Qemu) -> str:
    names = {c["name"] for c in vm.cmd("query-commands")}
    for c in ("x-hvext-dirty-log-start", "x-hvext-dirty-log-stop",
              "x-hvext-query-dirty-pages"):
        expect(c in names, f"{c} missing from query-commands")
    vm.cmd("x-hvext-dirty-log-start")
    try:
        vm.cmd("x-hvext-dirty-log-start")
        raise Failed("second x-hvext-dirty-log-start did not fail")
    except Failed:
        raise
    except Exception:
        pass
    first = vm.cmd("x-hvext-query-dirty-pages")
    expect(first["generation"] == 1 and first["page-size"] == PAGE,
           f"unexpected header {first['generation']} {first['page-size']}")
    blocks = blocks_by_id(first)
    expect("pc.ram" in blocks, f"no pc.ram block in {sorted(blocks)}")
    expect("pmemdev0" in blocks, f"no pmemdev0 block in {sorted(blocks)}")
    expect(blocks["pmemdev0"]["pages"] == PMEM_MB * 1024 * 1024 // PAGE,
           "pmemdev0 has the wrong size")

    # exact pages: the guest writes 16 pages at page 256 of /dev/pmem0
    expect(vm.serial.run("dd if=/dev/zero of=/dev/pmem0 bs=4096 seek=256 "
                         "count=16 conv=notrunc 2>/dev/null") == 0,
           "guest dd to /dev/pmem0 failed")
    res = vm.cmd("x-hvext-query-dirty-pages", encoding="runs")
    pm = blocks_by_id(res)["pmemdev0"]
    got = runs_to_set(pm["runs"])
    expect(set(range(256, 272)) <= got,
           f"pmem pages 256..271 not all reported: runs {pm['runs'][:20]}")
    expect(len(got) == pm["dirty"], "runs disagree with the dirty count")
    expect(len(got) <= 16 + 4,
           f"{len(got)} pmem pages reported for a 16-page write")

    # nothing written to pmem since: the next list has no pmem page
    res = vm.cmd("x-hvext-query-dirty-pages", encoding="runs")
    pm2 = blocks_by_id(res)["pmemdev0"]
    expect(pm2["dirty"] == 0, f"pmem pages reported again: {pm2['runs'][:20]}")

    # tmpfs workload: 8 MiB new data -> at least 2048 pc.ram pages,
    # and runs and bitmap agree on another write
    expect(vm.serial.run("dd if=/dev/zero of=/tmp/pages bs=1048576 count=8 "
                         "2>/dev/null") == 0, "guest dd to tmpfs failed")
    res = vm.cmd("x-hvext-query-dirty-pages", encoding="bitmap")
    ram = blocks_by_id(res)["pc.ram"]
    ram_pages = bitmap_to_set(ram["bitmap"])
    expect(len(ram_pages) == ram["dirty"], "bitmap disagrees with dirty count")
    expect(ram["dirty"] >= 2048,
           f"only {ram['dirty']} pc.ram pages for an 8 MiB tmpfs write")
    expect(vm.serial.run("dd if=/dev/zero of=/dev/pmem0 bs=4096 seek=1000 "
                         "count=3 conv=notrunc 2>/dev/null") == 0,
           "guest dd to /dev/pmem0 failed")
    res = vm.cmd("x-hvext-query-dirty-pages", encoding="bitmap")
    got = bitmap_to_set(blocks_by_id(res)["pmemdev0"]["bitmap"])
    expect({1000, 1001, 1002} <= got and len(got) <= 7,
           f"bitmap encoding: pmem pages {sorted(got)[:20]}")
    idle = vm.cmd("x-hvext-query-dirty-pages")
    vm.cmd("x-hvext-dirty-log-stop")
    try:
        vm.cmd("x-hvext-query-dirty-pages")
        raise Failed("x-hvext-query-dirty-pages works after stop")
    except Failed:
        raise
    except Exception:
        pass
    return (f"pmem write of pages 256..271 reported exactly; 8 MiB tmpfs write "
            f"-> {ram['dirty']} pc.ram pages; idle interval "
            f"{idle['dirty']} pages; generation {idle['generation']}")


def check_migration(src: Qemu, dst: Qemu, workdir: str) -> str:
    dst.cmd("migrate-incoming", uri=f"unix:{workdir}/mig.sock")
    try:   # left on by a failed check before
        src.cmd("x-hvext-dirty-log-stop")
    except Exception:  # noqa: BLE001
        pass
    src.cmd("x-hvext-dirty-log-start")
    # random data, rewritten in a loop: a page whose dirtiness migration
    # missed would differ between source and destination
    expect(src.serial.run(
        "(while :; do dd if=/dev/urandom of=/tmp/mig bs=65536 count=64 "
        "conv=notrunc 2>/dev/null; done) &") == 0,
        "could not start the guest workload")
    time.sleep(1)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20,
                                         "downtime-limit": 2000})
    src.cmd("migrate", uri=f"unix:{workdir}/mig.sock")
    queries = dirty = 0
    deadline = time.monotonic() + 300
    while True:
        st = src.cmd("query-migrate")
        if st.get("status") in ("completed", "failed", "cancelled"):
            break
        expect(time.monotonic() < deadline, "migration did not finish")
        r = src.cmd("x-hvext-query-dirty-pages", encoding="bitmap")
        queries += 1
        dirty += r["dirty"]
        time.sleep(0.1)
    expect(st["status"] == "completed", f"migration {st['status']}: {st}")
    src.cmd("x-hvext-dirty-log-stop")
    sums = []
    for vm in (src, dst):
        path = f"{workdir}/{vm.name}.mem"
        vm.cmd("pmemsave", val=0, size=MEM_MB << 20, filename=path)
        sums.append(hashlib.sha256(open(path, "rb").read()).hexdigest())
        os.unlink(path)
    expect(sums[0] == sums[1], "guest RAM differs between source and "
           "destination after migration")
    ram = st.get("ram", {})
    return (f"migration completed ({ram.get('dirty-sync-count')} syncs) with "
            f"{queries} page-list queries ({dirty} pages) during it; source and "
            f"destination RAM identical")


def check_pmem_flush(vm: Qemu) -> str:
    schema = vm.cmd("query-qmp-schema")
    expect(any(e.get("meta-type") == "event" and e.get("name") ==
               "X_HVEXT_PMEM_FLUSH" for e in schema),
           "X_HVEXT_PMEM_FLUSH missing from query-qmp-schema")

    def flush_events(wait):
        out = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                evs = vm.qmp.get_events(wait=0.5)
            except asyncio.TimeoutError:
                continue
            out += [ev["data"] for ev in evs
                    if ev["event"] == "X_HVEXT_PMEM_FLUSH"]
        return out

    flush_events(1.0)   # drop flushes of the mount at boot
    # the guest writes a file on ext4 on pmem1 and fsyncs it (sync(1)
    # syncs the filesystem: a journal commit, i.e. a cache flush request)
    idle = flush_events(1.0)
    expect(not idle, f"flush events while the guest does nothing: {idle}")
    per_sync = []
    events = []
    for i in range(3):
        expect(vm.serial.run(f"echo {i} > /mnt/f{i}; sync") == 0,
               "guest write + sync on pmem1 failed")
        got = flush_events(1.5)
        per_sync.append(len(got))
        events += got
    expect(all(n >= 1 for n in per_sync),
           f"X_HVEXT_PMEM_FLUSH events per guest sync: {per_sync}")
    expect(all(e.get("device") == "pmem1" and e["memdev"] == "pmemdev1"
               and e["path"] == "/machine/peripheral/pmem1"
               and e["error"] is False for e in events),
           f"event data {events[-1]}")
    seqs = [e["seq"] for e in events]
    expect(seqs == list(range(seqs[0], seqs[0] + len(seqs))),
           f"seq not consecutive: {seqs}")
    return (f"3 guest write+sync on ext4/virtio-pmem -> {per_sync} events, "
            f"seq {seqs}; last {events[-1]}")


# --------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("binary", nargs="?", default=DEFAULT_BINARY)
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--only", default="",
                    help="comma-separated: bitmap-rate,dirty-pages,migration,"
                         "pmem-flush")
    ap.add_argument("--qemu-arg", action="append", default=[],
                    help="extra QEMU argument (repeatable), e.g. -L DIR")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="copy the guest console to stderr")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    if not os.access(args.binary, os.X_OK):
        print(f"check.py: {args.binary} is not executable", file=sys.stderr)
        return 2
    kernel, mods = find_kernel()
    workdir = tempfile.mkdtemp(prefix="hvext-qemu-check-")
    passed = failed = 0
    vms: list[Qemu] = []
    try:
        initrd = os.path.join(workdir, "initrd.img")
        build_initrd(initrd, mods)
        # pmem0: raw, for exact page lists; pmem1: ext4, for guest fsync
        pmem_files = [os.path.join(workdir, f"pmem{i}.img") for i in (0, 1)]
        for path in pmem_files:
            with open(path, "wb") as f:
                f.truncate(PMEM_MB << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^metadata_csum,^64bit",
                        "-E", "nodiscard", pmem_files[1]], check=True)

        def boot(name, incoming=False):
            vm = Qemu(args.binary, workdir, name, args.accel, kernel, initrd,
                      pmem_files, args.qemu_arg, incoming, args.verbose)
            vms.append(vm)
            return vm

        vm = {}

        def source() -> Qemu:
            """The source VM, booted again if a check killed it."""
            if "src" not in vm or not vm["src"].alive():
                if "src" in vm:
                    vm.pop("src").stop()
                vm["src"] = boot("src")
                vm["src"].serial.wait_for(rb"@@READY", 300)
            return vm["src"]

        source()
        print(f"# {args.binary} -accel {args.accel}, guest {kernel}",
              flush=True)
        checks = [
            ("bitmap-rate", lambda: check_bitmap_rate(source())),
            ("dirty-pages", lambda: check_dirty_pages(source())),
            ("pmem-flush", lambda: check_pmem_flush(source())),
            ("migration", lambda: check_migration(source(), boot("dst", True),
                                                  workdir)),
        ]
        for name, fn in checks:
            if only and name not in only:
                continue
            t0 = time.monotonic()
            try:
                detail = fn()
                passed += 1
                print(f"PASS {name}: {detail} [{time.monotonic() - t0:.1f}s]",
                      flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure
                failed += 1
                why = f"{type(e).__name__}: {e}"
                try:
                    rc = vm["src"].proc.wait(2) if "src" in vm else None
                    why += f" (QEMU exited with {rc}"
                    why += ", SIGSEGV)" if rc == -11 else ")"
                except subprocess.TimeoutExpired:
                    pass
                print(f"FAIL {name}: {why} [{time.monotonic() - t0:.1f}s]",
                      flush=True)
    finally:
        for vm in vms:
            vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
