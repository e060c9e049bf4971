"""Guest RAM in a file the host keeps (the C7/C17-C19 mechanism) and suspend to RAM (C7) on a real guest.

One guest (boots are slow under TCG): it keeps a counter in RAM (a shell loop
in the guest's tmpfs /run, and 128 MiB of a pattern in a Python process),
is saved to RAM with ``hvext managedsave --to-ram`` and resumed with
``hvext start``: same processes, same boot, the counter goes on. On the way:
the host's Shmem (/proc/meminfo) against hvext's count of the VM's memory
at each step between running, saved and being resumed (counted once), a start whose RAM file is
missing (clear error, device state kept, nothing started), and x-ignore-shared
off again after the resume.
"""

from __future__ import annotations

import json
import mmap
import os
import time

import pytest

from hvext import aio
from hvext.daemon import metrics
from hvext.dirty.pages import DirtyLog, DirtyPages
from hvext.daemon.main import Daemon
from hvext.errors import HostError
from hvext.host import Host, emulator_path
from hvext.memory import demand, ramfile
from hvext.memory.host import meminfo
from hvext.pmem import devices
from tests.vm.helpers import cli, cli_json
from tests.vm.helpers import guest_sh as guest

MIB = 1 << 20
RAM_MIB = 512
FILL_MIB = 128
#: Slack between a change of the host's Shmem and of the RAM file's pages over one step (a save, a resume,
#: a destroy: seconds). Other files in /dev/shm, which other guests and tests on the machine use too, are
#: taken out of Shmem (:func:`host_shmem`, also those of other mount namespaces: lab hosts); files already
#: unlinked or memfds cannot be, hence steps rather than one baseline from before the boot.
SLACK = 24 * MIB


def host_shmem(ours: os.PathLike) -> int:
    """/proc/meminfo's Shmem without the pages of the other files in /dev/shm (made and removed meanwhile by
    other tests on the same machine), so that what is left changes with our RAM file only.

    Every mount namespace's /dev/shm is walked (a lab host has its own, hidden from this one), through a
    process in it (``/proc/PID/root``); a file seen twice is counted once."""
    ours_st = os.stat(ours)
    seen: set[tuple[int, int]] = {(ours_st.st_dev, ours_st.st_ino)}
    namespaces: dict[str, str] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                namespaces.setdefault(os.readlink(f"/proc/{pid}/ns/mnt"), pid)
            except OSError:
                pass  # gone
    others = 0
    for pid in namespaces.values():
        for directory, _, files in os.walk(f"/proc/{pid}/root/dev/shm"):
            for name in files:
                try:
                    st = os.lstat(os.path.join(directory, name))
                except OSError:
                    continue  # removed meanwhile
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    others += st.st_blocks * 512
    return meminfo("Shmem") - others
COUNTER = ("i=0; while :; do i=$((i+1)); echo $i > /run/counter.new; mv /run/counter.new /run/counter; sleep 0.1; done "
           "</dev/null >/dev/null 2>&1 & echo $! > /run/counter.pid")
FILL = ("python3 -c \"import hashlib,os,time\nb = bytearray(os.urandom(1 << 20)) * %d\n"
        "open('/run/fill.sum','w').write(hashlib.sha256(b).hexdigest())\n"
        "while True:\n  time.sleep(1)\n  s = hashlib.sha256(b).hexdigest()\n  open('/run/fill.tmp','w').write(s)\n"
        "  os.rename('/run/fill.tmp', '/run/fill.now')\" "
        "</dev/null >/dev/null 2>&1 & echo $! > /run/fill.pid" % FILL_MIB)


def snapshot(domain) -> dict[str, str]:
    out = guest(domain, "cat /proc/sys/kernel/random/boot_id /run/counter.pid /run/fill.pid /run/counter; "
                        "kill -0 $(cat /run/counter.pid) $(cat /run/fill.pid) && echo alive")["stdout"].split()
    return {"boot_id": out[0], "counter_pid": out[1], "fill_pid": out[2], "counter": out[3], "alive": out[4]}


def counted(host, domain, state: str) -> ramfile.Usage:
    """hvext's count (ramfile.usage) in *state*, the same as pool-list's figures."""
    used = ramfile.usage(domain)
    assert used.state == state, used
    assert used.file <= meminfo("Shmem"), used
    figures = demand.domain_figures(host, [domain.name])[domain.name]
    assert figures.state == state
    assert abs(figures.usage_mib * MIB - used.total) < 8 * MIB, (figures, used)
    return used


