"""Per-VM swap files and the swap reservation (hvext.memory.swapfile) on real files: FIEMAP, fallocate, punch.

The reservation lives in a temporary STATE_DIR on the same file system as
the stand-in VM files (the test's own files, grown the way QEMU's writeback
grows a guest's file). Defragmentation runs on an ext4 image the test makes
and loop-mounts (removed afterwards).
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext import paths
from hvext.errors import DomainStateError, HostError, UnsupportedError, UsageError
from hvext.memory import swap, swapfile
from hvext.memory.swapfile import FIEMAP_EXTENT_LAST, FIEMAP_EXTENT_UNWRITTEN, Extent, FiemapError
from tests.support import missing

MIB = 1 << 20
BLOCK = 4096


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(paths, "STATE_DIR", tmp_path / "state")
    return tmp_path


def sparse_file(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    return fd


def write_at(fd: int, offset: int, length: int) -> None:
    """Grow a file as writeback does: data written into a hole, made durable."""
    os.pwrite(fd, b"\xa5" * length, offset)
    os.fsync(fd)


# -- FIEMAP ---------------------------------------------------------------


def filled(start: int, extents: list[tuple[int, int, int, int]], asked: int = 4) -> bytearray:
    """A FIEMAP buffer as the kernel fills it: *extents* of (logical, physical, length, flags)."""
    buf = swapfile.fiemap_request(start, asked)
    swapfile._FIEMAP_HEAD.pack_into(buf, 0, start, 0, 0, len(extents), asked, 0)
    for index, (logical, physical, length, flags) in enumerate(extents):
        swapfile._FIEMAP_EXTENT.pack_into(buf, swapfile._FIEMAP_HEAD.size + index * swapfile._FIEMAP_EXTENT.size,
                                          logical, physical, length, 0, 0, flags, 0, 0, 0)
    return buf


def test_fiemap_buffer_parses_into_extents() -> None:
    buf = filled(0, [(0, 1 << 30, 8192, 0), (1 * MIB, (1 << 30) + 8192, 4096, FIEMAP_EXTENT_UNWRITTEN),
                     (2 * MIB, 5 << 30, 4096, FIEMAP_EXTENT_LAST)])
    found, last = swapfile.parse_fiemap(buf, 0)
    assert last
    assert found == [Extent(0, 1 << 30, 8192, 0), Extent(MIB, (1 << 30) + 8192, 4096, FIEMAP_EXTENT_UNWRITTEN),
                     Extent(2 * MIB, 5 << 30, 4096, FIEMAP_EXTENT_LAST)]
    assert [e.unwritten for e in found] == [False, True, False]
    assert swapfile.fragments(found) == 2  # the first two follow each other on disk, as filefrag counts
    assert swapfile.parse_fiemap(filled(0, []), 0) == ([], False)


@pytest.mark.parametrize("extents, start, message", [
    ([(0, 0, 0, 0)], 0, "empty"),
    ([(0, 0, 8192, 0), (4096, 0, 4096, 0)], 0, "overlaps"),
    ([(0, 0, 4096, FIEMAP_EXTENT_LAST), (8192, 0, 4096, 0)], 0, "marked last"),
    ([(0, 0, 4096, 0)], 8192, "ends before"),
])
def test_nonsense_fiemap_is_refused(extents, start, message) -> None:
    with pytest.raises(FiemapError, match=message):
        swapfile.parse_fiemap(filled(start, extents), start)


def test_fiemap_count_beyond_the_request_is_refused() -> None:
    buf = filled(0, [(0, 0, 4096, 0)], asked=1)
    swapfile._FIEMAP_HEAD.pack_into(buf, 0, 0, 0, 0, 5, 1, 0)
    with pytest.raises(FiemapError, match="mapped 5 extents, 1 asked"):
        swapfile.parse_fiemap(buf, 0)
    with pytest.raises(FiemapError, match="shorter than its header"):
        swapfile.parse_fiemap(b"\0" * 8, 0)


def test_extents_of_a_real_sparse_file(tmp_path: Path) -> None:
    fd = sparse_file(tmp_path / "f", 64 * MIB)
    try:
        assert swapfile.file_info(fd, "f").allocated == 0
        for index in range(700):  # more extents than one FIEMAP batch: every other 4 KiB block
            os.pwrite(fd, b"x" * BLOCK, index * 2 * BLOCK)
        os.fsync(fd)
        os.posix_fallocate(fd, 32 * MIB, 1 * MIB)
        found = swapfile.file_info(fd, "f")
        assert (found.apparent, found.allocated, found.unwritten) == (64 * MIB, 700 * BLOCK + MIB, MIB)
        assert found.extents == 701
        du = int(subprocess.run(["du", "-B1", str(tmp_path / "f")], capture_output=True, text=True,
                                check=True).stdout.split()[0])
        # du counts st_blocks, which also holds ext4's extent tree blocks: FIEMAP counts the file's data alone
        assert 0 <= du - found.allocated <= 16 * BLOCK
    finally:
        os.close(fd)


# -- the VM's file: found through QEMU's mapping -----------------------------


def test_guest_ram_file_is_the_shared_mapping_of_that_size(tmp_path: Path) -> None:
    ram = 3 * MIB + 5 * BLOCK  # a size no other mapping of this process has
    fd = sparse_file(tmp_path / "ram-node0", ram)
    shared = mmap.mmap(fd, ram, mmap.MAP_SHARED)
    try:
        assert swapfile.guest_ram_file(os.getpid(), ram) == tmp_path / "ram-node0"
        with pytest.raises(DomainStateError, match="not in a file"):
            swapfile.guest_ram_file(os.getpid(), ram + BLOCK)
        # renamed: the mapping names the file where it is now
        os.rename(tmp_path / "ram-node0", tmp_path / "old")
        sparse_file(tmp_path / "ram-node0", ram)
        assert swapfile.guest_ram_file(os.getpid(), ram) == tmp_path / "old"
        # removed, and a file planted under the name the kernel shows for it: not taken for the guest's
        (tmp_path / "old").unlink()
        sparse_file(tmp_path / "old (deleted)", ram)
        with pytest.raises(DomainStateError):
            swapfile.guest_ram_file(os.getpid(), ram)
    finally:
        shared.close()
        os.close(fd)


def test_private_mapping_is_not_a_swap_file(tmp_path: Path) -> None:
    ram = 2 * MIB + 3 * BLOCK
    fd = sparse_file(tmp_path / "ram", ram)
    private = mmap.mmap(fd, ram, mmap.MAP_PRIVATE)
    try:
        with pytest.raises(DomainStateError):  # written pages of a private mapping go to host swap
            swapfile.guest_ram_file(os.getpid(), ram)
    finally:
        private.close()
        os.close(fd)


# -- the reservation --------------------------------------------------------


def test_reservation_is_thick_private_and_made_once(state: Path) -> None:
    made = swapfile.create_reservation(16 * MIB + 100)
    path = swapfile.reservation_path()
    assert (made.apparent, made.allocated) == (16 * MIB, 16 * MIB)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(UsageError, match="exists already"):
        swapfile.create_reservation(16 * MIB)
    swapfile.remove_reservation()
    assert not path.exists()
    with pytest.raises(UsageError, match="at least 1 MiB"):
        swapfile.create_reservation(4096)


def test_reservation_never_follows_a_link_or_trusts_a_shared_file(state: Path) -> None:
    swapfile.swap_dir()
    target = state / "victim"
    target.write_bytes(b"keep")
    swapfile.reservation_path().symlink_to(target)
    with pytest.raises(UsageError):  # O_EXCL: an existing name (a link) is never opened
        swapfile.create_reservation(4 * MIB)
    with pytest.raises(HostError, match="cannot open"):
        swapfile.status({})
    assert target.read_bytes() == b"keep"
    swapfile.reservation_path().unlink()
    swapfile.reservation_path().write_bytes(b"")
    swapfile.reservation_path().chmod(0o644)
    with pytest.raises(HostError, match="private"):
        swapfile.rebalance({})


def test_no_space_leaves_no_reservation_behind(state: Path) -> None:
    free = shutil.disk_usage(state).free
    with pytest.raises(HostError, match="No space left"):
        swapfile.create_reservation(free + 1024 * MIB)
    assert not swapfile.reservation_path().exists()


def test_rebalance_punches_as_vm_files_grow_and_refills_when_they_go(state: Path) -> None:
    swapfile.create_reservation(32 * MIB)
    files = {"a": state / "a", "b": state / "b"}
    fa, fb = sparse_file(files["a"], 256 * MIB), sparse_file(files["b"], 256 * MIB)
    try:
        write_at(fa, 100 * MIB, 3 * MIB)
        write_at(fb, 7 * MIB, 1 * MIB)
        before = swapfile.status(files).balance
        assert (before.reservation, before.vm_sum, before.drift) == (32 * MIB, 4 * MIB, 4 * MIB)
        done = swapfile.rebalance(files)
        assert done.move is not None and done.move.punch == 4 * MIB
        assert done.balance.conserved and done.balance.held == 32 * MIB
        assert swapfile.info(swapfile.reservation_path()).allocated == 28 * MIB  # real blocks, not a ledger
        assert swapfile.rebalance(files).move.idle
        # a VM stops: libvirt removes its file; the reservation takes its blocks again
        os.close(fb)
        fb = -1
        files["b"].unlink()
        done = swapfile.rebalance(files)
        assert done.move.refill == 1 * MIB and done.balance.held == 32 * MIB and done.vms.keys() == {"a"}
        assert "b:" in done.notes[0]
        # growing beyond the total: the reservation empties, the rest is a shortfall
        write_at(fa, 0, 40 * MIB)
        done = swapfile.rebalance(files)
        assert done.balance.reservation == 0 and done.balance.shortfall == 11 * MIB and done.balance.conserved
        assert any("more than the reservation" in n for n in done.notes)
    finally:
        os.close(fa)
        if fb >= 0:
            os.close(fb)


def _grow_and_rebalance(files: dict[str, str], mine: str, rounds: int, queue: multiprocessing.Queue) -> None:
    """One VM's growth in a separate process: write 64 KiB into a hole, then rebalance; report the balances."""
    fd = os.open(files[mine], os.O_RDWR)
    drifts = []
    try:
        for index in range(rounds):
            write_at(fd, (index * 2 + (mine == "b")) * 64 * 1024, 64 * 1024)
            done = swapfile.rebalance({k: Path(v) for k, v in files.items()})
            drifts.append(done.balance.drift)
            drifts.append(swapfile.status({k: Path(v) for k, v in files.items()}).balance.drift)
    except Exception as err:  # reported to the test, which fails with it
        queue.put((mine, repr(err)))
        return
    finally:
        os.close(fd)
    queue.put((mine, drifts))


