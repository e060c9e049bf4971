"""Crash tests of hvext.rvm: the prefix property after SIGKILL and after power cuts.

After a crash at any instant, recovery must leave the mapped segments in the
state after a prefix of the committed transactions, a prefix that includes
every transaction whose ``end_transaction(flush=True)`` returned (and every
one before a returned ``flush()`` / ``truncate()``).

* SIGKILL: a forked child runs a random workload (mixed flush/no_flush,
  aborts, random truncates, automatic truncation in the background) and is
  killed at a random moment; sometimes the following recovery is killed too.
  Runs chain: each starts from the state the previous one recovered.
* Power cut: the workload runs in-process over a simulated disk that keeps,
  per file, the content as of the last fsync/fdatasync; at a random system
  call the power goes off and each 512-byte sector written since that file's
  last sync independently either reached the disk or not (torn records,
  reordered writeback). Sometimes the recovery itself loses power too.

``HVEXT_RVM_CRASH_RUNS`` sets the number of runs of each (default 200),
``HVEXT_RVM_CRASH_SEED`` the master seed.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import stat
import threading
import time
import traceback
import types

import pytest

from hvext import rvm
from hvext.rvm import core
from tests.unit import rvm_crash_workload as W

RUNS = int(os.environ.get("HVEXT_RVM_CRASH_RUNS", "200"))
SEED = int(os.environ.get("HVEXT_RVM_CRASH_SEED", "20240520"))


def _child_exit(fd: int, body) -> None:
    """Run body in a forked child; never return into pytest."""
    code = 0
    try:
        body()
    except BaseException:
        os.write(fd, b"E" + traceback.format_exc().encode())
        code = 3
    finally:
        os._exit(code)


def _fork_and_kill(delay: float, fd: int, body) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _child_exit(fd, body)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return status


def test_sigkill_at_random_moments_keeps_the_prefix_property(tmp_path):
    log, d = str(tmp_path / "rvm.log"), str(tmp_path)
    rvm.create_log(log, W.LOG_SIZE)
    base = W.read_state(log, d)
    rng = random.Random(SEED)
    progress = tmp_path / "progress"
    commits = killed_recoveries = 0
    for run in range(RUNS):
        seed = rng.getrandbits(32)
        options = {
            "truncate_ratio": rng.choice((0.25, 0.5, 0.8, None)),
            "background_truncation": rng.random() < 0.7,
        }
        fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)

        def workload():
            r = rvm.RVM(log, **options)
            W.run(r, W.map_regions(r, d), seed, lambda line: os.write(fd, line))

        status = _fork_and_kill(rng.uniform(0.0, 0.04), fd, workload)
        os.close(fd)
        text = progress.read_text()
        assert "E" not in text, f"run {run}: the workload failed:\n{text[text.index('E'):]}"
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, text
        if rng.random() < 0.25:  # kill the next recovery too, at a random moment
            fd = os.open(os.devnull, os.O_WRONLY)
            _fork_and_kill(rng.uniform(0.0, 0.004), fd, lambda: rvm.RVM(log).close())
            os.close(fd)
            killed_recoveries += 1
        started, returned, durable = W.parse_progress(text)
        actual = W.read_state(log, d)
        k = W.find_prefix(base, seed, actual, durable, started)
        assert k is not None, (
            f"run {run} (seed {seed}, {options}): recovered state is no prefix of commits "
            f"{durable}..{started}"
        )
        # Stronger, this implementation's property: a no_flush commit that
        # returned is in the kernel's page cache, which a process crash keeps.
        assert k >= returned, f"run {run}: lost a returned commit after SIGKILL ({k} < {returned})"
        commits += k
        base = actual
    assert commits > RUNS  # the runs did real work


def test_killing_recovery_repeatedly_still_recovers(tmp_path):
    log, d = str(tmp_path / "rvm.log"), str(tmp_path)
    rvm.create_log(log, 8 << 20)
    rng = random.Random(SEED + 1)
    with rvm.RVM(log, truncate_ratio=None) as r:
        regions = W.map_regions(r, d)
        for _ in range(1500):
            tid = r.begin_transaction(restore=False)
            for _ in range(4):
                ri = rng.randrange(len(regions))
                n = rng.randint(1, 2048)
                off = rng.randrange(len(regions[ri]) - n)
                r.set_range(tid, regions[ri], off, n)[:] = rng.randbytes(n)
            r.end_transaction(tid, flush=False)
        final = [bytes(region) for region in regions]
    saved = open(log, "rb").read()
    segs = {name: open(os.path.join(d, name), "rb").read() for name in ("a.seg", "b.seg")}
    t0 = time.perf_counter()
    assert W.read_state(log, d) == final
    recovery_time = time.perf_counter() - t0
    interrupted = 0
    for attempt in range(60):
        with open(log, "wb") as f:  # back to the unrecovered log
            f.write(saved)
        for name, data in segs.items():  # and to the segments before any replay
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        fd = os.open(os.devnull, os.O_WRONLY)
        for _ in range(3):
            _fork_and_kill(rng.uniform(0.0, 1.5 * recovery_time), fd, lambda: rvm.RVM(log).close())
            if rvm.scan_log(log)["records"]:
                interrupted += 1  # killed before recovery finished
        os.close(fd)
        assert W.read_state(log, d) == final
        if interrupted >= 10:
            break
    assert interrupted >= 1


# ------------------------------------------------------------- power cuts


class PowerCut(OSError):
    """Raised by every simulated-disk call once the power is off."""


class SimDisk:
    """Write/sync calls of hvext.rvm over files whose durable state is simulated."""

    SECTOR = 512

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        self.durable: dict[str, bytes] = {}
        self.dirty: dict[str, set[int]] = {}
        self.cut_at: int | None = None
        self.calls = 0
        self.images: dict[str, bytes] | None = None
        self.power = True

    def arm(self, cut_after: int | None, power: bool = True) -> None:
        """Fail at the cut_after-th call: a power cut, or (power=False) a process crash."""
        self.calls, self.cut_at, self.images, self.power = 0, cut_after, None, power

    def revive(self) -> None:
        """After a process crash: the page cache (file contents) and the durable state stay."""
        self.calls, self.cut_at, self.images = 0, None, None

    @staticmethod
    def _content(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def _track(self, fd: int) -> str:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path not in self.durable:
            self.durable[path] = self._content(path)
            self.dirty[path] = set()
        return path

    def _tick(self) -> None:
        if self.images is not None:
            raise PowerCut(errno.EIO, "the power is off")
        if self.cut_at is None:
            return
        self.calls += 1
        if self.calls >= self.cut_at:
            self.images = self._crash_images() if self.power else {}
            raise PowerCut(errno.EIO, "power cut" if self.power else "process crash")

    def _crash_images(self) -> dict[str, bytes]:
        images = {}
        for path, durable in self.durable.items():
            current = self._content(path)
            img = bytearray(durable)
            for s in sorted(self.dirty[path]):
                if self.rng.random() < 0.5:
                    chunk = current[s * self.SECTOR : (s + 1) * self.SECTOR]
                    if len(img) < s * self.SECTOR:
                        img.extend(bytes(s * self.SECTOR - len(img)))
                    img[s * self.SECTOR : s * self.SECTOR + len(chunk)] = chunk
            images[path] = bytes(img)
        return images

    def _mark(self, path: str, start: int, end: int) -> None:
        if end > start:
            self.dirty[path].update(range(start // self.SECTOR, (end - 1) // self.SECTOR + 1))

    def pwrite(self, fd: int, data, offset: int) -> int:
        with self.lock:
            self._tick()
            path = self._track(fd)
            n = os.pwrite(fd, data, offset)
            self._mark(path, offset, offset + n)
            return n

    def pwritev(self, fd: int, iov, offset: int, flags: int = 0) -> int:
        """pwritev; with RWF_DSYNC the bytes written are durable when it returns (nothing else)."""
        with self.lock:
            self._tick()
            path = self._track(fd)
            n = os.pwritev(fd, iov, offset)
            self._mark(path, offset, offset + n)
            if flags & getattr(os, "RWF_DSYNC", 0):
                written = self._content(path)[offset : offset + n]
                durable = bytearray(self.durable[path])
                if len(durable) < offset:
                    durable.extend(bytes(offset - len(durable)))
                durable[offset : offset + n] = written
                self.durable[path] = bytes(durable)
            return n

    def ftruncate(self, fd: int, length: int) -> None:
        with self.lock:
            self._tick()
            path = self._track(fd)
            old = os.fstat(fd).st_size
            os.ftruncate(fd, length)
            self._mark(path, min(old, length), max(old, length))

    def sync(self, fd: int) -> None:
        with self.lock:
            self._tick()
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                return
            path = self._track(fd)
            self.durable[path] = self._content(path)  # no real sync: simulated
            self.dirty[path] = set()

    def restore_images(self) -> None:
        """Put the crash images in place of the files (the reboot)."""
        for path, img in (self.images or {}).items():
            with open(path, "wb") as f:
                f.write(img)
        self.reset()


@pytest.fixture
def simdisk(monkeypatch):
    disk = SimDisk(random.Random(SEED + 2))
    proxy = types.SimpleNamespace(**vars(os))
    proxy.pwrite, proxy.pwritev, proxy.ftruncate = disk.pwrite, disk.pwritev, disk.ftruncate
    proxy.fsync = disk.sync
    monkeypatch.setattr(core, "os", proxy)
    monkeypatch.setattr(core, "_fdatasync", disk.sync)
    monkeypatch.setattr(core, "_USE_MMAP", False)  # segment writes must go through pwrite
    return disk


def test_power_cut_at_random_moments_keeps_the_prefix_property(tmp_path, simdisk):
    template = tmp_path / "template.log"
    rvm.create_log(template, W.LOG_SIZE)
    template_bytes = template.read_bytes()
    rng = random.Random(SEED + 3)
    zero = [bytes(length) for _name, _offset, length in W.REGIONS]
    commits = recovery_cuts = 0
    for run in range(RUNS):
        d = tmp_path / f"run{run}"
        d.mkdir()
        log = str(d / "rvm.log")
        with open(log, "wb") as f:
            f.write(template_bytes)
        seed = rng.getrandbits(32)
        options = {
            "truncate_ratio": rng.choice((0.25, 0.5, 0.8, None)),
            "background_truncation": rng.random() < 0.5,
        }
        lines: list[bytes] = []
        simdisk.reset()
        # A power cut; or a process crash (unsynced writes stay in the page
        # cache) followed by a power cut during the recovery.
        process_crash = rng.random() < 0.25
        simdisk.arm(rng.randint(1, 400), power=not process_crash)
        r = None
        try:
            r = rvm.RVM(log, **options)
            W.run(r, W.map_regions(r, str(d)), seed, lines.append)
        except (rvm.RVMError, PowerCut) as err:
            assert simdisk.images is not None, f"run {run}: failed without a power cut: {err!r}"
        finally:
            if r is not None:
                try:
                    r.close()
                except (rvm.RVMError, OSError):
                    pass
        if process_crash:
            simdisk.revive()
        else:
            simdisk.restore_images()
        if process_crash or rng.random() < 0.3:  # the power fails during recovery
            simdisk.arm(rng.randint(1, 12))
            try:
                rvm.RVM(log).close()
            except (rvm.RVMError, PowerCut):
                recovery_cuts += 1
            simdisk.restore_images()
        started, _returned, durable = W.parse_progress(b"".join(lines).decode())
        actual = W.read_state(log, str(d))
        k = W.find_prefix(zero, seed, actual, durable, started)
        assert k is not None, (
            f"run {run} (seed {seed}, {options}): state after the power cut is no prefix of "
            f"commits {durable}..{started}"
        )
        commits += k
        shutil.rmtree(d)
    assert commits > RUNS
    assert recovery_cuts > 0 or RUNS < 20