def test_suspend_to_ram_and_resume(vm_factory, host, capsys: pytest.CaptureFixture[str]) -> None:
    domain = vm_factory.define(memory_mib=RAM_MIB)
    ram = ramfile.convert(domain)
    assert ram.path == ramfile.ram_path(domain.name, host.host_id) and ram.size == RAM_MIB * MIB
    st = os.stat(ram.path)
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, host.qemu_user()[0])
    assert os.stat(ram.path.parent).st_mode & 0o777 == 0o750  # QEMU cannot create a lost file

    status, _, err = cli(capsys, "start", domain.name, "--wait-agent", "180")
    assert status == 0, err
    guest(domain, COUNTER)
    guest(domain, FILL)
    guest(domain, "for i in $(seq 240); do [ -s /run/fill.sum ] && exit 0; sleep 0.5; done; exit 1", timeout=150)
    before = snapshot(domain)
    fill_sum = guest(domain, "cat /run/fill.sum")["stdout"]

    # running: QEMU's RSS holds the file's pages; hvext counts them once
    from hvext.memory import swap
    rss = swap.process_memory(swap.qemu_pid(domain.name))["rss"]
    running = counted(host, domain, "running")
    assert running.file >= FILL_MIB * MIB
    assert running.total < rss + running.file - FILL_MIB * MIB  # not RSS + file
    sample = metrics.read_libvirt(domain)  # hvextd's figures: QEMU's own memory and the file, apart
    assert abs(sample.ram_file - running.file) < 8 * MIB and sample.qemu_rss < rss - FILL_MIB * MIB, sample

    shmem = host_shmem(ram.path)
    saved = cli_json(capsys, "managedsave", domain.name, "--to-ram")
    shmem_saved = host_shmem(ram.path) - shmem
    assert saved["to_ram"] and saved["ram_bytes"] >= FILL_MIB * MIB
    assert 0 < saved["state_bytes"] < RAM_MIB * MIB // 20, saved  # device state only
    state_file = ramfile.state_path(domain.name, host.host_id)
    assert state_file.exists() and state_file.stat().st_mode & 0o777 == 0o600
    assert not domain.is_active()
    rows = {r["name"]: r for r in cli_json(capsys, "list", "--all")}
    assert rows[domain.name]["state"] == "saved to RAM"
    info = cli_json(capsys, "dominfo", domain.name)
    assert info["state"] == "saved to RAM" and info["ram_file"]["block_id"] == "hvext-ram"
    suspended = counted(host, domain, "saved to RAM")
    assert suspended.private == 0 and suspended.file >= FILL_MIB * MIB
    # QEMU's exit freed none of the host's Shmem: the pages it had mapped were the file's, counted once
    assert abs(shmem_saved - (suspended.file - running.file)) < SLACK, (shmem_saved, running, suspended)

    # a plain libvirt start (virsh start) cannot boot over the saved memory: the file is root's meanwhile
    with pytest.raises(HostError):
        domain.start()
    assert not domain.is_active() and state_file.exists() and devices.allocated(ram.path) >= FILL_MIB * MIB

    # a start whose RAM file is gone: a clear error, nothing started, the device state kept
    aside = ram.path.with_name(ram.path.name + ".aside")
    os.rename(ram.path, aside)
    try:
        status, _, err = cli(capsys, "start", domain.name)
        assert status == 1 and "cannot resume" in err and "RAM file" in err, err
        assert not domain.is_active() and state_file.exists()
    finally:
        os.rename(aside, ram.path)

    # being resumed: QEMU runs (paused) and has touched little of its RAM; still counted once
    shmem = host_shmem(ram.path)
    started = time.monotonic()
    assert ramfile.start(domain, paused=True) == "resumed from RAM"
    resume_s = time.monotonic() - started
    shmem_resumed = host_shmem(ram.path) - shmem
    resuming = counted(host, domain, "running")
    assert abs(shmem_resumed - (resuming.file - suspended.file)) < SLACK, (shmem_resumed, suspended, resuming)
    assert resuming.file >= FILL_MIB * MIB
    domain.resume()
    assert not state_file.exists()
    caps = json.loads(domain.monitor_command("query-migrate-capabilities",
                                             json.dumps({"execute": "query-migrate-capabilities"})))["return"]
    assert {c["capability"]: c["state"] for c in caps}["x-ignore-shared"] is False  # a later save sends RAM

    aio.run(domain.wait_agent(60))
    guest(domain, "sleep 1.5")
    after = snapshot(domain)
    assert after["boot_id"] == before["boot_id"]  # no reboot
    assert (after["counter_pid"], after["fill_pid"], after["alive"]) == \
        (before["counter_pid"], before["fill_pid"], "alive")  # same processes
    assert int(after["counter"]) > int(before["counter"])  # the counter in RAM went on
    guest(domain, "rm -f /run/fill.now; for i in $(seq 120); do [ -s /run/fill.now ] && exit 0; sleep 0.5; done; "
                  "exit 1", timeout=90)
    assert guest(domain, "cat /run/fill.now")["stdout"] == fill_sum  # the 128 MiB pattern intact
    print(f"resume {resume_s:.2f} s, device state {saved['state_bytes']} bytes, save {saved['seconds']:.2f} s")

    # a guest paused when saved comes back paused (virsh's managedsave does the same)
    status, _, err = cli(capsys, "suspend", domain.name)
    assert status == 0, err
    cli_json(capsys, "managedsave", domain.name, "--to-ram")
    status, out, err = cli(capsys, "start", domain.name)
    assert status == 0 and "resumed from RAM" in out, err
    assert domain.state_and_reason()[0].value == "paused"
    status, _, err = cli(capsys, "resume", domain.name)
    assert status == 0, err
    aio.run(domain.wait_agent(60))
    assert snapshot(domain)["boot_id"] == before["boot_id"]

    # stopped for good: the RAM file gives its memory back, and the host's Shmem drops by what hvext counted
    last = counted(host, domain, "running")
    shmem = host_shmem(ram.path)
    status, _, err = cli(capsys, "destroy", domain.name)
    assert status == 0, err
    freed = shmem - host_shmem(ram.path)
    assert devices.allocated(ram.path) == 0
    assert abs(freed - last.file) < SLACK, (freed, last)


