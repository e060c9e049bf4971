"""hvextd without systemd (hvext/daemon/service.py, ``hvext daemon``): a real hvextd on this host's libvirtd.

hvextd runs without a config (it only follows lifecycle events: nothing is
reclaimed), with an empty power registry (HVEXT_STATE_DIR under tmp_path).

Every test uses its own pid file, log and state directory under tmp_path and
stops what it started.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext.cli.main import main
from hvext.daemon import service
from hvext.lab import procs

from tests.support import require

URI = "qemu:///system"


def libvirtd_answers() -> bool:
    return subprocess.run(["virsh", "-q", "-c", URI, "version"], capture_output=True).returncode == 0


@pytest.fixture
def where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    require(os.geteuid() == 0, "hvextd on qemu:///system needs root")
    require(libvirtd_answers(), f"libvirtd does not answer on {URI} (setup/host.sh libvirtd starts it)")
    run = tmp_path / "run"
    monkeypatch.setenv("HVEXT_STATE_DIR", str(tmp_path / "state"))  # hvextd's power registry: empty
    paths = {"pid_file": run / "hvext" / "hvextd.pid", "log_file": tmp_path / "log" / "hvextd.log"}
    run.mkdir(mode=0o755)
    yield paths
    if not paths["pid_file"].is_symlink() and service.status(paths["pid_file"]).running:
        service.stop(pid_file=paths["pid_file"], timeout_s=10)
    for pid in ours():  # any the pid file does not name (a failed test)
        os.kill(pid, signal.SIGTERM)


def test_start_is_idempotent_and_stop_waits_and_removes_the_pid_file(where: dict[str, Path]) -> None:
    started = service.start(uri=URI, **where)
    assert not started.already and started.ready
    pid_file = where["pid_file"]
    assert pid_file.read_text() == f"{started.pid}\n"
    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(pid_file.parent.stat().st_mode) == 0o755
    assert service.is_hvextd(service.cmdline(started.pid) or [])
    assert b"watching qemu:///system" in where["log_file"].read_bytes()
    again = service.start(uri=URI, **where)
    assert again.already and again.pid == started.pid
    assert service.status(pid_file).pid == started.pid

    ref = procs.identify(started.pid)
    assert service.stop(pid_file=pid_file, timeout_s=10) == started.pid
    assert procs.identify(started.pid) != ref
    assert not pid_file.exists()
    assert service.stop(pid_file=pid_file) is None
    assert b"stopped" in where["log_file"].read_bytes()


def test_concurrent_starts_start_one_daemon(where: dict[str, Path]) -> None:
    """Several `hvext daemon start` at once: one starts hvextd, the others find it running."""
    paths = ["--pid-file", str(where["pid_file"]), "--log-file", str(where["log_file"])]
    command = [sys.executable, "-m", "hvext.cli.main", "-c", URI, "daemon", "start", *paths]
    starts = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=Path(__file__).resolve().parents[2]) for _ in range(4)]
    outputs = [p.communicate(timeout=60)[0] for p in starts]
    assert all(p.returncode == 0 for p in starts), outputs
    assert sum("hvextd started" in out for out in outputs) == 1, outputs
    assert sum("already running" in out for out in outputs) == 3, outputs
    assert ours() == [int(where["pid_file"].read_text())]


def ours() -> list[int]:
    """hvextd processes started by this test (their environment has its HVEXT_STATE_DIR)."""
    mark = f"HVEXT_STATE_DIR={os.environ['HVEXT_STATE_DIR']}".encode()
    found = []
    for pid in (int(name) for name in os.listdir("/proc") if name.isdigit()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if mark in environ and service.is_hvextd(service.cmdline(pid) or []):
            found.append(pid)
    return found


def test_a_reused_pid_is_stale_never_signalled_and_replaced(where: dict[str, Path]) -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        where["pid_file"].parent.mkdir(mode=0o755)
        where["pid_file"].write_text(f"{other.pid}\n")
        current = service.status(where["pid_file"])
        assert not current.running and "another process" in (current.stale or "")
        assert service.stop(pid_file=where["pid_file"]) is None
        assert other.poll() is None and not where["pid_file"].exists()

        where["pid_file"].write_text(f"{other.pid}\n")
        started = service.start(uri=URI, **where)
        assert not started.already and started.pid != other.pid
        assert where["pid_file"].read_text() == f"{started.pid}\n"
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_process_just_started_is_never_taken_for_a_dead_one(where: dict[str, Path]) -> None:
    """Right after exec, /proc/PID/cmdline is empty for a moment: still another process, not a dead PID."""
    where["pid_file"].parent.mkdir(mode=0o755)
    fd = os.open(where["pid_file"], os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(20):
            other = subprocess.Popen(["sleep", "60"])
            try:
                os.pwrite(fd, f"{other.pid:<12}".encode(), 0)  # at once: no time for the kernel to catch up
                assert "another process (sleep 60)" in (service.status(where["pid_file"]).stale or "")
            finally:
                other.kill()
                other.wait()
    finally:
        os.close(fd)


@pytest.mark.parametrize("content, why", [("999999999\n", "not running"), ("garbage", "not a PID"),
                                          ("1\n", "not a PID"), ("", "not a PID")])
def test_stale_pid_files_are_reported_and_removed(where: dict[str, Path], content: str, why: str) -> None:
    where["pid_file"].parent.mkdir(mode=0o755)
    where["pid_file"].write_text(content)
    current = service.status(where["pid_file"])
    assert not current.running and why in (current.stale or "")
    assert service.stop(pid_file=where["pid_file"]) is None
    assert not where["pid_file"].exists()


def test_a_daemon_that_dies_while_starting_is_an_error_with_its_log(where: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "hvextd.toml"
    config.write_text("[reclaim]\nfloor_mib = 3\n")
    with pytest.raises(service.ServiceError,
                       match=r"exited with status 1 .*\[reclaim\] unknown key floor_mib; allowed: "):
        service.start(uri=URI, config=config, **where)
    assert not where["pid_file"].exists()
    with pytest.raises(service.ServiceError, match="does not exist"):
        service.start(uri=URI, config=tmp_path / "missing.toml", **where)


def test_links_and_loose_directories_are_refused(where: dict[str, Path], tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    where["pid_file"].parent.mkdir(mode=0o755)
    where["pid_file"].symlink_to(victim)
    with pytest.raises(service.ServiceError, match="cannot read pid file"):
        service.start(uri=URI, **where)
    assert victim.read_text() == "keep\n"

    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(service.ServiceError, match="writable by no one else"):
        service.ensure_run_dir(loose)
    link = tmp_path / "link"
    link.symlink_to(loose)
    with pytest.raises(service.ServiceError, match="not a directory"):
        service.ensure_run_dir(link)


def test_is_hvextd_recognises_both_ways_of_running_it() -> None:
    assert service.is_hvextd(["/opt/hvext/bin/python3", "/opt/hvext/bin/hvextd", "--config", "x"])
    assert service.is_hvextd([sys.executable, "-m", "hvext.daemon.main"])
    assert not service.is_hvextd(["sleep", "60"])
    assert not service.is_hvextd(["vim", "hvext.daemon.main"])


def test_cli_status_start_stop(where: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    paths = ["--pid-file", str(where["pid_file"]), "--log-file", str(where["log_file"])]
    assert main(["daemon", "status", "--json", *paths]) == 3
    assert json.loads(capsys.readouterr().out)["running"] is False
    assert main(["-c", URI, "daemon", "start", *paths]) == 0
    assert "started" in capsys.readouterr().out
    assert main(["-c", URI, "daemon", "start", *paths]) == 0
    assert "already running" in capsys.readouterr().out
    assert main(["daemon", "status", "--json", *paths]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] is True and status["pid"] == int(where["pid_file"].read_text())
    assert main(["daemon", "stop", *paths]) == 0
    assert "stopped" in capsys.readouterr().out
    assert main(["daemon", "stop", *paths]) == 0
    assert "not running" in capsys.readouterr().out
    assert os.path.exists(where["pid_file"]) is False


def test_start_waits_for_ready_on_a_private_notify_socket(where: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Readiness is hvextd's READY=1 (not a log line); the socket's 0700 directory is gone afterwards.
    A relative --config is the caller's file (hvextd runs in /; it was looked up there, and failed)."""
    monkeypatch.chdir(tmp_path)
    Path("hvextd.toml").write_text("[power]\nbudget = 1\n")
    started = service.start(uri=URI, config=Path("hvextd.toml"), **where)
    assert started.ready and not started.already
    assert service.cmdline(started.pid)[-2:] == ["--config", str(tmp_path / "hvextd.toml")]  # type: ignore[index]
    assert os.environ.get("NOTIFY_SOCKET") is None
    assert not [p for p in where["pid_file"].parent.iterdir() if p.name.startswith(".notify-")]


