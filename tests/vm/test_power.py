"""Power loss on real guests (C12): PMEM in /dev/shm saved to disk, /dev/shm wiped, restored, guest sees its bytes."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext import aio
from hvext.host import Domain, RunState
from hvext.pmem import power
from hvext.pmem.store import Store
from hvext.units import MIB
from tests.vm.helpers import cli, guest_exec, protected_pmem_vm

SIZE = 64 * MIB
BLOCK = 64 * 1024


def guest_write(domain: Domain, offset: int, length: int, seed: int) -> bytes:
    """Block writes to /dev/pmem0 in the guest, then fsync (reaches the device's memory)."""
    guest_exec(domain, "python3", "-c",
          "import os, random\n"
          f"data = random.Random({seed}).randbytes({length})\n"
          "fd = os.open('/dev/pmem0', os.O_RDWR)\n"
          f"os.pwrite(fd, data, {offset})\n"
          "os.fsync(fd)\n")
    return random.Random(seed).randbytes(length)


def guest_sha256(domain: Domain) -> str:
    """SHA-256 of the whole device as the guest reads it (O_DIRECT-free: fresh boot or dropped caches)."""
    out = guest_exec(domain, "python3", "-c",
                "import hashlib, os\n"
                "open('/proc/sys/vm/drop_caches', 'w').write('3')\n"
                "h = hashlib.sha256()\n"
                "with open('/dev/pmem0', 'rb') as f:\n"
                "    for chunk in iter(lambda: f.read(1 << 20), b''):\n"
                "        h.update(chunk)\n"
                "print(h.hexdigest())\n")
    return out["stdout"].strip()


@pytest.fixture(scope="module", params=["nvdimm", "virtio-pmem"])
def protected_vm(request: pytest.FixtureRequest, vm_factory_module, tmp_path_factory) -> Iterator[
        tuple[Domain, Path]]:
    """A guest with a 64 MiB volatile-backed pmem device of each type, protected by a store on disk."""
    yield from protected_pmem_vm(vm_factory_module, request.param,
                                 tmp_path_factory.mktemp("power-store") / "store")


def test_power_loss_wipe_restore_and_incremental_save(protected_vm: tuple[Domain, Path], capsys) -> None:
    domain, backing = protected_vm
    assert str(backing).startswith("/dev/shm/")
    written = guest_write(domain, 4 * MIB, MIB, seed=1)
    expected = bytearray(SIZE)
    expected[4 * MIB:5 * MIB] = written

    # 1. power loss: guest paused, the changed blocks saved (this QEMU run had no dirty log yet: hashes)
    status, out, err = cli(capsys, "power", "loss", "--domain", domain.name, "--json")
    assert status == 0, err
    (saved,) = [d for d in json.loads(out)["devices"] if d["domain"] == domain.name]
    assert saved["blocks_written"] == MIB // BLOCK and saved["bytes_written"] == MIB, saved
    assert domain.state is RunState.PAUSED

    # 2. the power goes: QEMU dies, /dev/shm is wiped
    domain.destroy()
    backing.unlink()

    # 3. power is back: the backing is rebuilt from the store and the guest started
    status, out, err = cli(capsys, "power", "restore", "--domain", domain.name, "--json")
    assert status == 0, err
    (restored,) = [d for d in json.loads(out)["domains"] if d["domain"] == domain.name]
    assert restored["action"] == "started" and restored["devices"][0]["action"] == "restored", restored
    assert hashlib.sha256(backing.read_bytes()).hexdigest() == hashlib.sha256(expected).hexdigest()
    aio.run(domain.wait_agent(240))
    assert guest_sha256(domain) == hashlib.sha256(expected).hexdigest()

    # 4. a small change: the next save writes one block, found by the dirty log (restore started it)
    small = guest_write(domain, 10 * MIB + 8192, 4096, seed=2)
    expected[10 * MIB + 8192:10 * MIB + 12288] = small
    status, out, err = cli(capsys, "power", "loss", "--domain", domain.name, "--json")
    assert status == 0, err
    (saved,) = [d for d in json.loads(out)["devices"] if d["domain"] == domain.name]
    assert saved["mode"] == "dirty-log" and saved["blocks_written"] == 1 and saved["bytes_written"] == BLOCK, saved
    assert saved["blocks_checked"] < 64, saved  # only the dirty blocks were read, not all 1024
    status, out, err = cli(capsys, "power", "restore", "--domain", domain.name, "--json")  # QEMU survived: resume only
    assert status == 0, err
    assert domain.state is RunState.RUNNING
    assert guest_sha256(domain) == hashlib.sha256(expected).hexdigest()
    store = Store.open(Path(next(r.store for r in power.registrations() if r.domain == domain.name)))
    assert not store.differs(backing)


SAVER_KILLED_MID_SAVE = r"""
import sys, time
from hvext.host import Host
from hvext.pmem import power, store

original = store.Store.save

def save(self, *args, **kwargs):
    def hook(where, n):
        if where == "block":
            print("saving", flush=True)
            time.sleep(3600)  # the power dies here: the parent SIGKILLs us
    kwargs["hook"] = hook
    return original(self, *args, **kwargs)

store.Store.save = save
with Host() as host:
    power.power_loss(host, hints=None, domains=[sys.argv[1]])
"""


def test_interrupted_save_keeps_the_previous_copy(protected_vm: tuple[Domain, Path], capsys) -> None:
    import signal
    import subprocess
    import sys
    domain, backing = protected_vm
    if not domain.is_active():
        assert cli(capsys, "start", domain.name, "--wait-agent", "240")[0] == 0
    good = guest_write(domain, 20 * MIB, MIB, seed=11)
    assert cli(capsys, "power", "loss", "--domain", domain.name, "--json")[0] == 0       # the last good copy
    assert cli(capsys, "power", "restore", "--domain", domain.name, "--json")[0] == 0    # resumed
    expected_region = good
    guest_write(domain, 20 * MIB, MIB, seed=12)                  # newer data, never saved completely
    saver = subprocess.Popen([sys.executable, "-c", SAVER_KILLED_MID_SAVE, domain.name], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert saver.stdout is not None and saver.stdout.readline().strip() == "saving"
    finally:
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    domain.destroy()       # the host is off: QEMU and /dev/shm are gone
    backing.unlink()
    status, out, err = cli(capsys, "power", "restore", "--domain", domain.name, "--json")
    assert status == 0, err
    assert backing.read_bytes()[20 * MIB:21 * MIB] == expected_region  # the previous copy, not a mix
    assert cli(capsys, "start", domain.name, "--wait-agent", "240")[0] == 0
    sha = aio.run(_region_sha(domain, 20 * MIB, MIB))
    assert sha == hashlib.sha256(expected_region).hexdigest()


async def _region_sha(domain: Domain, offset: int, length: int) -> str:
    async with domain.agent(timeout=60) as agent:
        result = await agent.exec(["python3", "-c", "import hashlib, os\n"
                                                    "open('/proc/sys/vm/drop_caches', 'w').write('3')\n"
                                                    "f = open('/dev/pmem0', 'rb')\n"
                                                    f"f.seek({offset})\n"
                                                    f"print(hashlib.sha256(f.read({length})).hexdigest())\n"],
                                  timeout=60)
    return result.stdout.strip()


def test_hvextd_restores_at_host_start(protected_vm: tuple[Domain, Path], capsys) -> None:
    from tests.vm.test_daemon import Hvextd
    domain, backing = protected_vm
    if not domain.is_active():
        assert cli(capsys, "start", domain.name, "--wait-agent", "240")[0] == 0
    written = guest_write(domain, 30 * MIB, 64 * 1024, seed=21)
    assert cli(capsys, "power", "loss", "--domain", domain.name, "--json")[0] == 0
    domain.destroy()      # the host goes down ...
    backing.unlink()
    daemon = Hvextd()     # ... and comes back: hvextd starts
    try:
        daemon.expect(f"power restore: {domain.name}: started", timeout=60)
    finally:
        daemon.stop()
    aio.run(domain.wait_agent(240))
    assert aio.run(_region_sha(domain, 30 * MIB, 64 * 1024)) == hashlib.sha256(written).hexdigest()


def test_undefine_drops_the_registration_and_keeps_the_store(vm_factory, tmp_path: Path, capsys) -> None:
    domain = vm_factory.define(memory_mib=512)
    store = tmp_path / "store"
    status, _, err = cli(capsys, "pmem-attach", domain.name, "--size", "16M", "--volatile-backing",
                         "--store", str(store))
    assert status == 0, err
    (reg,) = [r for r in power.registrations() if r.domain == domain.name]
    try:
        status, out, err = cli(capsys, "undefine", domain.name)
        assert status == 0, err
        vm_factory.domains.remove(domain)
        assert "no longer protected; store kept in" in " ".join(out.split()), out
        assert not [r for r in power.registrations() if r.uuid == reg.uuid]
        assert Store.open(store).size == 16 * MIB  # kept: `--remove-power-store` deletes it
    finally:
        power.unprotect(reg.domain, Path(reg.backing), registry_dir=None, missing_ok=True)
        Store.remove(store)
        Path(reg.backing).unlink(missing_ok=True)


STOP_AGENT = r"""
import os, signal, time
time.sleep(1)  # after the exec that started us has answered
for pid in os.listdir("/proc"):
    if pid.isdigit() and int(pid) != os.getpid():
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"hvext_agent.agent" in cmd:
            os.kill(int(pid), signal.SIGSTOP)
"""


def test_a_hung_guest_agent_delays_no_pause_beyond_the_budget(vm_factory, tmp_path: Path, capsys) -> None:
    """Two guests saved together: one guest's agent hangs (stopped: the channel takes bytes, nothing
    answers). It is paused when the budget runs out; the other is paused as soon as its agent answered."""
    import time
    from tests.vm.helpers import guest_sh
    fixtures, vms = [], []
    try:
        for label in ("hung", "good"):
            fixture = protected_pmem_vm(vm_factory, "nvdimm", tmp_path / label)
            fixtures.append(fixture)
            vms.append(next(fixture)[0])
        hung, good = vms
        guest_exec(hung, "sh", "-c", "cat > /run/stop.py", stdin=STOP_AGENT)
        guest_sh(hung, "setsid python3 /run/stop.py >/dev/null 2>&1 </dev/null &")
        time.sleep(4)
        capsys.readouterr()  # what the fixtures printed
        status, out, err = cli(capsys, "power", "loss", "--domain", hung.name, "--domain", good.name,
                               "--budget", "4", "--json")
        assert status == 0, err
        report = json.loads(out)
        devices = {d["domain"]: d for d in report["devices"]}
        assert "unavailable" in devices[hung.name]["epoch"]["hints"], report
        assert 3.5 <= devices[hung.name]["paused_after_seconds"] < 4 + 3, report
        assert "frozen" in devices[good.name]["epoch"], report  # its agent answered in time
        assert devices[good.name]["paused_after_seconds"] < devices[hung.name]["paused_after_seconds"], report
        assert hung.state is good.state is RunState.PAUSED
    finally:
        for fixture in fixtures:
            fixture.close()
