"""Unit tests of hvext.rvm: every primitive, every error, log format and recovery."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import types

import pytest

from hvext import rvm
from hvext.errors import HvextError
from hvext.rvm import logformat as lf

LOG_SIZE = 1 << 20


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "rvm.log"
    rvm.create_log(path, LOG_SIZE)
    return path


@pytest.fixture
def r(log):
    with rvm.RVM(log) as inst:
        yield inst


def read_file(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if length is None else f.read(length)


def commit(r, region, offset, data, flush=True, restore=True):
    tid = r.begin_transaction(restore=restore)
    r.set_range(tid, region, offset, len(data))[:] = data
    r.end_transaction(tid, flush=flush)


# ---------------------------------------------------------------- create_log


def test_create_log_formats_a_full_size_non_sparse_file(tmp_path):
    path = tmp_path / "l"
    assert rvm.create_log(path, LOG_SIZE) == str(path)
    st = os.stat(path)
    assert st.st_size == LOG_SIZE
    assert st.st_blocks * 512 >= LOG_SIZE  # really allocated, so commits never allocate
    info = rvm.scan_log(path)
    assert info["header"]["version"] == rvm.LOG_FORMAT_VERSION
    assert info["header"]["capacity"] == LOG_SIZE - lf.DATA_START
    assert info["records"] == []


def test_create_log_refuses_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "l"
    path.write_bytes(b"precious")
    with pytest.raises(rvm.RVMLogExistsError):
        rvm.create_log(path, LOG_SIZE)
    assert path.read_bytes() == b"precious"
    rvm.create_log(path, LOG_SIZE, overwrite=True)
    assert os.path.getsize(path) == LOG_SIZE
    assert [p.name for p in tmp_path.iterdir()] == ["l"]  # no temp file left


def test_create_log_overwrite_discards_old_records(tmp_path, log):
    with rvm.RVM(log, truncate_ratio=None) as r:
        commit(r, r.map(tmp_path / "s", 100), 0, b"old")
    assert rvm.scan_log(log)["records"]
    rvm.create_log(log, LOG_SIZE, overwrite=True)
    assert rvm.scan_log(log)["records"] == []


@pytest.mark.parametrize("size", [0, lf.MIN_LOG_SIZE - 1, "1M", 1.5e6, True])
def test_create_log_rejects_bad_sizes(tmp_path, size):
    with pytest.raises(rvm.RVMOptionError):
        rvm.create_log(tmp_path / "l", size)
    assert not (tmp_path / "l").exists()


# ------------------------------------------------------------- opening a log


def test_open_missing_log(tmp_path):
    with pytest.raises(rvm.RVMLogNotFoundError) as ei:
        rvm.RVM(tmp_path / "nope")
    assert isinstance(ei.value.__cause__, FileNotFoundError)


def test_open_not_a_log_leaves_file_intact(tmp_path):
    path = tmp_path / "x"
    data = os.urandom(LOG_SIZE)
    path.write_bytes(data)
    with pytest.raises(rvm.RVMNotALogError):
        rvm.RVM(path)
    assert path.read_bytes() == data
    path.write_bytes(b"")
    with pytest.raises(rvm.RVMNotALogError):
        rvm.RVM(path)


def test_open_bad_version_leaves_file_intact(log):
    raw = bytearray(read_file(log))
    for slot in (0, lf.SLOT_SIZE):
        if raw[slot : slot + 8] == lf.MAGIC:
            struct.pack_into("<I", raw, slot + 8, 99)
    log.write_bytes(raw)
    with pytest.raises(rvm.RVMVersionError, match="version 99"):
        rvm.RVM(log)
    assert read_file(log) == bytes(raw)


def test_open_with_both_header_slots_damaged(log):
    raw = bytearray(read_file(log))
    for slot in (0, lf.SLOT_SIZE):
        if raw[slot : slot + 8] == lf.MAGIC:
            raw[slot + 20] ^= 0xFF  # inside the fields: the slot's CRC no longer matches
    log.write_bytes(raw)
    with pytest.raises(rvm.RVMLogCorruptError):
        rvm.RVM(log)
    assert read_file(log) == bytes(raw)


def test_torn_newer_header_slot_falls_back_to_older(tmp_path, log):
    # A crash while truncation writes the header (before its fdatasync returns)
    # can tear the newer slot; the older slot names an older head whose records
    # are still in the ring (their space is reused only after the new header is
    # durable), and replaying them again is idempotent.
    seg = tmp_path / "s"
    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(seg, 64)
        commit(r, region, 0, b"AAAA")
        r.truncate()
        commit(r, region, 4, b"BBBB")
    gen = rvm.scan_log(log)["header"]["generation"]
    raw = bytearray(read_file(log))
    raw[lf.header_offset(gen) + 30] ^= 0x01
    log.write_bytes(raw)
    assert rvm.scan_log(log)["header"]["generation"] == gen - 1
    with open(seg, "r+b") as f:
        f.write(b"zzzz")  # undo the truncation's segment write, to see the replay
    with rvm.RVM(log) as r:
        assert bytes(r.map(seg, 64)[:8]) == b"AAAABBBB"


def test_log_is_exclusive(log):
    with rvm.RVM(log):
        with pytest.raises(rvm.RVMLogBusyError):
            rvm.RVM(log)
    rvm.RVM(log).close()


def test_unknown_or_bad_options_rejected(log):
    with pytest.raises(rvm.RVMOptionError):
        rvm.RVM(log, colour="blue")
    with pytest.raises(rvm.RVMOptionError):
        rvm.RVM(log, truncate_ratio=1.5)
    with pytest.raises(rvm.RVMOptionError):
        rvm.RVM(log, background_truncation="yes")
    rvm.RVM(log).close()  # the failed attempts did not keep the log locked


# ------------------------------------------------------------------------ map


def test_map_creates_segment_and_gives_writable_region(tmp_path, r):
    seg = tmp_path / "new.seg"
    region = r.map(seg, 4096, offset=8192)
    assert seg.exists() and os.path.getsize(seg) == 8192 + 4096
    view = memoryview(region)
    assert len(view) == 4096 == len(region) == region.length
    assert not view.readonly
    assert region.offset == 8192 and region.segment_path == str(seg)
    assert region.mapped
    view[:3] = b"abc"
    assert bytes(region[:3]) == b"abc"


def test_map_reads_existing_segment_at_offset(tmp_path, r):
    seg = tmp_path / "s"
    seg.write_bytes(bytes(range(256)) * 4)
    region = r.map(seg, 16, offset=100)
    assert bytes(region) == (bytes(range(256)) * 4)[100:116]
    assert os.path.getsize(seg) == 1024  # not shrunk, not grown


def test_region_size_is_fixed_while_mapped(tmp_path, r):
    region = r.map(tmp_path / "s", 64)
    with pytest.raises(BufferError):
        region.extend(b"x")
    assert len(region) == 64


def test_mapping_twice_is_refused(tmp_path, r):
    seg = tmp_path / "s"
    r.map(seg, 100, offset=100)
    with pytest.raises(rvm.RVMAlreadyMappedError):
        r.map(seg, 100, offset=100)
    with pytest.raises(rvm.RVMAlreadyMappedError):
        r.map(seg, 10, offset=199)  # overlaps the last byte
    link = tmp_path / "link"
    link.symlink_to(seg)
    with pytest.raises(rvm.RVMAlreadyMappedError):
        r.map(link, 50, offset=150)  # same file through another name
    r.map(seg, 100, offset=0)  # adjacent ranges are fine
    r.map(seg, 100, offset=200)


@pytest.mark.parametrize("length,offset", [(0, 0), (-1, 0), (10, -1), (1.0, 0)])
def test_map_bad_range(tmp_path, r, length, offset):
    with pytest.raises(rvm.RVMRangeError):
        r.map(tmp_path / "s", length, offset=offset)


# ---------------------------------------------------------------- transactions


def test_commit_goes_to_the_log_only_and_survives_reopen(tmp_path, log):
    seg = tmp_path / "s"
    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(seg, 1000)
        commit(r, region, 10, b"persist")
        assert read_file(seg, 10, 7) == bytes(7)  # segments are written only by truncation
        recs = rvm.scan_log(log)["records"]
        assert [x["kind"] for x in recs] == ["segment", "transaction"]
        assert recs[1]["ranges"] == [(0, 10, 7)]
    with rvm.RVM(log) as r:  # recovery applied it
        assert read_file(seg, 10, 7) == b"persist"
        assert bytes(r.map(seg, 1000)[10:17]) == b"persist"
        assert rvm.scan_log(log)["records"] == []


def test_only_declared_ranges_are_logged(tmp_path, log):
    seg = tmp_path / "s"
    with rvm.RVM(log) as r:
        region = r.map(seg, 100)
        tid = r.begin_transaction()
        r.set_range(tid, region, 0, 4)
        region[0:4] = b"decl"
        region[50:54] = b"undo"  # not declared: not part of any commit
        r.end_transaction(tid)
    with rvm.RVM(log) as r:
        region = r.map(seg, 100)
        assert bytes(region[0:4]) == b"decl"
        assert bytes(region[50:54]) == bytes(4)


def test_new_values_are_taken_at_commit_time(tmp_path, log):
    seg = tmp_path / "s"
    with rvm.RVM(log) as r:
        region = r.map(seg, 10)
        tid = r.begin_transaction()
        view = r.set_range(tid, region, 0, 5)
        view[:] = b"first"
        view[:] = b"final"
        r.end_transaction(tid)
        region[0:5] = b"later"  # after the commit, outside any transaction
    with rvm.RVM(log) as r:
        assert bytes(r.map(seg, 10)[:5]) == b"final"


def test_no_flush_commit_is_durable_after_flush(tmp_path, r):
    region = r.map(tmp_path / "s", 100)
    commit(r, region, 0, b"lazy", flush=False)
    q = r.query_options()
    assert q["synced_lsn"] < q["tail_lsn"]
    r.flush()
    q = r.query_options()
    assert q["synced_lsn"] == q["tail_lsn"]


def test_flush_commit_is_synced_before_return(tmp_path, r):
    region = r.map(tmp_path / "s", 100)
    commit(r, region, 0, b"lazy", flush=False)
    commit(r, region, 10, b"sync", flush=True)
    q = r.query_options()
    assert q["synced_lsn"] == q["tail_lsn"]


def test_empty_flush_transaction_flushes_earlier_commits(tmp_path, r):
    region = r.map(tmp_path / "s", 100)
    commit(r, region, 0, b"lazy", flush=False)
    tid = r.begin_transaction()
    r.end_transaction(tid, flush=True)
    q = r.query_options()
    assert q["synced_lsn"] == q["tail_lsn"]


def test_several_regions_and_segments_in_one_transaction(tmp_path, log):
    a, b = tmp_path / "a", tmp_path / "b"
    with rvm.RVM(log) as r:
        ra1 = r.map(a, 100)
        ra2 = r.map(a, 100, offset=1000)
        rb = r.map(b, 100, offset=50)
        tid = r.begin_transaction()
        r.set_range(tid, ra1, 0, 2)[:] = b"a1"
        r.set_range(tid, ra2, 98, 2)[:] = b"a2"
        r.set_range(tid, rb, 0, 2)[:] = b"b1"
        r.end_transaction(tid)
        r.truncate()
    assert read_file(a, 0, 2) == b"a1"
    assert read_file(a, 1098, 2) == b"a2"
    assert read_file(b, 50, 2) == b"b1"


def test_abort_restores_old_values_of_overlapping_ranges(tmp_path, r):
    region = r.map(tmp_path / "s", 100)
    commit(r, region, 0, b"0123456789")
    tid = r.begin_transaction()
    r.set_range(tid, region, 2, 4)[:] = b"abcd"
    r.set_range(tid, region, 0, 8)[:] = b"ABCDEFGH"
    r.set_range(tid, region, 4, 6)[:] = b"xxxxxx"
    r.abort_transaction(tid)
    assert bytes(region[:10]) == b"0123456789"
    with pytest.raises(rvm.RVMInactiveTransactionError):
        r.end_transaction(tid)


def test_abort_in_no_restore_mode_is_refused_and_keeps_transaction(tmp_path, log):
    seg = tmp_path / "s"
    with rvm.RVM(log) as r:
        region = r.map(seg, 100)
        tid = r.begin_transaction(restore=False)
        r.set_range(tid, region, 0, 3)[:] = b"nr!"
        with pytest.raises(rvm.RVMNoRestoreError):
            r.abort_transaction(tid)
        assert bytes(region[:3]) == b"nr!"
        r.end_transaction(tid)  # still active: can be committed
    with rvm.RVM(log) as r:
        assert bytes(r.map(seg, 100)[:3]) == b"nr!"


def test_inactive_transaction_ids(tmp_path, r):
    region = r.map(tmp_path / "s", 10)
    for bad in (0, 12345, "x", None):
        with pytest.raises(rvm.RVMInactiveTransactionError):
            r.set_range(bad, region, 0, 1)
        with pytest.raises(rvm.RVMInactiveTransactionError):
            r.end_transaction(bad)
        with pytest.raises(rvm.RVMInactiveTransactionError):
            r.abort_transaction(bad)
    tid = r.begin_transaction()
    r.end_transaction(tid)
    with pytest.raises(rvm.RVMInactiveTransactionError):
        r.set_range(tid, region, 0, 1)
    tid2 = r.begin_transaction()
    r.abort_transaction(tid2)
    with pytest.raises(rvm.RVMInactiveTransactionError):
        r.abort_transaction(tid2)


@pytest.mark.parametrize(
    "offset,length", [(-1, 1), (0, 0), (0, -5), (0, 101), (100, 1), (99, 2), (1.0, 1), (0, True)]
)
def test_set_range_out_of_bounds(tmp_path, r, offset, length):
    region = r.map(tmp_path / "s", 100)
    tid = r.begin_transaction()
    with pytest.raises(rvm.RVMRangeError):
        r.set_range(tid, region, offset, length)
    with pytest.raises(IndexError):  # also an IndexError, for idiomatic callers
        r.set_range(tid, region, offset, length)
    r.set_range(tid, region, 99, 1)  # the transaction is still usable
    r.end_transaction(tid)


def test_set_range_needs_a_mapped_region(tmp_path, r):
    tid = r.begin_transaction()
    with pytest.raises(rvm.RVMNotMappedError):
        r.set_range(tid, bytearray(10), 0, 1)
    region = r.map(tmp_path / "s", 10)
    r.unmap(region)
    with pytest.raises(rvm.RVMNotMappedError):
        r.set_range(tid, region, 0, 1)


def test_region_of_another_rvm_is_refused(tmp_path, r):
    other_log = tmp_path / "other.log"
    rvm.create_log(other_log, LOG_SIZE)
    with rvm.RVM(other_log) as other:
        foreign = other.map(tmp_path / "o", 10)
        tid = r.begin_transaction()
        with pytest.raises(rvm.RVMNotMappedError):
            r.set_range(tid, foreign, 0, 1)
        with pytest.raises(rvm.RVMNotMappedError):
            r.unmap(foreign)


def test_transaction_context_manager(tmp_path, log):
    seg = tmp_path / "s"
    with rvm.RVM(log) as r:
        region = r.map(seg, 10)
        with r.transaction() as t:
            t.set_range(region, 0, 2)[:] = b"ok"
        with pytest.raises(ZeroDivisionError):
            with r.transaction() as t:
                t.set_range(region, 0, 2)[:] = b"no"
                1 / 0
        assert bytes(region[:2]) == b"ok"  # aborted: restored
        with pytest.raises(KeyError):
            with r.transaction(restore=False) as t:
                t.set_range(region, 2, 2)[:] = b"nr"
                raise KeyError
        assert r.query_options()["active_transactions"] == 0  # discarded, not committed
        with r.transaction(flush=False) as t:
            t.set_range(region, 4, 2)[:] = b"lz"
            t.commit()  # explicit commit inside the block is fine
    with rvm.RVM(log) as r:
        assert bytes(r.map(seg, 10)[:6]) == b"ok\0\0lz"


# ---------------------------------------------------------------- unmap


def test_unmap_busy_region_is_refused(tmp_path, r):
    region = r.map(tmp_path / "s", 10)
    tid = r.begin_transaction()
    r.set_range(tid, region, 0, 1)
    with pytest.raises(rvm.RVMRegionBusyError):
        r.unmap(region)
    r.end_transaction(tid)
    r.unmap(region)
    assert not region.mapped
    with pytest.raises(rvm.RVMNotMappedError):
        r.unmap(region)


def test_remap_after_unmap_sees_committed_data(tmp_path, r):
    seg = tmp_path / "s"
    region = r.map(seg, 100)
    commit(r, region, 0, b"committed", flush=False)
    r.unmap(region)
    again = r.map(seg, 100)  # the log still holds the commit: it is applied first
    assert bytes(again[:9]) == b"committed"
    assert read_file(seg, 0, 9) == b"committed"


def test_map_of_other_range_does_not_force_truncation(tmp_path, r):
    seg = tmp_path / "s"
    region = r.map(seg, 100)
    commit(r, region, 0, b"x", flush=False)
    r.unmap(region)
    r.map(seg, 100, offset=100)
    assert r.query_options()["truncations"] == 0
    assert r.map(seg, 100)[0:1] == b"x"


# ---------------------------------------------------------------- truncation


def test_truncate_applies_log_and_reclaims_space(tmp_path, log):
    seg = tmp_path / "s"
    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(seg, 1000)
        for i in range(10):
            commit(r, region, i * 10, b"%10d" % i, flush=False)
        assert r.query_options()["log_used"] > 0
        assert read_file(seg, 0, 10) == bytes(10)
        r.truncate()
        q = r.query_options()
        assert q["log_used"] == 0 and q["truncations"] == 1
        assert read_file(seg, 90, 10) == b"%10d" % 9
        assert rvm.scan_log(log)["records"] == []


def test_auto_truncation_at_fill_ratio(tmp_path, log):
    seg = tmp_path / "s"
    with rvm.RVM(log, truncate_ratio=0.1, background_truncation=False) as r:
        region = r.map(seg, 64 * 1024)
        payload = os.urandom(8192)
        for i in range(100):
            commit(r, region, (i * 4096) % 60000, payload[:4096], flush=False)
        q = r.query_options()
        assert q["truncations"] >= 2
        assert q["log_fill"] < 0.1 + 8192 / q["log_capacity"]
        final = bytes(region)
    with rvm.RVM(log) as r:
        assert bytes(r.map(seg, 64 * 1024)) == final


def test_background_truncation_runs_alongside_commits(tmp_path, monkeypatch):
    """Commits (lazy and flushed) complete while a truncation is stuck applying its epoch."""
    from hvext.rvm import core

    seg = tmp_path / "s"
    gate = threading.Event()
    segment_syncs = []
    real_sync = core._fdatasync

    def slow_sync(fd):
        in_worker = threading.current_thread().name == "rvm-truncate"
        if in_worker and os.path.realpath(f"/proc/self/fd/{fd}") == str(seg):
            segment_syncs.append(fd)
            assert gate.wait(10)
        real_sync(fd)

    monkeypatch.setattr(core, "_fdatasync", slow_sync)
    big_log = tmp_path / "big.log"
    rvm.create_log(big_log, 16 << 20)  # room for far more than the commits below
    with rvm.RVM(big_log, truncate_ratio=0.02) as r:
        region = r.map(seg, 128 * 1024)
        payload = os.urandom(128 * 1024)
        i = 0
        while not r.query_options()["truncating"]:  # until the worker starts a truncation
            off = (i * 1000) % (120 * 1024)
            commit(r, region, off, payload[off : off + 3000], flush=False)
            i += 1
            assert i < 5000
        deadline = time.monotonic() + 10
        while not segment_syncs:  # it gets stuck syncing the segment
            assert time.monotonic() < deadline
            time.sleep(0.001)
        q = r.query_options()
        assert q["truncating"]
        epoch, done = q["epoch"], q["truncations"]
        for j in range(20):  # forward processing continues in the next epoch
            commit(r, region, j * 10, b"%10d" % j, flush=(j % 2 == 1))
        q = r.query_options()
        assert q["truncating"] and q["epoch"] == epoch and q["synced_lsn"] == q["tail_lsn"]
        assert r.query_options()["truncations"] == done  # still stuck
        gate.set()
        r.truncate()
        assert r.query_options()["truncations"] >= done + 2
        final = bytes(region)
    assert read_file(seg) == final
    with rvm.RVM(big_log) as r:
        assert bytes(r.map(seg, 128 * 1024)) == final


def test_log_full_when_truncation_cannot_free_space(tmp_path, r):
    region = r.map(tmp_path / "s", 2 * LOG_SIZE)
    commit(r, region, 0, b"before")
    tid = r.begin_transaction()
    r.set_range(tid, region, 0, LOG_SIZE)[:] = b"\xff" * LOG_SIZE
    with pytest.raises(rvm.RVMLogFullError):
        r.end_transaction(tid)
    r.abort_transaction(tid)  # still active after the failure: data put back
    assert bytes(region[:6]) == b"before"
    with pytest.raises(rvm.RVMLogFullError):
        with r.transaction() as t:  # the context manager aborts a commit that fails
            t.set_range(region, 0, LOG_SIZE)[:] = b"\xee" * LOG_SIZE
    assert bytes(region[:6]) == b"before"
    assert r.query_options()["active_transactions"] == 0
    commit(r, region, 0, b"after!")  # the RVM keeps working


def test_full_log_is_truncated_by_the_committer(tmp_path, log):
    seg = tmp_path / "s"
    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(seg, 256 * 1024)
        data = os.urandom(256 * 1024)
        for i in range(20):  # 20 x 256 KiB through a 1 MiB log
            commit(r, region, 0, data[i:] + data[:i], flush=False)
        assert r.query_options()["truncations"] >= 4
    with rvm.RVM(log) as r:
        assert bytes(r.map(seg, 256 * 1024)) == data[19:] + data[:19]


def test_wraparound_with_minimum_log_keeps_every_commit(tmp_path):
    log = tmp_path / "small.log"
    rvm.create_log(log, lf.MIN_LOG_SIZE)
    seg = tmp_path / "s"
    import random

    rng = random.Random(7)
    model = bytearray(32 * 1024)
    with rvm.RVM(log, truncate_ratio=0.7, background_truncation=False) as r:
        region = r.map(seg, len(model))
        for _ in range(400):
            tid = r.begin_transaction(restore=False)
            for _ in range(rng.randint(1, 4)):
                off = rng.randrange(len(model) - 1)
                n = rng.randint(1, min(len(model) - off, 9000))
                data = rng.randbytes(n)
                r.set_range(tid, region, off, n)[:] = data
                model[off : off + n] = data
            r.end_transaction(tid, flush=False)
        assert region == model
        assert r.query_options()["truncations"] > 10
    with rvm.RVM(log) as r:
        assert r.map(seg, len(model)) == model


def test_records_ending_exactly_at_the_ring_end(tmp_path):
    """A segment declaration filling the ring to its last byte, the transaction at the start."""
    log = tmp_path / "small.log"
    rvm.create_log(log, lf.MIN_LOG_SIZE)
    seg = tmp_path / "s"
    seg_decl = lf.aligned(lf.REC.size + len(os.fsencode(str(seg))))
    with rvm.RVM(log, truncate_ratio=None) as r:
        cap = r.query_options()["log_capacity"]
        region = r.map(seg, cap)
        commit(r, region, 0, b"first", flush=False)  # declaration + transaction
        used = r.query_options()["tail_lsn"] % cap
        fill = cap - seg_decl - used  # one transaction record of exactly this size
        commit(r, region, 100, b"\x11" * (fill - lf.REC.size - lf.RANGE.size), flush=False)
        assert r.query_options()["tail_lsn"] % cap == cap - seg_decl
        r.truncate()  # next epoch: the next commit declares the segment again
        commit(r, region, 200, b"wrapped", flush=False)
        assert r.query_options()["tail_lsn"] % cap == lf.aligned(lf.REC.size + lf.RANGE.size + 7)
        assert os.path.getsize(log) == lf.MIN_LOG_SIZE  # nothing written past the ring
        r.truncate()  # reads the records back
        assert read_file(seg, 200, 7) == b"wrapped"
        commit(r, region, 300, b"again", flush=False)
    with rvm.RVM(log) as r:
        assert bytes(r.map(seg, 400)[300:305]) == b"again"


@pytest.mark.parametrize("seed", range(8))
def test_log_layout_fuzz(tmp_path, seed, monkeypatch):
    """Random record sizes, several declarations per commit, frequent epochs, wraps."""
    import random

    from hvext.rvm import core

    monkeypatch.setattr(core, "_fdatasync", lambda fd: None)  # layout, not durability
    rng = random.Random(seed)
    log = tmp_path / "small.log"
    rvm.create_log(log, lf.MIN_LOG_SIZE)
    names = ["s", "seg-with-a-longer-name", "x" * rng.randint(1, 60)]
    models = [bytearray(8192) for _ in names]
    with rvm.RVM(log, truncate_ratio=rng.choice((0.3, None)), background_truncation=False) as r:
        regions = [r.map(tmp_path / name, 8192) for name in names]
        for i in range(600):
            tid = r.begin_transaction(restore=False)
            for _ in range(rng.randint(1, 4)):
                k = rng.randrange(len(names))
                n = rng.randint(1, rng.choice((16, 200, 3000)))
                off = rng.randrange(8192 - n + 1)
                data = rng.randbytes(n)
                r.set_range(tid, regions[k], off, n)[:] = data
                models[k][off : off + n] = data
            r.end_transaction(tid, flush=False)
            if rng.random() < 0.15:
                r.truncate()
                assert [read_file(tmp_path / name) for name in names] == [bytes(m) for m in models]
            assert os.path.getsize(log) == lf.MIN_LOG_SIZE
    with rvm.RVM(log) as r:
        assert [bytes(r.map(tmp_path / name, 8192)) for name in names] == [bytes(m) for m in models]


# ---------------------------------------------------------- options, close


def test_query_and_set_options(tmp_path, r, log):
    q = r.query_options()
    for key in (
        "log_path",
        "log_size",
        "log_capacity",
        "log_used",
        "truncate_ratio",
        "background_truncation",
        "epoch",
        "active_transactions",
        "format_version",
    ):
        assert key in q
    assert q["log_path"] == str(log) and q["log_size"] == LOG_SIZE
    assert q["truncate_ratio"] == 0.5
    r.set_options(truncate_ratio=0.25, background_truncation=False)
    q = r.query_options()
    assert q["truncate_ratio"] == 0.25 and q["background_truncation"] is False
    r.set_options(truncate_ratio=None)
    assert r.query_options()["truncate_ratio"] is None
    with pytest.raises(rvm.RVMOptionError):
        r.set_options(truncate_ratio=0)
    with pytest.raises(rvm.RVMOptionError):
        r.set_options(nope=1)
    assert r.query_options()["truncate_ratio"] is None  # unchanged by the failures
    region = r.map(tmp_path / "s", 10, offset=5)
    tid = r.begin_transaction()
    r.set_range(tid, region, 0, 1)
    qr = r.query_options(region)
    assert qr == {
        "segment_path": str(tmp_path / "s"),
        "offset": 5,
        "length": 10,
        "active_transactions": 1,
    }
    with pytest.raises(rvm.RVMNotMappedError):
        r.query_options(bytearray(1))


def test_closed_rvm_refuses_everything(tmp_path, log):
    r = rvm.RVM(log)
    region = r.map(tmp_path / "s", 10)
    tid = r.begin_transaction()
    r.close()
    r.close()  # idempotent
    assert not region.mapped
    for call in (
        lambda: r.map(tmp_path / "t", 10),
        lambda: r.begin_transaction(),
        lambda: r.set_range(tid, region, 0, 1),
        lambda: r.end_transaction(tid),
        lambda: r.abort_transaction(tid),
        r.flush,
        r.truncate,
        r.query_options,
        lambda: r.set_options(truncate_ratio=0.5),
        lambda: r.unmap(region),
    ):
        with pytest.raises(rvm.RVMClosedError):
            call()


def test_close_discards_active_transactions(tmp_path, log):
    seg = tmp_path / "s"
    r = rvm.RVM(log)
    region = r.map(seg, 10)
    commit(r, region, 0, b"yes", flush=False)
    tid = r.begin_transaction()
    r.set_range(tid, region, 5, 2)[:] = b"no"
    r.close()
    with rvm.RVM(log) as r:
        assert bytes(r.map(seg, 10)) == b"yes\0\0\0\0\0\0\0"


def test_error_tree():
    leaves = [
        rvm.RVMLogNotFoundError,
        rvm.RVMLogExistsError,
        rvm.RVMNotALogError,
        rvm.RVMVersionError,
        rvm.RVMLogCorruptError,
        rvm.RVMLogBusyError,
        rvm.RVMLogFullError,
        rvm.RVMAlreadyMappedError,
        rvm.RVMNotMappedError,
        rvm.RVMRegionBusyError,
        rvm.RVMRangeError,
        rvm.RVMInactiveTransactionError,
        rvm.RVMNoRestoreError,
        rvm.RVMOptionError,
        rvm.RVMRecoveryError,
        rvm.RVMIOError,
        rvm.RVMClosedError,
    ]
    for cls in leaves:
        assert issubclass(cls, rvm.RVMError) and issubclass(cls, HvextError)
    assert len(set(leaves)) == len(leaves)


def test_rvm_package_is_standard_library_only():
    import ast
    import pathlib
    import sys

    pkg = pathlib.Path(rvm.__file__).parent
    for src in pkg.glob("*.py"):
        for node in ast.walk(ast.parse(src.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or name.startswith(
                    ("hvext.rvm", "hvext.errors")
                ) or name == "hvext", f"{src.name} imports {name}"


# ---------------------------------------------------------------- threads


def test_threads_commit_concurrently_with_group_commit(tmp_path, log):
    seg = tmp_path / "s"
    nthreads, per = 6, 40
    with rvm.RVM(log, truncate_ratio=0.2) as r:
        region = r.map(seg, nthreads * per * 8)
        errors = []

        def worker(k):
            try:
                for i in range(per):
                    off = (k * per + i) * 8
                    with r.transaction() as t:
                        t.set_range(region, off, 8)[:] = b"%02d:%05d" % (k, i)
            except Exception as err:  # pragma: no cover - reported below
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        q = r.query_options()
        assert q["commits"] == nthreads * per
        assert q["syncs"] < q["commits"]  # concurrent committers shared fdatasyncs
    with rvm.RVM(log) as r:
        region = r.map(seg, nthreads * per * 8)
        for k in range(nthreads):
            for i in range(per):
                off = (k * per + i) * 8
                assert bytes(region[off : off + 8]) == b"%02d:%05d" % (k, i)


# ------------------------------------------------------ recovery, torn tails


def write_history(log, seg, n):
    """Commit n transactions (no truncation); txn i writes b'%04d' at 0 and at 4*i+8."""
    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(seg, 4096)
        for i in range(1, n + 1):
            tid = r.begin_transaction()
            r.set_range(tid, region, 0, 4)[:] = b"%04d" % i
            r.set_range(tid, region, 4 * i + 8, 4)[:] = b"%04d" % i
            r.end_transaction(tid, flush=(i % 2 == 0))
    txns = [x for x in rvm.scan_log(log)["records"] if x["kind"] == "transaction"]
    assert len(txns) == n
    return txns


def expected_after(k):
    state = bytearray(4096)
    for i in range(1, k + 1):
        state[0:4] = b"%04d" % i
        state[4 * i + 8 : 4 * i + 12] = b"%04d" % i
    return bytes(state)


def recovered(log, seg):
    with rvm.RVM(log) as r:
        return bytes(r.map(seg, 4096))


def test_recovery_replays_every_complete_record(tmp_path, log):
    seg = tmp_path / "s"
    write_history(log, seg, 30)
    assert read_file(seg) == bytes(4096)  # nothing applied before recovery
    assert recovered(log, seg) == expected_after(30)
    assert expected_after(30) != expected_after(29)


@pytest.mark.parametrize("where", ["payload", "crc", "lsn", "length"])
def test_recovery_ignores_exactly_a_damaged_last_record(tmp_path, log, where):
    seg = tmp_path / "s"
    txns = write_history(log, seg, 20)
    last = txns[-1]
    raw = bytearray(read_file(log))
    pos = {"payload": last["length"] - 9, "crc": 0, "lsn": 16, "length": 8}[where]
    raw[last["offset"] + pos] ^= 0x40
    log.write_bytes(raw)
    assert recovered(log, seg) == expected_after(19)


def test_recovery_ignores_a_record_cut_by_file_truncation(tmp_path, log):
    seg = tmp_path / "s"
    txns = write_history(log, seg, 12)
    last = txns[-1]
    os.truncate(log, last["offset"] + last["length"] // 2)
    assert recovered(log, seg) == expected_after(11)
    assert os.path.getsize(log) == LOG_SIZE  # the ring is put back to full size
    with rvm.RVM(log) as r:  # and is usable
        commit(r, r.map(seg, 4096), 100, b"more")
    assert recovered(log, seg)[100:104] == b"more"


def test_recovery_stops_at_a_torn_middle_record_and_never_resurrects_later_ones(tmp_path, log):
    seg = tmp_path / "s"
    txns = write_history(log, seg, 15)
    raw = bytearray(read_file(log))
    raw[txns[6]["offset"] + txns[6]["length"] - 9] ^= 0x01  # record of txn 7
    log.write_bytes(raw)
    assert recovered(log, seg) == expected_after(6)  # a prefix: 8..15 are dropped too
    with rvm.RVM(log, truncate_ratio=None) as r:
        commit(r, r.map(seg, 4096), 2000, b"new!")
    want = bytearray(expected_after(6))
    want[2000:2004] = b"new!"
    assert recovered(log, seg) == bytes(want)  # records 8..15 stayed dead


def test_recovery_with_missing_segment_leaves_log_for_retry(tmp_path, log):
    seg = tmp_path / "s"
    write_history(log, seg, 3)
    os.unlink(seg)
    before = read_file(log)
    with pytest.raises(rvm.RVMRecoveryError) as ei:
        rvm.RVM(log)
    assert isinstance(ei.value.__cause__, FileNotFoundError)
    assert read_file(log) == before
    seg.write_bytes(b"")
    assert recovered(log, seg) == expected_after(3)


def test_recovery_is_idempotent_when_repeated(tmp_path, log):
    seg = tmp_path / "s"
    write_history(log, seg, 9)
    saved = read_file(log)
    assert recovered(log, seg) == expected_after(9)
    log.write_bytes(saved)  # as if the header reset had been lost: replay again
    seg.write_bytes(b"\x55" * 4096)  # over whatever the segment holds
    want = bytearray(b"\x55" * 4096)
    state = expected_after(9)
    want[0:4] = state[0:4]
    want[12:48] = state[12:48]  # the bytes the records write; the rest is untouched
    assert recovered(log, seg) == bytes(want)


# ---------------------------------------------------------------- I/O errors


def test_failed_automatic_truncation_is_reported_then_retried(tmp_path, log, monkeypatch):
    from hvext.rvm import core

    seg = tmp_path / "s"
    failing = [True]
    real_sync = core._fdatasync

    def flaky(fd):
        if failing[0] and os.path.realpath(f"/proc/self/fd/{fd}") == str(seg):
            raise OSError(5, "Input/output error")
        real_sync(fd)

    monkeypatch.setattr(core, "_fdatasync", flaky)
    with rvm.RVM(log, truncate_ratio=0.01, background_truncation=False) as r:
        region = r.map(seg, 64 * 1024)
        for i in range(4):
            commit(r, region, i * 8192, b"%8192d" % i, flush=False)  # commits succeed
        with pytest.raises(rvm.RVMIOError) as ei:
            r.flush()
        assert isinstance(ei.value.__cause__.__cause__, OSError)
        assert r.query_options()["log_used"] > 0  # nothing reclaimed
        failing[0] = False
        r.truncate()  # the log still has everything: the retry applies it
        assert r.query_options()["log_used"] == 0
        final = bytes(region)
    assert read_file(seg) == final


def test_failed_log_sync_stops_the_rvm_until_reopened(tmp_path, log, monkeypatch):
    from hvext.rvm import core

    seg = tmp_path / "s"
    with rvm.RVM(log) as r:
        region = r.map(seg, 100)
        commit(r, region, 0, b"safe")

        def broken(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(core, "_fdatasync", broken)
        tid = r.begin_transaction()
        r.set_range(tid, region, 10, 4)[:] = b"lost"
        with pytest.raises(rvm.RVMIOError) as ei:
            r.end_transaction(tid, flush=True)
        assert isinstance(ei.value.__cause__, OSError)
        monkeypatch.setattr(core, "_fdatasync", os.fdatasync)
        with pytest.raises(rvm.RVMIOError):  # no more commits after a failed fdatasync
            commit(r, region, 20, b"more")
    with rvm.RVM(log) as r:  # reopening recovers what the log holds
        assert bytes(r.map(seg, 100)[:4]) == b"safe"


# ------------------------------------------- preallocated log, lean truncation


def test_preallocated_zeros_are_never_taken_for_records(tmp_path, log):
    """A crash in the middle of the preallocated (zero-filled) area: zeros end the log.

    The ring is zero-filled at creation, so whatever part of a record never
    reached the disk reads back as zeros: such a record, a record entirely
    of zeros, and the zeros after the last record must never validate.
    """
    seg = tmp_path / "s"
    assert rvm.scan_log(log)["records"] == [] and rvm.scan_log(log)["end_lsn"] == 0
    txns = write_history(log, seg, 10)
    info = rvm.scan_log(log)
    end = txns[-1]["offset"] + txns[-1]["length"]
    assert read_file(log, end, 4096) == bytes(4096)  # preallocated zeros after the tail
    assert info["end_lsn"] == txns[-1]["lsn"] + txns[-1]["length"]  # zeros: no record
    raw = bytearray(read_file(log))
    last = txns[-1]
    cut = last["offset"] + last["length"] // 2  # its second half never left the cache
    raw[cut:end] = bytes(end - cut)
    log.write_bytes(raw)
    assert recovered(log, seg) == expected_after(9)
    # A whole record lost in the middle (its sectors still zeros): a prefix, nothing later.
    txns = write_history(log, seg, 8)
    raw = bytearray(read_file(log))
    mid = txns[4]
    raw[mid["offset"] : mid["offset"] + mid["length"]] = bytes(mid["length"])
    log.write_bytes(raw)
    assert [t["lsn"] for t in rvm.scan_log(log)["records"] if t["kind"] == "transaction"] == [
        t["lsn"] for t in txns[:4]
    ]


@pytest.mark.parametrize("where", ["lsn", "length", "table", "segment"])
def test_truncation_stops_on_a_log_that_reads_back_damaged(tmp_path, log, where):
    """Truncation checks the structure of what it reads back (not the CRC: it wrote it).

    A record that does not parse stops the truncation before any of its
    bytes reach the segment, and the RVM refuses further commits; reopening
    recovers the valid prefix.
    """
    seg = tmp_path / "s"
    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(seg, 4096)
        commit(r, region, 0, b"good", flush=False)
        commit(r, region, 100, b"damaged!", flush=False)
        recs = [x for x in rvm.scan_log(log)["records"] if x["kind"] == "transaction"]
        bad = recs[-1]
        at_table = lf.REC.size  # the first range entry: segment id, then length
        fields = {"lsn": (16, 8), "length": (8, 4), "table": (at_table + 4, 4), "segment": (at_table, 4)}
        field = fields[where]
        fd = os.open(log, os.O_RDWR)  # behind the RVM's back
        try:
            off = bad["offset"] + field[0]
            raw = bytearray(os.pread(fd, field[1], off))
            raw[0] ^= 0x40
            os.pwrite(fd, bytes(raw), off)
        finally:
            os.close(fd)
        with pytest.raises(rvm.RVMLogCorruptError):
            r.truncate()
        with pytest.raises(rvm.RVMIOError):
            commit(r, region, 200, b"more")
        assert read_file(seg, 100, 8) == bytes(8)  # nothing of the bad record applied
    assert recovered(log, seg)[:4] == b"good"


def test_truncation_yields_the_gil_only_while_commits_go_on(tmp_path, log, monkeypatch):
    """A foreground truncation with no committer never sleeps; with one committing, it does."""
    from hvext.rvm import core

    sleeps = []
    real_sleep = time.sleep
    monkeypatch.setattr(core.time, "sleep", lambda s: (sleeps.append(s), real_sleep(s)))
    monkeypatch.setattr(core, "_YIELD_EVERY", 0.0, raising=False)  # consider a yield at every range
    seg = tmp_path / "s"
    big_log = tmp_path / "big.log"
    rvm.create_log(big_log, 8 << 20)
    with rvm.RVM(big_log, truncate_ratio=None) as r:
        region = r.map(seg, 1 << 20)
        for i in range(3000):
            commit(r, region, (i * 331) % ((1 << 20) - 64), b"x" * 64, flush=False)
        real_sleep(0.05)  # nobody committed for a while
        r.truncate()
        assert sleeps == []
        for i in range(3000):
            commit(r, region, (i * 331) % ((1 << 20) - 64), b"y" * 64, flush=False)
        other = r.map(tmp_path / "t", 4096)
        stop = threading.Event()

        def committer():
            while not stop.is_set():
                commit(r, other, 0, b"z", flush=False)

        t = threading.Thread(target=committer)
        t.start()
        try:
            r.truncate()
        finally:
            stop.set()
            t.join()
        assert sleeps
        final = bytes(region)
    assert read_file(seg) == final



@pytest.mark.parametrize("sizes", [[5], [8], [3, 100, 1], [64] * 16, [3000, 4000, 4096, 2500]])
def test_fast_path_records_are_byte_exact_to_the_documented_format(tmp_path, log, sizes):
    """The commit fast path writes version 1 records (one range: views; several: one joined buffer)."""
    import zlib

    with rvm.RVM(log) as r:
        region = r.map(tmp_path / "seg", 1 << 16)
        commit(r, region, 0, b"x")  # declares the segment: the next commit takes the fast path
        lsn = r.query_options()["tail_lsn"]
        tid = r.begin_transaction()
        table, data, off = b"", b"", 1000
        for i, n in enumerate(sizes):
            chunk = bytes((i * 7 + k) % 251 for k in range(n))
            r.set_range(tid, region, off, n)[:] = chunk
            table += lf.RANGE.pack(0, n, off)
            data += chunk
            off += n + 13
        r.end_transaction(tid)
        used = lf.REC.size + len(table) + len(data)
        size = lf.aligned(used)
        assert r.query_options()["tail_lsn"] == lsn + size
        body = lf.REC_BODY.pack(lf.KIND_TXN, 0, size, len(sizes), lsn) + table + data + bytes(size - used)
        expected = lf.U32.pack(zlib.crc32(body, r._salt)) + body
        assert read_file(log, lf.physical(lsn, r.query_options()["log_capacity"]), size) == expected


def test_transaction_with_more_ranges_than_an_iovec_holds_survives_reopen(tmp_path, log):
    seg = tmp_path / "seg"
    with rvm.RVM(log) as r:
        region = r.map(seg, 1 << 16)
        commit(r, region, 0, b"d")  # the segment is declared: the next commit takes the fast path
        tid = r.begin_transaction()
        for i in range(1500):
            r.set_range(tid, region, i * 40, 3)[:] = i.to_bytes(3, "little")
        r.end_transaction(tid)
    with rvm.RVM(log) as r:
        region = r.map(seg, 1 << 16)
        assert all(bytes(region[i * 40 : i * 40 + 3]) == i.to_bytes(3, "little") for i in range(1500))


# ------------------------------------ flushed commits with RWF_DSYNC (issue 15)


class LogCalls:
    """Records hvext.rvm's pwritev flags and fdatasyncs of the log; can refuse RWF_DSYNC."""

    def __init__(self, monkeypatch, log_path, refuse_dsync: int | None = None) -> None:
        from hvext.rvm import core

        self.log = os.path.realpath(log_path)
        self.writes: list[int] = []  # flags of every pwritev to the log
        self.syncs = 0  # fdatasyncs of the log
        proxy = types.SimpleNamespace(**vars(os))
        real_sync = core._fdatasync

        def pwritev(fd, iov, offset, flags=0):
            if self._is_log(fd):
                self.writes.append(flags)
                if flags and refuse_dsync is not None:
                    raise OSError(refuse_dsync, os.strerror(refuse_dsync))
            return os.pwritev(fd, iov, offset, flags)

        def fdatasync(fd):
            if self._is_log(fd):
                self.syncs += 1
            real_sync(fd)

        proxy.pwritev = pwritev
        monkeypatch.setattr(core, "os", proxy)
        monkeypatch.setattr(core, "_fdatasync", fdatasync)

    def _is_log(self, fd) -> bool:
        return os.path.realpath(f"/proc/self/fd/{fd}") == self.log

    @property
    def dsync_writes(self) -> int:
        return sum(1 for f in self.writes if f & os.RWF_DSYNC)  # Linux, Python 3.7+: hvext's platform


