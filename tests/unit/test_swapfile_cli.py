"""``hvext swap-reservation`` and ``hvext swapfile``: output, JSON, and ``error: ...`` with exit 1 on bad input.

The reservation lives in a temporary STATE_DIR; domains come from libvirt's
test driver (none of them has file-backed RAM: what a real guest shows is in
tests/vm/test_swapfile.py).
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from hvext import paths
from hvext.cli.main import main
from hvext.memory import swapfile
from tests.unit import testdriver

MIB = 1 << 20
TEST = ["-c", "test:///default"]


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(paths, "STATE_DIR", tmp_path / "state")
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str, status: int = 0) -> tuple[str, str]:
    assert main(list(argv)) == status
    return capsys.readouterr()


def test_reservation_lifecycle(capsys) -> None:
    out, _ = run(capsys, *TEST, "swap-reservation", "create", "16")  # bare numbers are MiB
    assert "16.00 MiB allocated" in out
    path = swapfile.reservation_path()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(run(capsys, *TEST, "swap-reservation", "--json")[0])
    assert data["balance"] == {"total_bytes": 16 * MIB, "reservation_bytes": 16 * MIB, "vm_bytes": {},
                               "vm_sum_bytes": 0, "held_bytes": 16 * MIB, "drift_bytes": 0, "shortfall_bytes": 0,
                               "conserved": True}
    assert data["move"] is None and data["reservation"]["extents"] >= 1
    out, _ = run(capsys, *TEST, "swap-reservation")
    assert "Reservation total: 16.00 MiB" in out and "Balance:" in out and "conserved" in out
    data = json.loads(run(capsys, *TEST, "swap-reservation", "rebalance", "--json")[0])
    assert data["move"] == {"punched_bytes": 0, "refilled_bytes": 0}
    run(capsys, *TEST, "swap-reservation", "remove")
    assert not path.exists()


@pytest.mark.parametrize("argv, message", [
    (["create"], "SIZE goes with `create`"),
    (["show", "4G"], "SIZE goes with `create`"),
    (["create", "lots"], "invalid size"),
    (["create", "512K"], "at least 1 MiB"),
    (["show"], "no swap reservation on this host"),
    (["rebalance"], "no swap reservation on this host"),
    (["remove"], "does not exist"),
    (["grow"], "invalid choice"),
])
def test_reservation_errors(argv: list[str], message: str, capsys) -> None:
    _, err = run(capsys, *TEST, "swap-reservation", *argv, status=1)
    assert err.splitlines()[-1].startswith("error: ") and message in err, err
    assert not swapfile.reservation_path().exists()


def test_create_twice_is_refused(capsys) -> None:
    run(capsys, *TEST, "swap-reservation", "create", "2M")
    _, err = run(capsys, *TEST, "swap-reservation", "create", "4M", status=1)
    assert err.startswith("error: a reservation exists already")
    assert swapfile.info(swapfile.reservation_path()).apparent == 2 * MIB  # untouched


def test_swapfile_of_a_domain_without_one(capsys) -> None:
    _, err = run(capsys, *TEST, "swapfile", "no-such-domain", status=1)
    assert err.startswith("error: ") and "no-such-domain" in err
    with testdriver.running_domain(testdriver.PLAIN_XML, "swapfile") as dom:
        _, err = run(capsys, *TEST, "swapfile", dom.name, status=1)
    assert err.startswith("error: ") and "QEMU" in err  # the test driver's domains have no QEMU process


def test_define_swap_file_flag_reaches_the_xml(capsys, monkeypatch) -> None:
    from hvext.cli import domain as domain_cli

    args = main.__globals__["build_parser"]().parse_args(["define", "vm", "--swap-file"])
    spec = domain_cli.spec_from_args(args)
    assert spec.swap_file
    assert not domain_cli.spec_from_args(main.__globals__["build_parser"]().parse_args(["define", "vm"])).swap_file


def test_spec_file_swap_file_must_be_a_boolean(tmp_path: Path, capsys) -> None:
    spec = tmp_path / "vm.toml"
    spec.write_text('name = "vm"\nswap_file = "yes"\n')
    _, err = run(capsys, *TEST, "define", "--spec", str(spec), status=1)
    assert "swap_file must be true or false" in err