@pytest.mark.requires(emulator_path() is not None, "needs the patched QEMU (make qemu)")
def test_the_host_reads_guest_ram_in_the_file_and_the_dirty_list_names_its_block(vm_factory, host) -> None:
    """What C17-C19 build on: the RAM file is the guest's memory (file offset = offset in the RAM block
    ``hvext-ram``), and the dirty page lists name that block and the pages the guest wrote."""
    domain = vm_factory.define(memory_mib=256)
    ram = ramfile.convert(domain)
    assert ramfile.start(domain) == "booted"
    aio.run(domain.wait_agent(180))
    marker = f"hvext-ramfile-marker-{os.getpid()}-{time.time_ns()}"

    async def write_and_fetch() -> DirtyPages:
        async with domain.qmp() as qmp:
            async with DirtyLog(qmp) as dirty:
                await dirty.fetch()  # from here on
                async with domain.agent(timeout=130) as agent:
                    for command in ("python3 -c \"import time\nb = bytearray(b'%s' * 4096)\n"
                                    "open('/run/marker.ok','w').close()\ntime.sleep(600)\" "
                                    "</dev/null >/dev/null 2>&1 &" % marker,
                                    "for i in $(seq 120); do [ -e /run/marker.ok ] && exit 0; sleep 0.5; done; exit 1"):
                        result = await agent.exec(["sh", "-c", command], timeout=120)
                        assert result.exitcode == 0, result
                return await dirty.fetch()

    pages = aio.run(write_and_fetch())
    assert ramfile.BACKEND_ID in pages.blocks, sorted(pages.blocks)
    block = pages.blocks[ramfile.BACKEND_ID]
    assert block.length == ram.size and block.dirty > 0
    with open(ram.path, "rb") as handle:  # the host reads guest memory in place
        data = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        try:
            found = data.find(marker.encode() * 8)
        finally:
            data.close()
    assert found >= 0, "the guest's data is not in its RAM file"
    assert block.contains(found // pages.page_size), "the page the guest wrote is not on the dirty list"


def test_hvextd_gives_back_the_ram_file_of_a_guest_that_powered_off(vm_factory) -> None:
    """A guest that powers off by itself leaves its RAM in /dev/shm; hvextd's event handler empties the file
    (not for a stop hvext made: a save to RAM keeps it)."""
    domain = vm_factory.define(memory_mib=256)
    ram = ramfile.convert(domain)
    assert ramfile.start(domain) == "booted"
    aio.run(domain.wait_agent(180))
    assert devices.allocated(ram.path) > 0
    with Host() as own:  # the daemon's own connection and its real lifecycle events
        daemon = Daemon(None)
        daemon.host = own
        handle = own.watch(daemon._on_lifecycle, lambda reason: None)
        try:
            guest(domain, "(sleep 1; echo 1 > /proc/sys/kernel/sysrq; echo o > /proc/sysrq-trigger) "
                         "</dev/null >/dev/null 2>&1 &")  # power off now
            deadline = time.monotonic() + 60
            while (domain.is_active() or devices.allocated(ram.path)) and time.monotonic() < deadline:
                time.sleep(0.5)
        finally:
            own.unwatch(handle)
    assert not domain.is_active()
    assert devices.allocated(ram.path) == 0, "the RAM file still holds the stopped guest's memory"