def solo_commits(r, region, n, flush=True, start=0):
    for i in range(start, start + n):
        commit(r, region, i * 8, b"%8d" % i, flush=flush)


def test_flushed_commits_of_one_thread_are_written_with_rwf_dsync_and_no_fdatasync(tmp_path, log, monkeypatch):
    from hvext.rvm import core

    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(tmp_path / "s", 4096)
        calls = LogCalls(monkeypatch, log)
        solo_commits(r, region, core._SOLO_COMMITS)  # the first ones: fdatasync
        assert calls.dsync_writes == 0 and calls.syncs == core._SOLO_COMMITS
        solo_commits(r, region, 20, start=core._SOLO_COMMITS)
        assert calls.dsync_writes == 20 and calls.syncs == core._SOLO_COMMITS  # one call each
        q = r.query_options()
        assert q["synced_lsn"] == q["tail_lsn"]
        assert q["syncs"] == core._SOLO_COMMITS + 20
        final = bytes(region)
    with rvm.RVM(log) as r:
        assert bytes(r.map(tmp_path / "s", 4096)) == final


def test_a_flushed_commit_after_no_flush_ones_syncs_them_all_with_fdatasync(tmp_path, log, monkeypatch):
    """RWF_DSYNC makes only its own bytes durable: with unsynced records before it, fdatasync."""
    from hvext.rvm import core

    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(tmp_path / "s", 4096)
        solo_commits(r, region, core._SOLO_COMMITS + 1)
        calls = LogCalls(monkeypatch, log)
        solo_commits(r, region, 3, flush=False, start=20)
        commit(r, region, 200, b"flushed")
        assert calls.writes == [0, 0, 0, 0] and calls.syncs == 1
        commit(r, region, 300, b"next")  # everything before it is durable again
        assert calls.dsync_writes == 1 and calls.syncs == 1