def test_balance_is_conserved_under_concurrent_growth_of_two_vms(state: Path) -> None:
    """Two VMs grow and rebalance at once, in two processes: no growth is punched twice, none lost.

    Without the lock, two rebalances that read the same reservation both
    punch for the same growth: the reservation then holds less than the
    total minus the VMs (a negative drift), which this test sees.
    """
    total = 64 * MIB
    swapfile.create_reservation(total)
    files = {"a": str(state / "a"), "b": str(state / "b")}
    for path in files.values():
        os.close(sparse_file(Path(path), 256 * MIB))
    rounds = 150
    context = multiprocessing.get_context("fork")  # the workers keep the test's STATE_DIR
    queue = context.Queue()
    workers = [context.Process(target=_grow_and_rebalance, args=(files, name, rounds, queue)) for name in files]
    for worker in workers:
        worker.start()
    results = dict(queue.get(timeout=120) for _ in workers)
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    for name, drifts in results.items():
        assert isinstance(drifts, list), drifts
        # each rebalance leaves the sum at the total as it read the VMs; growth not yet seen is positive
        assert min(drifts) >= 0, (name, min(drifts))
    final = swapfile.rebalance({k: Path(v) for k, v in files.items()}).balance
    assert final.vm_sum == 2 * rounds * 64 * 1024
    assert final.reservation == total - final.vm_sum and final.drift == 0


