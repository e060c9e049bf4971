"""bench/rvm.py compares like with like: its fdatasync limit writes hvext.rvm's record size per sync."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from hvext import rvm

ROOT = Path(__file__).resolve().parents[2]


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("hvext_bench_rvm", ROOT / "bench" / "rvm.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench"), *sys.path])  # as when run: bench/plot.py importable;
    # the bench also inserts its checkout
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "SEG_SIZE", 1 << 20)  # a small file for the limit loop
    return mod


@pytest.mark.parametrize("sync", ["fdatasync", "dsync"])
def test_limit_writes_as_many_bytes_per_sync_as_the_rvm_record(tmp_path, monkeypatch, sync):
    bench = load_bench(monkeypatch)
    src = bytes(range(256)) * 4096
    for ranges in ([(0, 5, 0)], [(0, 64, 0), (4096, 3000, 7), (9000, 1, 0)]):
        raw = bench.RawSync(tmp_path, src, sync)
        try:
            raw.runner(True)(ranges)
            written = raw.pos
        finally:
            raw.close()
        log = tmp_path / "rvm.log"
        rvm.create_log(log, 1 << 20, overwrite=True)
        with rvm.RVM(log) as r:
            region = r.map(tmp_path / "seg", 1 << 16)
            tid = r.begin_transaction()
            for off, n, _s in ranges:
                r.set_range(tid, region, off, n)
            r.end_transaction(tid)
        records = [rec for rec in rvm.scan_log(log)["records"] if rec["kind"] == "transaction"]
        assert [rec["length"] for rec in records] == [written]


def test_limit_uses_the_cheapest_durable_write_the_os_offers(tmp_path, monkeypatch):
    """Fair both ways: where hvext.rvm may commit with RWF_DSYNC, so does the limit by default."""
    bench = load_bench(monkeypatch)
    raw = bench.RawSync(tmp_path, bytes(4096))
    try:
        assert raw.dsync  # Linux has RWF_DSYNC (4.7+), Python exposes it (3.7+)
        written = []
        real = os.pwritev
        monkeypatch.setattr(bench.os, "pwritev", lambda fd, iov, off, flags=0: written.append(flags) or real(fd, iov, off))
        raw.runner(True)([(0, 100, 0)])
        assert written == [os.RWF_DSYNC]
    finally:
        raw.close()