def test_without_rwf_dsync_flushed_commits_fall_back_to_fdatasync(tmp_path, log, monkeypatch):
    from hvext.rvm import core

    monkeypatch.setattr(core, "_RWF_DSYNC", 0)  # Python or kernel without pwritev2 flags
    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(tmp_path / "s", 4096)
        calls = LogCalls(monkeypatch, log)
        solo_commits(r, region, core._SOLO_COMMITS + 10)
        assert calls.dsync_writes == 0 and calls.syncs == core._SOLO_COMMITS + 10
        final = bytes(region)
    with rvm.RVM(log) as r:
        assert bytes(r.map(tmp_path / "s", 4096)) == final


@pytest.mark.parametrize("refusal", [errno.EOPNOTSUPP, errno.EINVAL])
def test_a_file_system_refusing_rwf_dsync_falls_back_to_fdatasync(tmp_path, log, monkeypatch, refusal):
    from hvext.rvm import core

    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(tmp_path / "s", 4096)
        solo_commits(r, region, core._SOLO_COMMITS + 1)
        calls = LogCalls(monkeypatch, log, refuse_dsync=refusal)
        solo_commits(r, region, 5, start=50)  # the first is refused, then written plainly
        assert calls.writes == [os.RWF_DSYNC, 0, 0, 0, 0, 0]  # RWF_DSYNC tried once only
        assert calls.syncs == 5
        assert r.query_options()["synced_lsn"] == r.query_options()["tail_lsn"]
        final = bytes(region)
    info = rvm.scan_log(log)
    assert [len(rec["ranges"]) for rec in info["records"] if rec["kind"] == "transaction"] == [1] * (
        core._SOLO_COMMITS + 1 + 5
    )
    with rvm.RVM(log) as r:
        assert bytes(r.map(tmp_path / "s", 4096)) == final