# -- defragmentation on a loop-mounted ext4 --------------------------------


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A fresh 32 MiB ext4 file system, loop-mounted for the test and removed afterwards."""
    for tool in ("mkfs.ext4", "mount", "umount", swapfile.E4DEFRAG):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (e2fsprogs, mount)")
    if os.geteuid() != 0:
        missing("loop-mounting an ext4 image needs root")
    image, mountpoint = tmp_path / "ext4.img", tmp_path / "mnt"
    with open(image, "wb") as handle:
        handle.truncate(32 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-N", "12000", str(image)], check=True, capture_output=True)
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, text=True)
    if mounted.returncode != 0:
        missing(f"cannot loop-mount an ext4 image here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)  # -o loop: the loop device goes with it


def fragmented_file(mountpoint: Path) -> Path:
    """A 4 MiB file written when the file system's free space was all 4 KiB holes."""
    fillers = []
    for index in range(100_000):
        path = mountpoint / f"f{index}"
        try:
            path.write_bytes(b"x" * BLOCK)
        except OSError:
            path.unlink(missing_ok=True)
            break
        fillers.append(path)
    os.sync()
    for path in fillers[::2]:
        path.unlink()
    os.sync()
    vm = mountpoint / "ram-node0"
    fd = sparse_file(vm, 32 * MIB)
    try:
        write_at(fd, 0, 4 * MIB)
    finally:
        os.close(fd)
    for path in fillers[1::2]:
        path.unlink()
    os.sync()
    return vm


def test_defragment_reduces_the_fragments_of_a_file(ext4: Path) -> None:
    vm = fragmented_file(ext4)
    data = vm.read_bytes()
    assert swapfile.filesystem_type(vm) == "ext4" and swapfile.defrag_support(vm) == ""
    done = swapfile.defragment(vm)
    assert done.before.fragments > 100, done.before
    assert done.after.fragments < done.before.fragments // 10, done.after
    assert done.after.allocated == done.before.allocated == 4 * MIB
    assert vm.read_bytes() == data


