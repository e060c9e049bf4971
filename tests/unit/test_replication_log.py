"""The replication log's format and the replica image's whole-epoch apply (hvext.ha.replication_log)."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvext.ha import replication_log as rl
from hvext.ha.replication_log import DeviceSpec, Log, LogError, ReplicaImage

BS = 4096


def _epoch(epoch: int, blocks: dict[int, bytes], full: bool = False, device: int = 0) -> bytes:
    return rl.encode_epoch(epoch, [rl.data_entry(device, epoch, off, data) for off, data in sorted(blocks.items())],
                           full, device)


def test_log_appends_reads_and_reopens(tmp_path: Path) -> None:
    log = Log.open(tmp_path / "d.log")
    log.append(_epoch(1, {0: b"a" * BS, BS: bytes(BS)}, full=True))
    log.append(_epoch(2, {BS: b"b" * BS}))
    assert [e.epoch for e in log.epochs] == [1, 2]
    assert log.epochs[0].full and not log.epochs[1].full
    assert [e.kind for e in log.entries(log.epochs[0])] == [rl.DATA, rl.ZERO]  # zero block: no payload
    log.close()
    assert (tmp_path / "d.log").stat().st_mode & 0o777 == 0o600
    again = Log.open(tmp_path / "d.log")
    assert [e.epoch for e in again.epochs] == [1, 2]
    assert again.entries(again.epochs[1])[0].data == b"b" * BS
    again.close()


def test_torn_tail_is_cut_at_the_last_commit(tmp_path: Path) -> None:
    path = tmp_path / "d.log"
    log = Log.open(path)
    log.append(_epoch(1, {0: b"a" * BS}))
    good = log.end
    log.close()
    whole = _epoch(2, {0: b"b" * BS, BS: b"c" * BS})
    for cut in (1, rl.ENTRY.size - 1, rl.ENTRY.size + 10, len(whole) - 1):
        with open(path, "r+b") as f:
            f.truncate(good)
            f.seek(good)
            f.write(whole[:cut])
        reopened = Log.open(path)
        assert [e.epoch for e in reopened.epochs] == [1], cut
        assert reopened.end == good == path.stat().st_size
        reopened.close()


def test_corrupt_or_hostile_entries_stop_the_reader(tmp_path: Path) -> None:
    one = _epoch(1, {0: b"a" * BS})
    two = _epoch(2, {0: b"b" * BS})
    flipped = bytearray(two)
    flipped[rl.ENTRY.size + 5] ^= 1                      # payload bit flip: CRC
    huge = bytearray(two)
    struct.pack_into("<I", huge, 24, rl.MAX_ENTRY + 1)    # length beyond the limit
    back = _epoch(1, {0: b"z" * BS})                     # an epoch that goes backwards
    lying = rl.Entry(rl.DATA, 0, 0, 2, 0, BS, b"b" * BS).encode() + \
        rl.commit_entry(2, 5, BS, False).encode()         # a commit that counts wrong
    mixed = rl.Entry(rl.DATA, 0, 0, 2, 0, BS, b"b" * BS).encode() + _epoch(3, {0: b"c" * BS})  # 2 never committed
    for bad in (bytes(flipped), bytes(huge), back, lying, mixed, b"garbage" * 10):
        epochs, scan = rl.scan_entries(one + bad)
        assert [e.epoch for e, _ in epochs] == [1] and scan.stopped and scan.valid_end == len(one)
        with pytest.raises(LogError):
            rl.parse_entries(one + bad)
    assert [e.epoch for e, _ in rl.parse_entries(one + two)] == [1, 2]


def test_appending_refuses_what_is_not_whole_newer_epochs(tmp_path: Path) -> None:
    log = Log.open(tmp_path / "d.log")
    log.append(_epoch(3, {0: b"a" * BS}))
    with pytest.raises(LogError):
        log.append(_epoch(3, {0: b"b" * BS}))
    with pytest.raises(LogError):
        log.append(_epoch(4, {0: b"b" * BS})[:-3])
    assert log.last == 3 and log.end == (tmp_path / "d.log").stat().st_size
    log.close()


def test_a_file_that_is_not_a_log_or_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.log").write_bytes(b"not a log at all, no")
    with pytest.raises(LogError):
        Log.open(tmp_path / "x.log")
    (tmp_path / "target").write_bytes(b"")
    os.symlink(tmp_path / "target", tmp_path / "link.log")
    with pytest.raises(LogError):
        Log.open(tmp_path / "link.log")


def test_drop_through_keeps_newer_epochs(tmp_path: Path) -> None:
    log = Log.open(tmp_path / "d.log")
    for n in range(1, 5):
        log.append(_epoch(n, {0: bytes([n]) * BS}))
    log.drop_through(2)
    assert [e.epoch for e in log.epochs] == [3, 4]
    assert log.entries(log.epochs[1])[0].data == bytes([4]) * BS
    log.append(_epoch(5, {0: b"5" * BS}))
    log.close()
    again = Log.open(tmp_path / "d.log")
    assert [e.epoch for e in again.epochs] == [3, 4, 5]
    again.drop_through(5)
    assert again.epochs == [] and (tmp_path / "d.log").stat().st_size == rl.FILE_HEADER.size
    again.close()


SIZE = 16 * BS
DEVICES = [DeviceSpec("pmem0", SIZE), DeviceSpec("pmem1", 8 * BS)]


def _random_epochs(seed: int, count: int) -> tuple[list[bytes], list[list[bytes]]]:
    """Encoded epochs over DEVICES (the first full) and the images after each one."""
    rng = random.Random(seed)
    state = [bytearray(d.size) for d in DEVICES]
    encoded, states = [], []
    for epoch in range(1, count + 1):
        entries = []
        for dev, spec in enumerate(DEVICES):
            blocks = range(spec.size // BS) if epoch == 1 else rng.sample(range(spec.size // BS), 3)
            for block in sorted(blocks):
                data = bytes(BS) if rng.random() < 0.2 else rng.randbytes(BS)
                state[dev][block * BS:(block + 1) * BS] = data
                entries.append(rl.data_entry(dev, epoch, block * BS, data))
        encoded.append(rl.encode_epoch(epoch, entries, epoch == 1))
        states.append([bytes(s) for s in state])
    return encoded, states


def test_replica_applies_epochs_and_a_new_stream_needs_a_full_epoch(tmp_path: Path) -> None:
    encoded, states = _random_epochs(1, 4)
    with ReplicaImage.open(tmp_path) as image:
        with pytest.raises(LogError):
            image.receive("s1", encoded[1], DEVICES)   # not full: refused
        assert image.receive("s1", encoded[0], DEVICES) == 1
        with pytest.raises(LogError):
            image.receive("s1", encoded[2], DEVICES)   # a gap (epoch 2 missing)
        assert image.receive("s1", b"".join(encoded[1:3]), DEVICES) == 3
        with pytest.raises(LogError):
            image.receive("s1", encoded[1], DEVICES)   # old epoch again
        with pytest.raises(LogError):
            image.receive("other", encoded[3], DEVICES)  # another stream must start full
        full = rl.encode_epoch(9, [rl.data_entry(0, 9, 0, b"n" * BS)], True)
        assert image.receive("other", full, DEVICES) == 9  # a new owner's full epoch replaces everything
        assert image.receive("s1", encoded[0], DEVICES) == 1  # and the old stream again needs a full one
    with ReplicaImage.open(tmp_path) as image:
        assert (image.stream, image.epoch) == ("s1", 1)
        assert image.receive("s1", b"".join(encoded[1:3]), DEVICES) == 3
    with ReplicaImage.open(tmp_path) as image:
        assert (image.stream, image.epoch) == ("s1", 3)
        assert [(tmp_path / f"{d.name}.img").read_bytes() for d in DEVICES] == states[2]
        assert (tmp_path / "pmem0.img").stat().st_mode & 0o777 == 0o600


def test_replica_refuses_entries_outside_its_devices(tmp_path: Path) -> None:
    outside = rl.encode_epoch(1, [rl.data_entry(0, 1, SIZE, b"x" * BS)], True)
    no_device = rl.encode_epoch(1, [rl.data_entry(5, 1, 0, b"x" * BS)], True)
    with ReplicaImage.open(tmp_path) as image:
        for bad in (outside, no_device):
            with pytest.raises(LogError):
                image.receive("s", bad, DEVICES)
        assert image.epoch == 0 and image.log is not None and image.log.epochs == []


CHILD = Path(__file__).with_name("replication_apply_child.py")


@pytest.mark.parametrize("seed", range(6))
def test_a_replica_killed_while_applying_keeps_a_whole_epoch(tmp_path: Path, seed: int) -> None:
    """SIGKILL the applier at a random moment; reopened, every image equals the state after one
    whole epoch (the newest the applier had durably received), never a mix."""
    encoded, states = _random_epochs(seed, 6)
    for i, data in enumerate(encoded):
        (tmp_path / f"e{i}").write_bytes(data)
    rng = random.Random(seed)
    replica = tmp_path / "replica"
    replica.mkdir(mode=0o700)
    child = subprocess.Popen([sys.executable, str(CHILD), str(replica), str(tmp_path), str(len(encoded))],
                             stdout=subprocess.PIPE, env=os.environ | {"PYTHONPATH": str(Path.cwd())})
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    with ReplicaImage.open(replica) as image:
        if image.epoch == 0:
            assert image.stream in ("", "s")
            return
        images = [(replica / f"{d.name}.img").read_bytes() for d in DEVICES]
        assert images == states[image.epoch - 1], f"image is not epoch {image.epoch}"
        assert image.log is not None and image.log.epochs == []
