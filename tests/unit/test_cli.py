"""CLI argument errors: each gives `error: ...` on stderr, exit status 1, and a hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvext.cli.main import main

DEAD_URI = "qemu+unix:///system?socket=/nonexistent/hvext-test/libvirt-sock"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("argv,message", [
    (["define", "x", "--memory", "12Q"], "invalid size '12Q'"),
    (["define", "x", "--memory=-5G"], "invalid size"),
    (["define", "x", "--memory", "16M"], "out of range"),
    (["define", "x", "--memory", "1G", "--current-memory", "2G"], "between 64 MiB and the maximum"),
    (["define", "bad name!"], "invalid domain name"),
    (["define"], "a domain name is required"),
    (["define", "x", "--vcpus", "0"], "'0' out of range: use 1 to 64"),
    (["define", "x", "--vcpus", "two"], "not a whole number: 'two'"),
    (["define", "x", "--vcpus", "9" * 5000], "not a whole number"),
    (["frobnicate"], "invalid choice"),
    (["start"], "required: DOMAIN"),
    (["start", "x", "--wait-agent", "-3"], "must be positive"),
    (["start", "x", "--wait-agent", "nan"], "not a finite number of seconds"),
    (["shutdown", "x", "--wait", "inf"], "not a finite number of seconds"),
    (["shutdown", "x", "--wait", "1e400"], "not a finite number of seconds"),
    (["shutdown", "x", "--wait", "9" * 400], "not a finite number of seconds"),
    (["shutdown", "x", "--wait", "864000"], "more than the maximum"),
    (["setmem", "x", "512M", "--wait", "NaN"], "not a finite number of seconds"),
    (["setmem", "x", "512M", "--wait", "10", "--stall=-inf"], "not a finite number of seconds"),
    (["setmem", "x", "9" * 40], "larger than the maximum"),
    (["setmem", "x", str(2**53 + 1) + "G"], "larger than the maximum"),
    (["reclaim", "x", "9" * 60 + "M"], "larger than the maximum"),
    (["reclaim", "x", "9" * 400], "longer than 64 characters"),
    (["define", "x", "--memory", "9" * 400], "longer than 64 characters"),
    (["memclass", "x", "--watch", "inf"], "not a finite number of seconds"),
    (["memclass", "x", "--watch", "1", "--count", "0"], "out of range"),
    (["console-log", "x", "--lines", "-1"], "out of range"),
    (["guest-exec", "--timeout", "nan", "x", "--", "true"], "not a finite number of seconds"),
    (["agent-ping", "x", "--timeout", "inf"], "not a finite number of seconds"),
    (["dirtylog", "x", "--seconds", "nan"], "not a finite number of seconds"),
    (["migrate", "x", "qemu:///system", "--timeout", "inf"], "not a finite number of seconds"),
    # (a pid file that does not exist: were the check gone, stop would find no daemon to stop)
    (["daemon", "stop", "--timeout", "nan", "--pid-file", "/nonexistent/hvext-test.pid"], "not a finite number"),
    (["daemon", "stop", "--timeout", "-1", "--pid-file", "/nonexistent/hvext-test.pid"], "must be positive"),
    (["pool-create", "/p", "--reservation", "9" * 400], "longer than 64 characters"),
    (["pool-create", "/p", "--limit", str(2**60) + "M"], "larger than the maximum"),
    (["qmp", "x", "query-status", "{not json"], "not valid JSON"),
    (["qmp", "x", "query-status", "[1]"], "must be a JSON object"),
    (["qmp", "x", "query-status", "[" * 100000], "not valid JSON"),
    (["guest-exec", "x"], "give the program to run after --"),
    (["nvm-ram", "x", "--attach", "1G"], "--attach needs --nvm-dir"),
    (["nvm-ram", "x", "--nvm-dir", "/srv/nvm"], "--nvm-dir goes with --attach"),
    (["nvm-ram", "x", "--attach", "1G", "--size", "1G", "--nvm-dir", "/n"], "one at a time"),
    (["nvm-ram", "x", "--wait", "5"], "--wait goes with --size"),
    (["nvm-ram", "x", "--size", "12Q"], "invalid size '12Q'"),
    (["nvm-ram", "x", "--size", "1G", "--wait", "nan"], "not a finite number of seconds"),
])
def test_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    status, out, err = run(capsys, *argv)
    assert status == 1
    assert err.splitlines()[-1].startswith("error: ") and message in err


def test_spec_file_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nmemmory = '1G'\n")
    status, _, err = run(capsys, "define", "--spec", str(bad))
    assert status == 1 and "unknown keys ['memmory']" in err
    bad.write_text("name = [")
    assert run(capsys, "define", "--spec", str(bad))[2].startswith("error: spec file")
    status, _, err = run(capsys, "define", "--spec", str(tmp_path / "absent.toml"))
    assert status == 1 and "cannot read spec file" in err


@pytest.mark.parametrize("argv", [["list"], ["dominfo", "x"], ["doctor", "--json"]])
def test_dead_libvirtd(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    status, out, err = run(capsys, "-c", DEAD_URI, *argv)
    assert status == 1
    if argv[0] == "doctor":  # doctor reports instead of failing on the first problem
        assert '"name": "libvirt"' in out and "cannot connect to libvirt" in out
    else:
        assert "cannot connect to libvirt" in err and "is libvirtd running?" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and "hvext" in capsys.readouterr().out
