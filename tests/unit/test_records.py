"""The records workload (guest-agent/hvext_agent/records.py) on the host, and the host's checks of what
the guest reports about it (hvext/agent/records.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

GUEST_AGENT = Path(__file__).resolve().parents[2] / "guest-agent"
sys.path.insert(0, str(GUEST_AGENT))
from hvext_agent import records  # noqa: E402

from hvext.agent import records as host_records  # noqa: E402
from hvext.errors import AgentProtocolError, UsageError  # noqa: E402


def test_written_records_verify_and_the_status_names_the_last(tmp_path: Path) -> None:
    status = tmp_path / "status.json"
    assert records.write(str(tmp_path / "d"), str(status), count=50) == 50
    assert json.loads(status.read_text())["last_durable"] == 50
    result = records.verify(str(tmp_path / "d"))
    assert result["last_valid"] == 50 and result["contiguous"] and result["records"] == 50
    assert (tmp_path / "d" / records.FILE_NAME).stat().st_size == 50 * records.RECORD_SIZE


def test_a_writer_continues_after_the_last_valid_record(tmp_path: Path) -> None:
    records.write(str(tmp_path), str(tmp_path / "s"), count=5)
    with open(tmp_path / records.FILE_NAME, "ab") as handle:
        handle.write(b"\x01" * 40)  # a torn record: the one being written at a crash
    assert records.verify(str(tmp_path))["contiguous"]
    assert records.write(str(tmp_path), str(tmp_path / "s"), count=3) == 8
    result = records.verify(str(tmp_path))
    assert (result["last_valid"], result["contiguous"], result["tail_bytes"]) == (8, True, 0)


@pytest.mark.parametrize("damage", ["bit", "swap", "zero"])
def test_a_damaged_record_breaks_contiguity(tmp_path: Path, damage: str) -> None:
    records.write(str(tmp_path), str(tmp_path / "s"), count=10)
    path = tmp_path / records.FILE_NAME
    data = bytearray(path.read_bytes())
    third = slice(2 * records.RECORD_SIZE, 3 * records.RECORD_SIZE)
    if damage == "bit":
        data[2 * records.RECORD_SIZE + 50] ^= 1
    elif damage == "swap":  # an intact record in the wrong slot (record 4 where 3 belongs)
        data[third] = data[3 * records.RECORD_SIZE:4 * records.RECORD_SIZE]
    else:  # a lost write: the slot reads as zeros
        data[third] = bytes(records.RECORD_SIZE)
    path.write_bytes(bytes(data))
    result = records.verify(str(tmp_path))
    assert (result["last_valid"], result["contiguous"], result["bad"]) == (10, False, [3])


def test_a_missing_file_is_zero_records(tmp_path: Path) -> None:
    assert records.verify(str(tmp_path))["last_valid"] == 0
    assert records.verify(str(tmp_path))["contiguous"] is True


def test_every_record_reported_durable_survives_a_kill(tmp_path: Path) -> None:
    """SIGKILL of a running writer: each record its status ever named is in the file (the file's own
    durability is the kernel's job; this checks the order: durable first, then reported)."""
    status = tmp_path / "status.json"
    child = subprocess.Popen([sys.executable, "-m", "hvext_agent.records", "write", "--dir", str(tmp_path / "d"),
                              "--status", str(status)], env={**os.environ, "PYTHONPATH": str(GUEST_AGENT)})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if status.exists() and json.loads(status.read_text())["last_durable"] >= 200:
                break
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    durable = json.loads(status.read_text())["last_durable"]
    assert durable >= 200
    out = subprocess.run([sys.executable, "-m", "hvext_agent.records", "verify", "--dir", str(tmp_path / "d")],
                         env={**os.environ, "PYTHONPATH": str(GUEST_AGENT)}, capture_output=True, check=True)
    result = json.loads(out.stdout)
    assert result["contiguous"] and result["last_valid"] >= durable


def test_the_host_checks_what_the_guest_reports() -> None:
    assert host_records.parse_status('{"last_durable": 7, "t": 1.5, "pid": 42}') == \
        host_records.RecordsStatus(7, 1.5, 42)
    assert host_records.parse_status('{"last_durable": 7, "t": "x", "pid": true}') == \
        host_records.RecordsStatus(7, None, None)
    check = host_records.parse_check('{"last_valid": 9, "contiguous": true, "records": 9, "bad_count": 0}')
    assert check == host_records.RecordsCheck(9, True, 9, 0)
    for hostile in ["", "[]", '{"last_durable": -1}', '{"last_durable": 1e3}', '{"last_durable": true}',
                    "{" * 5000, '{"last_durable": ' + "9" * 5000 + "}"]:
        with pytest.raises(AgentProtocolError):
            host_records.parse_status(hostile)
    for hostile in ['{"last_valid": 1, "contiguous": 1, "records": 1, "bad_count": 0}',
                    '{"last_valid": 1, "contiguous": true, "records": 1}']:
        with pytest.raises(AgentProtocolError):
            host_records.parse_check(hostile)


def test_guest_paths_are_checked_before_anything_runs() -> None:
    class NoAgent:
        async def exec(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("nothing may run for a bad path")

    from hvext import aio
    for bad in ["relative/dir", "/x\n/y", ""]:
        with pytest.raises(UsageError):
            aio.run(host_records.start(NoAgent(), bad))  # type: ignore[arg-type]