def test_a_notify_socket_takes_only_the_started_process_word(tmp_path: Path) -> None:
    """READY=1 from another process (here this one) does not count: the kernel names the sender."""
    notify_socket = service.NotifySocket(tmp_path)
    try:
        assert stat.S_IMODE(notify_socket.directory.stat().st_mode) == 0o700
        sender = subprocess.Popen([sys.executable, "-c", "import sys; from hvext.daemon import notify; "
                                   "sys.exit(0 if notify.ready('x') else 1)"],
                                  env=os.environ | {"NOTIFY_SOCKET": str(notify_socket.path)},
                                  cwd=Path(__file__).resolve().parents[2])
        assert sender.wait(timeout=30) == 0
        assert notify_socket.receive(os.getpid(), 1.0) == {}  # sent by `sender`, not by us
        notify_sender = subprocess.Popen([sys.executable, "-c", "import sys, time; from hvext.daemon import notify; "
                                          "notify.ready('x'); time.sleep(5)"],
                                         env=os.environ | {"NOTIFY_SOCKET": str(notify_socket.path)},
                                         cwd=Path(__file__).resolve().parents[2])
        try:
            assert notify_socket.receive(notify_sender.pid, 20.0) == {"READY": "1", "STATUS": "x"}
        finally:
            notify_sender.kill()
            notify_sender.wait()
    finally:
        notify_socket.close()
    assert not notify_socket.directory.exists()


