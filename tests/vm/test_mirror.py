"""Memory mirroring (C19) on a real guest whose RAM is a shared file (a C6 swap-file domain).

A guest program fills a locked buffer with random pages and reports each page's guest physical address
(``/proc/self/pagemap``, root) and the buffer's SHA-256; it rewrites a page or recomputes the checksum
from memory on request. Errors are injected into those pages: after the repair the checksum computed
in the guest must be the one it expects -- or, for a page written since the last sync and destroyed
before hvext could read it, must *not* be (the loss the report announced is real).

The mirror's records and copies go to a temporary directory (never the host's STATE_DIR/mirror).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from hvext import aio
from hvext.ha import mirror
from hvext.host import RunState
from hvext.memory import swapfile
from tests.vm.helpers import cli, cli_json, guest_exec, guest_sh

PAGE = 4096
PAGES = 64
PROGRAM = r"""
import ctypes, hashlib, json, mmap, os, struct, sys, time
N, P = %d, 4096
buf = mmap.mmap(-1, N * P, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
buf[:] = os.urandom(N * P)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
assert ctypes.CDLL(None, use_errno=True).mlock(ctypes.c_void_p(addr), ctypes.c_size_t(N * P)) == 0
def frames():
    with open('/proc/self/pagemap', 'rb') as f:
        out = []
        for i in range(N):
            f.seek((addr // P + i) * 8)
            e = struct.unpack('Q', f.read(8))[0]
            assert e >> 63 & 1 and e & ((1 << 55) - 1), hex(e)
            out.append((e & ((1 << 55) - 1)) * P)
        return out
def publish(name, data):
    with open('/run/mr/' + name + '.tmp', 'w') as f:
        json.dump(data, f)
    os.rename('/run/mr/' + name + '.tmp', '/run/mr/' + name)
expected = hashlib.sha256(buf).hexdigest()
publish('state', {'gpas': frames(), 'sha': expected, 'n': 0})
n = 0
while True:
    try:
        cmd = open('/run/mr/cmd').read().split()
    except FileNotFoundError:
        time.sleep(0.02)
        continue
    os.unlink('/run/mr/cmd')
    n += 1
    if cmd[0] == 'write':
        k = int(cmd[1])
        buf[k * P:(k + 1) * P] = os.urandom(P)
        expected = hashlib.sha256(buf).hexdigest()
    elif cmd[0] == 'quit':
        sys.exit(0)
    publish('state', {'gpas': frames(), 'sha': expected, 'n': n, 'now': hashlib.sha256(buf).hexdigest()})
""" % PAGES


@pytest.fixture
def mirror_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "mirror"
    monkeypatch.setattr(mirror, "mirror_root", lambda: root)
    return root


def start_program(domain) -> dict:
    guest_exec(domain, "sh", "-c", "mkdir -p /run/mr && cat > /run/mr/prog.py", stdin=PROGRAM)
    guest_sh(domain, "setsid python3 /run/mr/prog.py > /run/mr/log 2>&1 < /dev/null &")
    return wait_state(domain, 0)


def wait_state(domain, n: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = guest_sh(domain, "cat /run/mr/state 2>/dev/null || true; cat /run/mr/log")["stdout"]
        if out.startswith("{"):
            state = json.loads(out.splitlines()[0])
            if state["n"] >= n:
                return state
        elif out:
            raise AssertionError(f"guest program failed: {out}")
        time.sleep(0.5)
    raise AssertionError("the guest program did not answer")


def ask(domain, command: str, n: int) -> dict:
    guest_sh(domain, f"echo '{command}' > /run/mr/cmd.tmp && mv /run/mr/cmd.tmp /run/mr/cmd")
    return wait_state(domain, n)


def page_of(path: Path, offset: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(PAGE)


def test_mirror_repairs_injected_errors_and_says_when_writes_are_lost(vm_factory, mirror_dir: Path, capsys) -> None:
    domain = vm_factory.define(memory_mib=512, swap_file=True)
    vm_factory.boot(domain)
    ram = swapfile.domain_file(domain)
    state = start_program(domain)
    gpas, sha0 = state["gpas"], state["sha"]
    assert all(g < 512 << 20 for g in gpas)  # a small q35 guest: guest physical address = file offset

    started = cli_json(capsys, "ha", "mirror", domain.name, "--interval", "60000")
    assert started["state"] == "active" and started["covered_bytes"] == 512 << 20
    assert started["last_pages"] == (512 << 20) // PAGE and started["last_reason"] == "first sync"
    copy = Path(started["target"])
    assert copy.parent == mirror_dir and (os.stat(copy).st_mode & 0o777) == 0o600
    assert page_of(copy, gpas[3]) == page_of(ram, gpas[3])

    # 1. a page not written since the sync: destroyed, repaired exactly, the guest resumed
    report = cli_json(capsys, "ha", "inject-memory-error", domain.name, "--gpa", hex(gpas[3] + 100))
    assert report["exact"] and not report["dirty_since_sync"] and report["resumed"], report
    assert report["offset"] == gpas[3] and "page destroyed" in report["events"]
    assert domain.state is RunState.RUNNING
    state = ask(domain, "sum", 1)
    assert state["now"] == sha0 == state["sha"]

    # 2. a page written since the sync whose error is predicted (still readable): the final sync takes it
    state = ask(domain, "write 5", 2)
    sha1 = state["sha"]
    report = cli_json(capsys, "ha", "inject-memory-error", domain.name, "--gpa", str(gpas[5]), "--readable")
    assert report["exact"] and report["dirty_since_sync"] and report["resumed"], report
    assert report["final_sync_pages"] >= 1 and "final sync" in report["action"]
    state = ask(domain, "sum", 3)
    assert state["now"] == sha1 == state["sha"]

    # 3. a page written since the sync and destroyed before hvext could read it: the older copy goes back,
    #    the report says the writes are lost, the guest stays paused -- and the loss is real
    state = ask(domain, "write 7", 4)
    sha2 = state["sha"]
    status, out, err = cli(capsys, "ha", "inject-memory-error", domain.name, "--gpa", hex(gpas[7]), "--json")
    assert status == 0, err
    report = json.loads(out)
    assert not report["exact"] and report["dirty_since_sync"] and not report["resumed"], report
    assert "lost" in report["action"]
    assert domain.state is RunState.PAUSED
    assert page_of(ram, gpas[7]) == page_of(copy, gpas[7]) != bytes(mirror.POISON[:PAGE])
    domain.resume()
    state = ask(domain, "sum", 5)
    assert state["sha"] == sha2 and state["now"] != sha2  # the guest's own checksum shows the lost write

    # a sync copies what the guest wrote since; status shows it
    state = ask(domain, "write 9", 6)
    synced = cli_json(capsys, "ha", "mirror", domain.name, "--sync")
    assert synced["last_reason"] == "dirty pages" and 1 <= synced["last_pages"] < 2000, synced
    assert page_of(copy, gpas[9]) == page_of(ram, gpas[9])
    (row,) = cli_json(capsys, "ha", "mirror-status")
    assert row["domain"] == domain.name and row["last_repair"]["gpa"] == hex(gpas[7])
    assert row["lag_seconds"] is not None and row["lag_seconds"] < 60

    # hvextd's loop syncs it at its interval (here on this process's loop, as hvextd runs it)
    record = mirror._load(domain.uuid())
    record.interval_ms = 200
    mirror._save(record)
    before = record.syncs

    async def loop_for(seconds: float) -> None:
        import asyncio
        from hvext.daemon import mirror_loop
        stopping = asyncio.Event()
        task = asyncio.ensure_future(mirror_loop.run(domain.host, stopping))
        await asyncio.sleep(seconds)
        stopping.set()
        await task
    aio.run(loop_for(3.0))
    after = mirror._load(domain.uuid())
    assert 5 <= after.syncs - before <= 20 and after.full_syncs == 1 and after.state == "active", after

    # a new QEMU (destroy, start): its RAM file is elsewhere; the next sync finds it and copies everything
    domain.destroy()
    vm_factory.boot(domain)
    synced = cli_json(capsys, "ha", "mirror", domain.name, "--sync")
    assert synced["source"] == str(swapfile.domain_file(domain)) != str(ram), synced
    assert "QEMU restarted" in synced["last_reason"] and synced["last_pages"] == (512 << 20) // PAGE
    assert page_of(copy, 1 << 20) == page_of(swapfile.domain_file(domain), 1 << 20)

    stopped = cli_json(capsys, "ha", "mirror", domain.name, "--stop")
    assert stopped["stopped"] and not copy.exists() and not list(mirror_dir.glob("*.json"))
    assert cli(capsys, "ha", "mirror-status", "--json")[1].strip() == "[]"


def test_mirror_failures_are_clear_and_leave_nothing_half_done(vm_factory, mirror_dir: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    domain = vm_factory.define(memory_mib=512, swap_file=True)
    vm_factory.boot(domain)

    # a range mirror: only its pages are copied; GPAs outside it or outside RAM are refused, nothing touched
    started = cli_json(capsys, "ha", "mirror", domain.name, "--range", "0x1000000:1M", "--range", "0x2000000:8K")
    assert started["covered_pages"] == 258 and started["last_pages"] == 258
    assert started["ranges"] == ["0x1000000:1048576", "0x2000000:8192"]
    status, _, err = cli(capsys, "ha", "inject-memory-error", domain.name, "--gpa", "0x3000000")
    assert status == 1 and "not in a mirrored range" in err
    status, _, err = cli(capsys, "ha", "inject-memory-error", domain.name, "--gpa", hex(512 << 20))
    assert status == 1 and "not in guest RAM" in err
    assert domain.state is RunState.RUNNING
    status, _, err = cli(capsys, "ha", "mirror", domain.name)
    assert status == 1 and "mirrored already" in err
    # another libvirt host's hvextd (the lab's hosts share this file system) neither syncs nor stops it
    record = mirror._load(domain.uuid())
    own, record.host_uuid = record.host_uuid, "00000000-0000-0000-0000-00000000beef"
    mirror._save(record)
    status, _, err = cli(capsys, "ha", "mirror", domain.name, "--sync")
    assert status == 1 and "belongs to libvirt host" in err
    assert mirror._load(domain.uuid()).state == "active"
    record.host_uuid = own
    mirror._save(record)
    assert cli(capsys, "ha", "mirror", domain.name, "--stop")[0] == 0

    # a second user of the dirty log is refused, nothing is left behind
    async def start_log() -> None:
        async with domain.qmp() as qmp:
            await qmp.execute("x-hvext-dirty-log-start")

    async def stop_log() -> None:
        async with domain.qmp() as qmp:
            await qmp.execute("x-hvext-dirty-log-stop")
    aio.run(start_log())
    status, _, err = cli(capsys, "ha", "mirror", domain.name)
    assert status == 1 and "in use by another" in err
    assert not list(mirror_dir.glob("*.ram")) and not list(mirror_dir.glob("*.json"))
    aio.run(stop_log())

    # the copy goes missing: the next sync stops the mirror and says why
    started = cli_json(capsys, "ha", "mirror", domain.name, "--interval", "100")
    Path(started["target"]).unlink()
    status, _, err = cli(capsys, "ha", "mirror", domain.name, "--sync")
    assert status == 1 and "missing" in err
    (row,) = cli_json(capsys, "ha", "mirror-status")
    assert row["state"] == "stopped" and "missing" in row["error"]
    status, _, err = cli(capsys, "ha", "inject-memory-error", domain.name, "--gpa", "0x100000")
    assert status == 1 and "stopped" in err
    assert cli(capsys, "ha", "mirror", domain.name, "--stop")[0] == 0

    # the domain stops in the middle of a sync (after the dirty list, before the RAM file is read)
    cli_json(capsys, "ha", "mirror", domain.name)
    real_open = mirror.ramsync.open_source

    def stop_then_open(*args, **kwargs):
        domain.destroy()
        return real_open(*args, **kwargs)
    monkeypatch.setattr(mirror.ramsync, "open_source", stop_then_open)
    status, _, err = cli(capsys, "ha", "mirror", domain.name, "--sync")
    assert status == 1 and "stopped" in err, err
    monkeypatch.setattr(mirror.ramsync, "open_source", real_open)
    (row,) = cli_json(capsys, "ha", "mirror-status")
    assert row["state"] == "stopped" and "domain" in row["error"], row
    assert cli(capsys, "ha", "mirror", domain.name, "--stop")[0] == 0
    assert not list(mirror_dir.iterdir()) or all(p.suffix == ".lock" for p in mirror_dir.iterdir())


def test_mirror_of_a_ram_file_domain(vm_factory, mirror_dir: Path, capsys) -> None:
    """The same repair on a guest whose RAM is hvext's RAM file (/dev/shm/hvext, block hvext-ram)."""
    from hvext.memory import ramfile
    domain = vm_factory.define(memory_mib=512)
    ram = ramfile.convert(domain)
    try:
        vm_factory.boot(domain)
        assert mirror.ram_source(domain) == mirror.RamSource(ram.path, "hvext-ram", 512 << 20)
        state = start_program(domain)
        started = cli_json(capsys, "ha", "mirror", domain.name, "--interval", "60000")
        assert started["block"] == "hvext-ram" and started["source"] == str(ram.path)
        assert started["last_pages"] == (512 << 20) // PAGE
        report = cli_json(capsys, "ha", "inject-memory-error", domain.name, "--gpa", hex(state["gpas"][10]))
        assert report["exact"] and report["resumed"], report
        assert ask(domain, "sum", 1)["now"] == state["sha"]
        state = ask(domain, "write 11", 2)
        report = cli_json(capsys, "ha", "inject-memory-error", domain.name, "--gpa", hex(state["gpas"][11]),
                          "--readable")
        assert report["exact"] and report["dirty_since_sync"], report
        assert ask(domain, "sum", 3)["now"] == state["sha"]
        assert cli(capsys, "ha", "mirror", domain.name, "--stop")[0] == 0
    finally:
        if domain.is_active():
            domain.destroy()
        ramfile.remove(ram)
        try:  # its directory, /dev/shm/hvext/<domain>, if now empty
            ram.path.parent.rmdir()
        except OSError:
            pass


def test_hvextd_syncs_a_registered_mirror(vm_factory, capsys) -> None:
    """The real daemon (a process, the host's STATE_DIR: it reaches the domain's QMP monitor there) keeps
    the mirror registered by `hvext ha mirror` in sync at its interval."""
    from tests.vm.test_daemon import Hvextd
    domain = vm_factory.define(memory_mib=512, swap_file=True)
    vm_factory.boot(domain)
    state = start_program(domain)
    daemon: Hvextd | None = None
    started = cli_json(capsys, "ha", "mirror", domain.name, "--interval", "200")
    try:
        copy = Path(started["target"])
        daemon = Hvextd()
        daemon.expect("watching")
        time.sleep(3)
        (row,) = [r for r in cli_json(capsys, "ha", "mirror-status") if r["uuid"] == domain.uuid()]
        logged = []
        while not daemon.lines.empty():
            logged.append(daemon.lines.get())
        assert row["state"] == "active" and row["syncs"] - started["syncs"] >= 5, (row["error"], logged, row)
        assert row["lag_seconds"] < 2 and row["full_syncs"] == 1, row
        state = ask(domain, "write 20", 1)
        time.sleep(1.5)
        assert page_of(copy, state["gpas"][20]) == page_of(swapfile.domain_file(domain), state["gpas"][20])
        assert daemon.stop() == 0
        daemon = None
    finally:
        if daemon is not None:
            daemon.proc.kill()
            daemon.proc.wait()
        cli(capsys, "ha", "mirror", domain.name, "--stop")
        (mirror.mirror_root() / f"{domain.uuid()}.lock").unlink(missing_ok=True)  # the host's STATE_DIR
    assert not Path(started["target"]).exists()
