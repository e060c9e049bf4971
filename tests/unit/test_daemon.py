"""hvextd's loops survive failures (libvirt's test driver, a private state dir: no VM, no libvirtd),
and what QEMU sends the balloon and QMP code is checked before use."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hvext import aio, paths, qmp
from hvext.daemon import main as daemon_main
from hvext.daemon import config as daemon_config
from hvext.daemon import reclaim_loop
from hvext.daemon.config import PowerConfig
from hvext.daemon.reclaim_loop import ReclaimConfig
from hvext.errors import QMPError, UsageError
from hvext.host import Host
from hvext.memory import balloon
from hvext.memory import stats as memstats
from hvext.pmem import power

ROOT = Path(__file__).resolve().parents[2]


def test_reclaim_loop_logs_an_unexpected_failure_and_runs_the_next_round(caplog: pytest.LogCaptureFixture) -> None:
    """A round that raises something other than an HvextError (here a config value load() would refuse,
    changed at runtime) is logged with its traceback; the loop runs its next rounds and stops when told."""
    config = ReclaimConfig(interval_s=0.05, host_available_min_mib=None)  # type: ignore[arg-type]

    async def run_for(seconds: float) -> bool:
        stopping = asyncio.Event()
        task = asyncio.ensure_future(reclaim_loop.run(host, config, stopping))
        await asyncio.sleep(seconds)
        alive = not task.done()
        stopping.set()
        await asyncio.wait_for(task, 5)
        return alive

    with Host("test:///default") as host, caplog.at_level(logging.ERROR, "hvextd.reclaim"):
        assert aio.run(run_for(0.5)), "the loop died with its first failing round"
    failures = [r for r in caplog.records if "round failed unexpectedly" in r.getMessage()]
    assert len(failures) >= 2
    assert failures[0].exc_info is not None and failures[0].exc_info[0] is TypeError


@pytest.mark.parametrize("toml,message", [
    ("interval_s = inf", "interval_s: must be a number of seconds from 1 to 86400, not inf"),
    ("interval_s = nan", "interval_s: must be"),
    ("host_available_min_mib = true", "host_available_min_mib: must be an integer from 0 to"),
    ("step_mib = 1e9", "step_mib: must be an integer from 16 to"),
    ('domains = "web1"', "domains: must be a list of domain names"),
    ("domains = [1, 2]", "domains: must be a list"),
    ('method = "fast"', "method: must be one of 'auto', 'balloon', 'swap', not 'fast'"),
])
def test_reclaim_config_refuses_values_that_break_rounds(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "hvextd.toml"
    path.write_text(f"[reclaim]\n{toml}\n")
    with pytest.raises(UsageError, match=re.escape(f"config {path}: [reclaim] {message}")):
        daemon_config.load(path)


def _hvextd(state_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HVEXT_STATE_DIR=str(state_dir), PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "hvext.daemon.main", "-c", "test:///default"],
                                stderr=out, env=env)


def _wait_for(log: Path, text: str, count: int = 1, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text()
        if content.count(text) >= count:
            return content
        time.sleep(0.1)
    raise AssertionError(f"hvextd never logged {text!r} {count} time(s): {log.read_text()}")


def test_hvextd_survives_power_handlers_failing(tmp_path: Path) -> None:
    """The power directory cannot be created (a file is in the way): the restore check at start and
    every SIGPWR save fail, are logged, and hvextd keeps watching and still stops cleanly."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "power").write_text("not a directory")
    log = tmp_path / "hvextd.log"
    daemon = _hvextd(state, log)
    try:
        _wait_for(log, "watching test:///default")
        assert "cannot read the power registry" in log.read_text()
        for round_ in (1, 2):
            daemon.send_signal(signal.SIGPWR)
            _wait_for(log, "power-loss save failed", count=round_)
            assert daemon.poll() is None, log.read_text()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, log.read_text()
        assert "stopped" in log.read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


@pytest.mark.parametrize("event,actual", [
    ({"event": "BALLOON_CHANGE", "data": {"actual": 512 << 20}}, 512 << 20),
    ({"data": {"actual": "512"}}, -1), ({"data": []}, -1), ({"data": {"actual": True}}, -1),
    ({"data": {"actual": -5}}, -1), ({"data": {"actual": 2**64}}, -1), ({}, -1), ([], -1),
])
def test_balloon_event_actual_is_validated(event: object, actual: int) -> None:
    """QEMU's event data reached int() unchecked: a bad value killed the watcher (silently, see below)."""
    assert balloon.event_actual(event) == actual