def test_a_failed_rwf_dsync_write_stops_the_rvm_like_a_failed_fdatasync(tmp_path, log, monkeypatch):
    from hvext.rvm import core

    seg = tmp_path / "s"
    with rvm.RVM(log) as r:
        region = r.map(seg, 4096)
        solo_commits(r, region, core._SOLO_COMMITS + 1)
        safe = bytes(region)
        LogCalls(monkeypatch, log, refuse_dsync=errno.EIO)
        tid = r.begin_transaction()
        r.set_range(tid, region, 1000, 4)[:] = b"lost"
        with pytest.raises(rvm.RVMIOError) as ei:
            r.end_transaction(tid, flush=True)
        assert isinstance(ei.value.__cause__, OSError) and ei.value.__cause__.errno == errno.EIO
        r.abort_transaction(tid)  # still active after the failed commit
        monkeypatch.undo()
        with pytest.raises(rvm.RVMIOError):  # no more commits, as after a failed fdatasync
            commit(r, region, 2000, b"more")
    with rvm.RVM(log) as r:
        assert bytes(r.map(seg, 4096)) == safe


def test_committers_of_several_threads_share_fdatasyncs_instead_of_rwf_dsync(tmp_path, log, monkeypatch):
    """RWF_DSYNC holds the lock through the sync: only a lone committing thread uses it."""
    with rvm.RVM(log, truncate_ratio=None) as r:
        region = r.map(tmp_path / "s", 4096)
        calls = LogCalls(monkeypatch, log)
        barrier = threading.Barrier(2)

        def worker(k):
            for i in range(40):
                barrier.wait()  # the two threads begin transactions in alternation
                commit(r, region, (k * 40 + i) * 8, b"%8d" % i)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert calls.dsync_writes == 0
