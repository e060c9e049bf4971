"""Persistence hints and epochs on a real guest (C15): a power-loss save freezes the guest's
application at an epoch boundary (crash consistent), skips volatile ranges, and restores
every byte of the persistent ones; hints outside the guest's devices are rejected."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext import aio
from hvext.host import Domain, RunState
from hvext.pmem import hints
from tests.vm.helpers import cli, cli_json, guest_exec, guest_sh, protected_pmem_vm

MIB = 1 << 20
APP = r'''
import mmap, os, sys, time
from hvext_agent import hints
size = 4 << 20
files = {}
for name in ("persistent", "volatile"):
    path = f"/mnt/pm/{name}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"\x01" * size)        # allocate real blocks (FIEMAP needs extents)
    os.fsync(fd)
    files[name] = mmap.mmap(fd, size)
    hints.declare(path, name)
p, v = files["persistent"], files["volatile"]
i = 0
while True:
    i += 1
    p[0:8] = i.to_bytes(8, "little")      # a two-part update: only consistent at an epoch
    time.sleep(0.02)
    p[4096:4104] = i.to_bytes(8, "little")
    v[1 << 20:(1 << 20) + 8] = i.to_bytes(8, "little")  # well inside: saves work in 64 KiB blocks
    p.flush()
    hints.epoch("/mnt/pm/persistent")
'''


@pytest.fixture(scope="module", params=["nvdimm", "virtio-pmem"])
def hinted_vm(request, vm_factory_module, tmp_path_factory) -> Iterator[tuple[Domain, Path]]:
    yield from protected_pmem_vm(vm_factory_module, request.param, tmp_path_factory.mktemp("hints-store") / "store")


def test_epoch_consistent_save_skips_volatile_ranges(hinted_vm, capsys) -> None:
    domain, backing = hinted_vm
    assert cli(capsys, "pmem-mount", domain.name, "pmem0", "/mnt/pm", "--format")[0] == 0
    guest_exec(domain, "sh", "-c", "cat > /run/app.py", stdin=APP)
    guest_sh(domain, "setsid python3 /run/app.py >/run/app.log 2>&1 </dev/null &")
    deadline = time.monotonic() + 60
    while True:
        report = cli_json(capsys, "pmem-hints", domain.name)
        (device,) = report["devices"].values()
        if device["epochs"] > 3 and device["bytes"]["volatile"] >= 4 * MIB or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert device["bytes"]["persistent"] >= 4 * MIB and device["bytes"]["volatile"] >= 4 * MIB, report
    assert device["epochs"] > 3 and not report["rejected"], report

    # TCG on a busy host: the agent's freeze (it re-reads every hint while it waits) can outlast the default budget
    status, out, err = cli(capsys, "power", "loss", "--domain", domain.name, "--budget", "30", "--json")
    assert status == 0, err
    (saved,) = [d for d in json.loads(out)["devices"] if d["domain"] == domain.name]
    assert saved["epoch"]["epoch_consistent"] is True, saved["epoch"]
    assert saved["epoch"]["volatile_bytes_skipped"] >= 4 * MIB, saved

    domain.destroy()
    backing.unlink()  # the power goes: /dev/shm is lost
    status, out, err = cli(capsys, "power", "restore", "--domain", domain.name, "--json")
    assert status == 0, err
    aio.run(domain.wait_agent(240))
    assert cli(capsys, "pmem-mount", domain.name, "pmem0", "/mnt/pm")[0] == 0
    values = json.loads(guest_exec(domain, "python3", "-c",
                                   "import json\n"
                                   "p = open('/mnt/pm/persistent', 'rb').read(4104)\n"
                                   "v = open('/mnt/pm/volatile', 'rb').read((1 << 20) + 8)[1 << 20:]\n"
                                   "print(json.dumps([int.from_bytes(p[0:8], 'little'), "
                                   "int.from_bytes(p[4096:4104], 'little'), v.hex()]))")["stdout"])
    first, second, volatile = values
    assert first == second > 3, values  # frozen at an epoch: both halves of the last update
    assert volatile == "00" * 8, (values, saved)  # volatile range was not saved: it comes back empty
    # (blocks a volatile range only partly covers are kept: a save never drops other data)


def test_a_guest_frozen_for_a_pause_that_fails_is_thawed(hinted_vm, capsys, monkeypatch) -> None:
    """The guest's application is held at an epoch for the pause; the pause fails (injected: libvirt
    refuses the suspend); hvext thaws the guest at once, so the application goes on."""
    import libvirt

    from hvext.host import Host
    from hvext.pmem import power
    domain, _ = hinted_vm
    if not domain.is_active():
        assert cli(capsys, "start", domain.name, "--wait-agent", "240")[0] == 0
    if guest_exec_status(domain, "mountpoint -q /mnt/pm") != 0:
        assert cli(capsys, "pmem-mount", domain.name, "pmem0", "/mnt/pm")[0] == 0
    guest_exec(domain, "sh", "-c", "cat > /run/app.py", stdin=APP)
    guest_sh(domain, "setsid python3 /run/app.py >/run/app.log 2>&1 </dev/null &")
    try:
        first = progress(domain)
        deadline = time.monotonic() + 60
        while progress(domain) < first + 3 and time.monotonic() < deadline:
            time.sleep(0.5)

        class SuspendFails:
            """libvirt's handle of the domain, except that suspend is refused (fault injection)."""

            def __init__(self, dom: libvirt.virDomain) -> None:
                self._dom = dom

            def __getattr__(self, name: str):
                return getattr(self._dom, name)

            def suspend(self) -> int:
                raise libvirt.libvirtError("injected: suspend refused")

        with Host() as host:
            handle = host.lookup(domain.name)
            handle.dom = SuspendFails(handle.dom)  # type: ignore[assignment]
            monkeypatch.setattr(host, "lookup", lambda name: handle)
            report = power.power_loss(host, hints=hints.PROVIDER, domains=[domain.name], budget=30)
        (entry,) = report["devices"]
        assert "suspend refused" in entry.get("error", "") and entry["epoch"]["epoch_consistent"] is True, report
        assert domain.state is RunState.RUNNING
        held = progress(domain)
        time.sleep(2)
        assert progress(domain) > held, "the application is still frozen at its epoch"  # thawed, not held 60 s
        assert guest_exec_status(domain, "test -e /run/hvext/hints/freeze") != 0
    finally:
        guest_sh(domain, "pkill -f 'python3 /run/app[.]py' || true")


def progress(domain: Domain) -> int:
    """The hinting application's update counter (the first 8 bytes of its persistent file)."""
    out = guest_exec(domain, "python3", "-c", "print(int.from_bytes(open('/mnt/pm/persistent', 'rb').read(8), "
                                              "'little'))")
    return int(out["stdout"])


def guest_exec_status(domain: Domain, command: str) -> int:
    async def run() -> int:
        async with domain.agent(timeout=60) as agent:
            return (await agent.exec(["sh", "-c", command], timeout=50)).exitcode
    return aio.run(run())
