"""Hot PMEM in DRAM (C15): the actor on real mappings. This process stands in for QEMU: it maps a backing
file shared, as QEMU does, and placement advises its mapping through process_madvise as it would QEMU's."""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext.pmem import placement
from hvext.pmem.hints import DeviceHints, Hints
from hvext.pmem.placement_policy import Params

MIB = 1 << 20
SIZE = 16 * MIB


@pytest.fixture
def backing(tmp_path: Path) -> Iterator[tuple[Path, mmap.mmap]]:
    directory = tmp_path if not placement.on_tmpfs(tmp_path) else Path(tempfile.mkdtemp(dir="/var/tmp"))
    assert not placement.on_tmpfs(directory), "needs a directory on disk: pages in tmpfs have no slower tier"
    path = directory / "pmem0.img"
    with open(path, "wb") as handle:
        for index in range(SIZE // MIB):
            handle.write(bytes([index + 1]) * MIB)
        handle.flush()
        os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
    os.close(fd)
    try:
        yield path, mapping
    finally:
        mapping.close()
        if directory != tmp_path:
            shutil.rmtree(directory)


#: Read-ahead is asynchronous: on a loaded machine's disk it can take longer than the CLI's 2 s wait;
#: the wait ends as soon as the range is resident.
SETTLE_S = 30.0


def hints_for(path: Path, hot: list[tuple[int, int]]) -> Hints:
    device = DeviceHints(str(path), SIZE)
    device.ranges["hot"] = hot
    return Hints("stand-in", {str(path): device}, [], [], [], [])


def touch(mapping: mmap.mmap) -> int:
    return sum(mapping[offset] for offset in range(0, SIZE, 4096))


def test_hot_range_made_resident_cold_range_paged_out_and_no_byte_changes(backing) -> None:
    path, mapping = backing
    touch(mapping)  # everything mapped and resident, as after a guest read it all
    found = placement.devices_of(os.getpid(), hints_for(path, [(0, 4 * MIB)]), set())
    assert found[0].skipped is None and found[0].vmas, found
    report, _ = placement.place("stand-in", os.getpid(), found, 64 * MIB, None, Params(), cold="pageout", act=True,
                                settle_s=SETTLE_S)
    (device,) = report["devices"]
    assert device["before"]["cold_resident_bytes"] >= 11 * MIB, device
    assert device["after"]["cold_resident_bytes"] <= MIB, device  # paged out (written back first if dirty)
    assert device["after"]["hot_resident_bytes"] == 4 * MIB, device
    # the hot range is evicted (as under host pressure); the next round brings it back before it is read
    placement.advise(os.getpid(), [(found[0].vmas[0].start, 4 * MIB)], placement.MADV_PAGEOUT)
    assert placement.resident(path, [(0, 4 * MIB)]) <= MIB
    report, _ = placement.place("stand-in", os.getpid(), found, 64 * MIB, None, Params(), act=True, settle_s=SETTLE_S)
    assert report["devices"][0]["after"]["hot_resident_bytes"] == 4 * MIB, report
    assert report["devices"][0]["advice"]["willneed_bytes"] == 4 * MIB
    assert all(mapping[index * MIB] == index + 1 for index in range(SIZE // MIB))  # nothing lost


def test_dirty_pages_are_not_lost_by_a_pageout(backing) -> None:
    path, mapping = backing
    mapping[5 * MIB:5 * MIB + 8] = b"written!"  # dirty in the page cache, not yet in the file's blocks
    found = placement.devices_of(os.getpid(), hints_for(path, []), set())
    placement.place("stand-in", os.getpid(), found, 0, None, Params(), cold="pageout", act=True)
    os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    assert path.read_bytes()[5 * MIB:5 * MIB + 8] == b"written!"


def test_tmpfs_and_shared_backings_and_unmapped_ones_are_skipped(backing, tmp_path: Path) -> None:
    path, _ = backing
    assert "another running domain" in placement.devices_of(os.getpid(), hints_for(path, []), {str(path)})[0].skipped
    shm = Path("/dev/shm") / f"hvext-test-placement-{os.getpid()}"
    shm.write_bytes(b"\0" * 4096)
    try:
        assert "tmpfs" in placement.devices_of(os.getpid(), hints_for(shm, []), set())[0].skipped
    finally:
        shm.unlink()
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * SIZE)
    assert "no shared mapping" in placement.devices_of(os.getpid(), hints_for(other, []), set())[0].skipped


def test_cli_usage_errors_before_anything_is_touched(capsys) -> None:
    from hvext.cli.main import main
    assert main(["pmem-placement", "nosuch", "--cold", "pageout"]) == 1
    assert "error: --cold goes with --apply" in capsys.readouterr().err
    assert main(["pmem-placement", "nosuch", "--budget", "lots"]) == 1
    assert "invalid size" in capsys.readouterr().err


def test_the_daemon_loop_runs_rounds_on_a_host_without_pmem_and_stops(caplog) -> None:
    """libvirt's test driver: its running domain has no pmem device, so rounds place nothing, log no
    error, and the loop stops when told (the daemon starts it only with enabled = true)."""
    import asyncio
    import logging

    from hvext import aio
    from hvext.daemon import placement_loop
    from hvext.daemon.placement_loop import PlacementConfig
    from hvext.host import Host

    async def run_for(host: Host, seconds: float) -> bool:
        stopping = asyncio.Event()
        task = asyncio.ensure_future(placement_loop.run(host, PlacementConfig(enabled=True, interval_s=1), stopping))
        await asyncio.sleep(seconds)
        alive = not task.done()
        stopping.set()
        await asyncio.wait_for(task, 5)
        return alive

    with Host("test:///default") as host, caplog.at_level(logging.WARNING, "hvextd.placement"):
        assert aio.run(placement_loop.one_round(host, PlacementConfig(enabled=True), {})) == []
        assert aio.run(run_for(host, 0.3))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


def test_a_domain_that_vanishes_while_the_others_are_listed_is_skipped(monkeypatch) -> None:
    """The race seen under load: another VM is listed, then gone before its devices are read (libvirt's
    test driver: a transient domain destroyed after the listing, a real stale handle). Placement goes on."""
    import libvirt

    from hvext.host import Host
    with Host("test:///default") as host:
        transient = host.conn.createXML("<domain type='test'><name>hvext-gone</name><memory>8192</memory>"
                                        "<os><type>hvm</type></os></domain>", 0)
        listed = host.domains(include_inactive=False)
        assert "hvext-gone" in [d.name for d in listed]
        transient.destroy()  # transient: it is gone, not just off
        with pytest.raises(libvirt.libvirtError):
            host.conn.lookupByName("hvext-gone")
        monkeypatch.setattr(host, "domains", lambda include_inactive=True: listed)
        assert placement.others_backings(host, "mine") == set()