def test_defragment_is_refused_off_ext4(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if swapfile.filesystem_type(shm) != "tmpfs":
        missing("/dev/shm is not a tmpfs here")
    assert "not ext4" in swapfile.defrag_support(shm)
    path = shm / f"hvext-unit-{os.getpid()}"
    path.write_bytes(b"x")
    try:
        with pytest.raises(UnsupportedError, match="tmpfs, not ext4"):
            swapfile.defragment(path)
    finally:
        path.unlink()


def test_hvextds_round_rebalances_the_reservation(state: Path) -> None:
    """Each reclaim round rebalances: here a VM's file went away (its blocks were punched), so the round refills."""
    from hvext import aio
    from hvext.daemon import reclaim_loop
    from hvext.host import Host

    config = reclaim_loop.ReclaimConfig(host_available_min_mib=0)
    with Host("test:///default") as host:
        assert reclaim_loop.rebalance_swap(host) is None  # no reservation: nothing to do
        swapfile.create_reservation(8 * MIB)
        fd = os.open(swapfile.reservation_path(), os.O_RDWR)
        try:
            swapfile._fallocate(fd, swapfile.FALLOC_FL_PUNCH_HOLE | swapfile.FALLOC_FL_KEEP_SIZE, 0, 3 * MIB, "test")
        finally:
            os.close(fd)
        assert swapfile.info(swapfile.reservation_path()).allocated == 5 * MIB
        assert aio.run(reclaim_loop.one_round(host, config)) == []
    assert swapfile.info(swapfile.reservation_path()).allocated == 8 * MIB


def test_a_file_written_through_a_live_shared_mapping(ext4: Path) -> None:
    """What a guest's file is like: written through a shared mapping that stays mapped.

    Linux 6.18 refuses EXT4_IOC_MOVE_EXT on it (EPERM); hvext then says the
    kernel refused and leaves the file as it was. A kernel that moves it must
    leave the data intact and the file no more fragmented.
    """
    vm = fragmented_file(ext4)
    fd = os.open(vm, os.O_RDWR)
    mapped = mmap.mmap(fd, 4 * MIB, mmap.MAP_SHARED)
    try:
        for offset in range(0, 4 * MIB, BLOCK):
            mapped[offset] = offset // BLOCK % 251
        mapped.flush()
        data = bytes(mapped)
        before = swapfile.info(vm)
        try:
            done = swapfile.defragment(vm)
        except UnsupportedError as err:
            assert "EXT4_IOC_MOVE_EXT: Operation not permitted" in str(err)
            assert swapfile.info(vm) == before
        else:
            assert done.after.fragments <= before.fragments and done.after.allocated == before.allocated
        assert not list(ext4.glob("*.defrag"))
        assert bytes(mapped) == data
    finally:
        mapped.close()
        os.close(fd)
    assert swapfile.defragment(vm).after.fragments < before.fragments // 10  # unmapped, it defragments


def _page_out(buf: mmap.mmap, size: int) -> None:
    """Dirty every page of *buf*, then push it out of RAM (MADV_PAGEOUT on this process)."""
    import ctypes
    for offset in range(0, size, 4096):
        buf[offset] = 0xA5
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    pidfd = os.pidfd_open(os.getpid())
    try:
        done = swap.process_madvise(pidfd, [(address, size)], swap.MADV_PAGEOUT)
    finally:
        os.close(pidfd)
    assert done == size, os.strerror(-done) if done < 0 else done


def test_mapping_residency_counts_host_swap_of_private_copies_never_of_a_shared_file(tmp_path: Path) -> None:
    """What the swapfile VM test asserts of guest RAM: a MAP_SHARED file mapping (libvirt's
    memory_backing_dir) paged out leaves nothing in host swap, its pages go to the file; a MAP_PRIVATE
    one's written pages are anonymous and do go to swap, and are counted as the mapping's."""
    if not any(line.startswith("SwapTotal:") and int(line.split()[1]) > 0
               for line in Path("/proc/meminfo").read_text().splitlines()):
        missing("no host swap (`make setup` creates a swap file)")
    size = 8 * MIB
    found = {}
    for name, flags in (("shared", mmap.MAP_SHARED), ("private", mmap.MAP_PRIVATE)):
        path = tmp_path / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            buf = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        try:
            _page_out(buf, size)
            found[name] = swapfile.mapping_residency(os.getpid(), path)
        finally:
            buf.close()
    assert found["shared"]["swap"] == 0 and found["shared"]["rss"] < size // 2, found
    assert swapfile.info(tmp_path / "shared").allocated == size  # written back to the file
    assert found["private"]["swap"] >= size // 2, found
    assert swapfile.info(tmp_path / "private").allocated == 0  # the file never saw the writes