def test_cli_reload_checks_the_config_then_sighups(where: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    paths = ["--pid-file", str(where["pid_file"]), "--log-file", str(where["log_file"])]
    assert main(["daemon", "reload", *paths]) == 1
    assert "error: hvextd is not running" in capsys.readouterr().err
    config = tmp_path / "hvextd.toml"
    config.write_text("[power]\nbudget = 1\n")
    assert main(["-c", URI, "daemon", "start", "--config", str(config), *paths]) == 0
    pid = int(where["pid_file"].read_text())
    config.write_text("[power]\nbudget = 2\n")
    capsys.readouterr()
    assert main(["daemon", "reload", *paths]) == 0
    assert f"{config} is valid; hvextd (PID {pid}) rereads it (SIGHUP)" in capsys.readouterr().out
    deadline = time.monotonic() + 20
    while b"SIGHUP: reloaded" not in where["log_file"].read_bytes():
        assert time.monotonic() < deadline, where["log_file"].read_text()
        time.sleep(0.1)
    assert b"PowerConfig(budget=2.0)" in where["log_file"].read_bytes()

    config.write_text("[power]\nbudget = 2\n[reclaim]\nfloor = 1\n")
    assert main(["daemon", "reload", *paths]) == 1
    assert re.search(r"error: config .*\[reclaim\] unknown key floor; allowed: ", capsys.readouterr().err)
    time.sleep(1)
    assert where["log_file"].read_bytes().count(b"SIGHUP") == 1  # nothing was sent
    assert service.status(where["pid_file"]).pid == pid