def test_balloon_watcher_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The watcher's failures were suppressed (contextlib.suppress(Exception)); now they are logged."""
    async def broken() -> None:
        raise ConnectionResetError("monitor closed")

    async def reap() -> None:
        watcher = asyncio.ensure_future(broken())
        await asyncio.sleep(0)
        watcher.cancel()  # as follow() does: too late, the watcher has already failed
        await balloon._reap_watcher(watcher, "vm1")

    with caplog.at_level(logging.WARNING, "hvext.memory.balloon"):
        aio.run(reap())
    assert "BALLOON_CHANGE events of vm1 stopped (ConnectionResetError: monitor closed)" in caplog.text


@pytest.mark.parametrize("reply", [None, [], "x", {}, {"actual": "1"}, {"actual": True}, {"actual": -1},
                                   {"actual": 2**64}])
def test_query_balloon_reply_is_validated(reply: object) -> None:
    """QEMU's reply reached int(reply["actual"]): a KeyError or TypeError, not an hvext error."""
    with pytest.raises(QMPError, match="no valid 'actual'"):
        balloon.actual_bytes(reply)
    assert balloon.actual_bytes({"actual": 512 << 20}) == 512 << 20


@pytest.mark.parametrize("reply,stats,updated", [
    ({"stats": {"stat-free-memory": 5, "stat-x": 2**64 - 1, "stat-y": "7", 3: 4}, "last-update": 9},
     {"stat-free-memory": 5}, 9),
    ({"stats": [1, 2], "last-update": "soon"}, {}, None),
])
def test_guest_stats_reply_is_validated(reply: object, stats: dict[str, int], updated: int | None) -> None:
    assert memstats.guest_stats(reply) == (stats, updated)


@pytest.mark.parametrize("reply", [[], None, "x"])
def test_guest_stats_reply_that_is_not_an_object_is_refused(reply: object) -> None:
    with pytest.raises(QMPError, match="not an object"):
        memstats.guest_stats(reply)


@pytest.mark.parametrize("raw,message", [
    ("[1]", "not an object"), ("{not json", "not JSON"), ("[" * 100000, "nested too deeply"),
    ('{"error": "boom"}', "failed: boom"), ('{"error": {"class": "GenericError", "desc": "no"}}', "failed: no"),
    ('{"id": 1}', "neither 'return' nor 'error'"),
])
def test_passthrough_replies_are_validated(raw: str, message: str) -> None:
    """libvirt passes QEMU's text through: a list, a string error or deep nesting raised
    AttributeError or RecursionError instead of a QMPError."""
    with pytest.raises(QMPError, match=message):
        qmp.passthrough_result("query-status", raw)
    assert qmp.passthrough_result("query-status", '{"return": {"status": "running"}}') == {"status": "running"}


@pytest.mark.parametrize("toml,message", [
    ("budget = nan", r"\[power\] budget: "), ("budget = inf", r"\[power\] budget: "),
    ("budget = -1", r"\[power\] budget: "), ("budget = 1e9", r"\[power\] budget: .* 0 to 300 seconds"),
    ('budget = "5"', r"\[power\] budget: "), ("budget = true", r"\[power\] budget: "),
    ("budgets = 5", r"\[power\] unknown key budgets; allowed: budget$"),
    ("power = 5", r"\[power\] must be a section \(a table\), not int"),
])
def test_power_config_refuses_bad_budgets(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "hvextd.toml"
    path.write_text(toml + "\n" if toml.startswith("power =") else f"[power]\n{toml}\n")
    with pytest.raises(UsageError, match=message):
        daemon_config.load(path)


def test_power_config_budget(tmp_path: Path) -> None:
    path = tmp_path / "hvextd.toml"
    path.write_text("[reclaim]\nstep_mib = 64\n")
    assert daemon_config.load(path).get(PowerConfig) == PowerConfig(None)  # no [power]: power's default
    path.write_text("[power]\nbudget = 2\n")
    assert daemon_config.load(path).get(PowerConfig) == PowerConfig(2.0)


def test_hvextd_refuses_a_bad_power_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "hvextd.toml"
    path.write_text("[power]\nbudget = nan\n")
    assert daemon_main.main(["-c", "test:///default", "--config", str(path)]) == 1
    assert "error: config" in capsys.readouterr().err


def test_a_sigpwr_save_logs_registrations_of_gone_domains_and_uses_the_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(paths, "STATE_DIR", tmp_path)
    with power.registry() as regs:
        regs.append(power.Registration("hvext-unit-gone", "00000000-0000-4000-8000-00000000dead",
                                       str(tmp_path / "gone.img"), str(tmp_path / "store"), "nvdimm", 65536,
                                       "memnvdimm0"))
    with caplog.at_level(logging.WARNING, "hvextd"):
        daemon_main.on_power_loss("test:///default", budget=2.5)
    assert f"power loss: hvext-unit-gone {tmp_path / 'gone.img'}: registered, but the domain no longer exists" \
        in caplog.text
    assert "(pre-pause budget 2.5 s)" in caplog.text
