"""`hvext lab` argument handling and status output, without touching the machine's network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hvext.lab as lab
from hvext.cli.main import main
from hvext.lab import daemons, plan
from hvext.lab.plan import LabState


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("argv,message", [
    (["lab"], "required: SUBCOMMAND"),
    (["lab", "up", "--hosts", "0"], "0 out of range: use 1 to 8"),
    (["lab", "up", "--hosts", "9"], "9 out of range: use 1 to 8"),
    (["lab", "up", "--hosts", "two"], "not a whole number"),
    (["lab", "sideways"], "invalid choice"),
])
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status, _, err = run(capsys, *argv)
    assert status == 1
    assert err.splitlines()[-1].startswith("error: ") and message in err


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    monkeypatch.setattr(plan, "RUN_DIR", directory)
    return directory


def test_status_without_a_lab(capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    assert run(capsys, "lab", "status")[1].startswith("no lab is up")
    status, out, _ = run(capsys, "lab", "status", "--json")
    assert status == 0 and json.loads(out) == {"up": False, "hosts": []}
    assert lab.Lab.load() is None


def test_status_of_a_recorded_lab_whose_hosts_are_gone(capsys: pytest.CaptureFixture[str], run_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    state = LabState(hosts=plan.new_hosts(2, run_dir), phase="up", created=0.0, run_dir=run_dir,
                     data_dir=run_dir / "data")
    run_dir.mkdir()
    lab.state_file(run_dir).write_text(state.to_json())
    monkeypatch.setattr(daemons, "probe_libvirt", lambda uri, tcp=None: daemons.Probe(False, error="refused"))
    status, out, _ = run(capsys, "lab", "status", "--json")
    data = json.loads(out)
    assert status == 0 and data["up"] is True and len(data["hosts"]) == 2
    assert data["hosts"][1]["uri_unix"] == f"qemu+unix:///system?socket={run_dir}/host2/libvirt/libvirt-sock"
    assert not any(h["answering"] for h in data["hosts"])
    status, out, _ = run(capsys, "lab", "status")
    assert "dead" in out and "host2 tls: refused" in out and "qemu+tls://198.18.0.12/system?pkipath=" in out


def test_malformed_state_file_is_reported(capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    run_dir.mkdir()
    lab.state_file(run_dir).write_text("{")
    status, _, err = run(capsys, "lab", "status")
    assert status == 1 and "not valid JSON" in err and "hvext lab down" in err


def test_fail_and_revive_without_a_lab(capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    for argv in (["lab", "fail", "host1"], ["lab", "revive", "host1"], ["lab", "partition", "host1"],
                 ["lab", "heal", "host1"]):
        status, _, err = run(capsys, *argv)
        assert status == 1 and err.startswith("error: no lab is up"), err


@pytest.mark.parametrize("argv,message", [
    (["lab", "fail", "host3"], "the lab has no host3: it has host1, host2"),
    (["lab", "fail", "hostx"], "not a lab host name: 'hostx'"),
    (["lab", "fail", "host1", "--battery", "5"], "--battery is the window of --power-loss"),
    (["lab", "fail", "host1", "--power-loss", "--battery", "-1"], "battery window must be 0 to 600 seconds"),
    (["lab", "fail", "host1", "--power-loss", "--battery", "soon"], "not a number of seconds"),
    (["lab", "fail", "host1", "--power-loss"], "host1's hvextd is not running, so it cannot get SIGPWR"),
    (["lab", "revive", "host2"], "host2 is up, not failed: only a failed host is revived"),
    (["lab", "fail"], "required: HOST"),
    (["lab", "partition", "host3"], "the lab has no host3: it has host1, host2"),
    (["lab", "heal", "hostx"], "not a lab host name: 'hostx'"),
    (["lab", "partition"], "required: HOST"),
])
def test_fail_and_revive_refuse_bad_requests_and_change_nothing(
        capsys: pytest.CaptureFixture[str], run_dir: Path, argv: list[str], message: str) -> None:
    state = LabState(hosts=plan.new_hosts(2, run_dir), phase="up", created=0.0, run_dir=run_dir,
                     data_dir=run_dir / "data")
    run_dir.mkdir()
    lab.state_file(run_dir).write_text(state.to_json())
    status, out, err = run(capsys, *argv)
    assert status == 1 and err.splitlines()[-1].startswith("error: ") and message in err, err
    assert lab.state_file(run_dir).read_text() == state.to_json()  # no host changed phase


def test_partition_and_heal_of_a_failed_host_are_refused(capsys: pytest.CaptureFixture[str], run_dir: Path) -> None:
    hosts = plan.new_hosts(2, run_dir)
    hosts[1].begin_fail()
    hosts[1].mark_failed()
    state = LabState(hosts=hosts, phase="up", created=0.0, run_dir=run_dir, data_dir=run_dir / "data")
    run_dir.mkdir()
    lab.state_file(run_dir).write_text(state.to_json())
    for argv in (["lab", "partition", "host2"], ["lab", "heal", "host2"]):
        status, _, err = run(capsys, *argv)
        assert status == 1 and "host2 is failed: only a host that is up can be" in err, err
        assert "hvext lab revive host2" in err
    assert lab.state_file(run_dir).read_text() == state.to_json()
