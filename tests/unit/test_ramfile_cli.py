"""The suspend-to-RAM commands on libvirt's test driver: refusals say `error: ...`, exit 1, change nothing."""

from __future__ import annotations

import json

import libvirt
import pytest

from hvext.cli.main import main
from hvext.memory import ramfile

URI = "test:///default"  # its predefined domain "test" runs and keeps its RAM in no file


def test_to_ram_needs_a_ram_file_domain(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", URI, "managedsave", "test", "--to-ram"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not keep its RAM in a file" in err and "--ram-file" in err
    conn = libvirt.open(URI)
    try:
        assert conn.lookupByName("test").isActive()  # still running
    finally:
        conn.close()


def test_define_refuses_a_ram_file_and_a_swap_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", URI, "define", "hvext-test-both", "--ram-file", "--swap-file"]) == 1
    assert "exclude each other" in capsys.readouterr().err


def test_list_and_dominfo_show_libvirts_state_for_other_domains(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", URI, "list", "--all", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["test"]["state"] == "running"
    assert main(["-c", URI, "dominfo", "test", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ram_file"] is None and info["managed_save"] is False


def test_usage_is_counted_once() -> None:
    used = ramfile.Usage("running", 40 << 20, 200 << 20)
    assert used.total == 240 << 20 and used.to_dict()["total"] == 240 << 20


def test_private_memory_leaves_out_shared_memory() -> None:
    import os
    private = ramfile.process_private(os.getpid())
    status = dict(line.split(":", 1) for line in open(f"/proc/{os.getpid()}/status"))
    rss, shmem = (int(status[key].split()[0]) << 10 for key in ("VmRSS", "RssShmem"))
    assert 0 < private and abs(private - (rss - shmem)) < 8 << 20  # read a moment apart: RSS moves
