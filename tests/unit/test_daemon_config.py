"""hvextd's config file (hvext/daemon/config.py), its SIGHUP reload and its sd_notify readiness
(hvext/daemon/notify.py), checked on a real hvextd process on libvirt's test driver with a private
state directory (no libvirtd, no VM)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hvext.daemon import config as daemon_config
from hvext.daemon import main as daemon_main
from hvext.daemon import notify
from hvext.daemon.config import HAConfig, PowerConfig
from hvext.daemon.reclaim_loop import ReclaimConfig
from hvext.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hvextd.toml"
    path.write_text(text)
    return path


# --- the file -------------------------------------------------------------------------------------------

def test_an_absent_section_means_its_default(tmp_path: Path) -> None:
    """A file without [reclaim] used to start the reclaim loop with its defaults (a 2 GiB floor)."""
    config = daemon_config.load(write(tmp_path, "[power]\nbudget = 1\n"))
    assert config.get(ReclaimConfig) is None
    assert config.get(HAConfig) is None
    assert config.get(PowerConfig) == PowerConfig(1.0)
    assert daemon_config.load(write(tmp_path, "")).values == daemon_config.defaults().values
    empty = daemon_config.load(write(tmp_path, "[reclaim]\n"))
    assert empty.get(ReclaimConfig) == ReclaimConfig()  # present, even empty: on, with the defaults
    assert daemon_config.defaults().get(ReclaimConfig) is None
    assert daemon_config.defaults().get(PowerConfig) == PowerConfig()


@pytest.mark.parametrize("toml,message", [
    ("[metricz]\nlisten = 1\n", r"unknown section \[metricz\]; the sections are \[ha\], \[metrics\], \[placement\], \[power\], \[reclaim\]"),
    ("[reclaim.extra]\nx = 1\n", r"\[reclaim\] unknown key extra; allowed: domains, host_available_min_mib, "
                                 r"interval_s, method, nvm_dir, nvm_free_high_mib, nvm_free_min_mib, nvm_ram, "
                                 r"nvm_step_mib, step_mib$"),
    ("[reclaim]\nfloor = 1\nstep = 2\n", r"\[reclaim\] unknown keys floor, step; allowed: "),
    ("budget = 5\n", r"key outside any section 'budget'; the sections are "),
    ("[ha]\netcd_endpoints = ['etcd:2379']\n", r"\[ha\] etcd_endpoints: must be a list of https:// URLs"),
    ("[ha]\netcd_endpoints = ['http://192.0.2.1:2379']\n", r"\[ha\] etcd_endpoints: must be a list of https:// "),
    ("[ha]\nlease_ttl = 1\n", r"\[ha\] lease_ttl: must be a whole number of seconds from 2 to 300, not 1"),
    ("[ha]\nlease_ttl = 4\nfence_margin = 4\n", r"\[ha\] fence_margin: must be seconds from 0 to less than "
                                                 r"lease_ttl \(4\)"),
    ("[ha]\nhost = 'a/b'\n", r"\[ha\] host: must be a host name"),
    ("[ha]\ncredentials = 'pki'\n", r"\[ha\] credentials: must be an absolute directory path"),
    ("[ha]\ncluster = 5\n", r"\[ha\] cluster: must be a name"),
    ("[reclaim\n", r"is not valid TOML"),
])
def test_bad_files_are_refused_naming_file_section_key_and_what_is_allowed(tmp_path: Path, toml: str,
                                                                          message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(UsageError, match=re.escape(f"config {path}") + ".*" + message):
        daemon_config.load(path)


def test_every_section_and_key_is_documented_in_one_place() -> None:
    """The module docstring is the reference: a section or key added to SECTIONS must appear there."""
    doc = daemon_config.__doc__ or ""
    for name, spec in daemon_config.SECTIONS.items():
        assert f"``[{name}]``" in doc, name
        block = doc.split(f"``[{name}]``", 1)[1].split("\n\n``[", 1)[0]
        for key in spec.cls.KEYS:
            assert re.search(rf"^\s+{key} = ", block, re.M), f"[{name}] {key} is not documented"


def test_the_role_template_keys_are_accepted(tmp_path: Path) -> None:
    """What ansible/roles/hvext_host/templates/hvextd.toml.j2 writes ([reclaim], [ha]) passes."""
    path = write(tmp_path, '[reclaim]\ninterval_s = 10\nhost_available_min_mib = 2048\nstep_mib = 256\n'
                           'method = "auto"\ndomains = ["web1"]\n[power]\nbudget = 5\n'
                           '[ha]\ncluster = ""\n'
                           'etcd_endpoints = ["https://192.0.2.1:2379", "https://[2001:db8::1]:2379"]\n')
    config = daemon_config.load(path)
    assert config.get(HAConfig) == HAConfig("", ("https://192.0.2.1:2379", "https://[2001:db8::1]:2379"))
    assert config.get(ReclaimConfig) == ReclaimConfig(domains=("web1",))


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "[power]\nbudget = 3\n")
    assert daemon_main.main(["--config", str(good), "--check-config"]) == 0
    out = capsys.readouterr().out
    assert f"{good}: valid: [reclaim] off; [power] PowerConfig(budget=3.0); " in out and "; [ha] off" in out
    good.write_text("[power]\nbudget = 3\nbudgets = 4\n")
    assert daemon_main.main(["--config", str(good), "--check-config"]) == 1
    assert "error: config " in capsys.readouterr().err
    assert daemon_main.main(["--check-config"]) == 1


# --- sd_notify ------------------------------------------------------------------------------------------

@contextmanager
def listener(name: str | None = None, directory: Path | None = None) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket as systemd binds it: a path in *directory*, or the abstract name *name* ("@...")."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(30)
    try:
        if name is not None:
            sock.bind(b"\0" + name[1:].encode())
            yield sock, name
        else:
            assert directory is not None
            sock.bind(str(directory / "notify"))
            yield sock, str(directory / "notify")
    finally:
        sock.close()


def test_notify_reaches_a_path_and_an_abstract_socket(tmp_path: Path) -> None:
    with listener(directory=tmp_path) as (sock, where):
        assert notify.notify("READY=1", "STATUS=up", env={notify.ENV: where})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    with listener(name=f"@hvext-test-{os.getpid()}") as (sock, where):
        assert notify.notify("STOPPING=1", env={notify.ENV: where})
        assert sock.recv(4096) == b"STOPPING=1"
    assert not notify.notify("READY=1", env={})  # not supervised: nothing
    assert not notify.notify("READY=1", env={notify.ENV: "relative/path"})
    assert not notify.notify("READY=1", env={notify.ENV: str(tmp_path / "gone")})  # never raises


def hvextd(tmp_path: Path, *args: str, notify_socket: str | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    log = tmp_path / "hvextd.log"
    env = dict(os.environ, HVEXT_STATE_DIR=str(state), PYTHONPATH=str(ROOT))
    env.pop(notify.ENV, None)
    if notify_socket:
        env[notify.ENV] = notify_socket
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "hvext.daemon.main", "-c", "test:///default", *args],
                                stderr=out, env=env), log


@contextmanager
def running(daemon: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield daemon
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()


def messages(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().splitlines()


def test_hvextd_notifies_ready_reloading_and_stopping(tmp_path: Path) -> None:
    """What systemd's Type=notify needs: READY=1 once watching, RELOADING=1 then READY=1 around a
    SIGHUP, STOPPING=1 on SIGTERM (here on an abstract socket, as systemd may pass)."""
    config = write(tmp_path, "[power]\nbudget = 1\n")
    with listener(name=f"@hvext-test-notify-{os.getpid()}") as (sock, where):
        daemon, log = hvextd(tmp_path, "--config", str(config), notify_socket=where)
        with running(daemon):
            ready = messages(sock)
            assert ready == ["READY=1", "STATUS=watching test:///default (1 domains)"], log.read_text()
            daemon.send_signal(signal.SIGHUP)
            reloading = messages(sock)
            assert reloading[0] == "RELOADING=1" and re.fullmatch(r"MONOTONIC_USEC=\d+", reloading[1])
            assert messages(sock) == ["READY=1"]
            daemon.send_signal(signal.SIGTERM)
            assert messages(sock) == ["STOPPING=1"]
            assert daemon.wait(timeout=20) == 0, log.read_text()


def scrape(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=20) as reply:
        assert reply.status == 200
        body: bytes = reply.read()
    assert b"hvext_" in body
    return body


def wait_for(log: Path, pattern: str, count: int = 1, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if len(re.findall(pattern, text)) >= count:
            return text
        time.sleep(0.1)
    raise AssertionError(f"hvextd never logged {pattern!r} {count} time(s):\n{log.read_text()}")


def test_sighup_applies_a_valid_config_and_keeps_the_old_one_when_the_new_is_bad(tmp_path: Path) -> None:
    """A real hvextd: no [reclaim] (no rounds), then a floor no host reaches every second (rounds logged),
    then a bad file (error logged, the rounds go on), then [power] budget (used by the next SIGPWR save)
    with a [metrics] endpoint (served; a port it cannot bind is refused and the endpoint stays; removed:
    no longer served)."""
    config = write(tmp_path, "[power]\nbudget = 1\n")
    with listener(directory=tmp_path) as (sock, where):
        daemon, log = hvextd(tmp_path, "--config", str(config), notify_socket=where)
        with running(daemon):
            assert messages(sock)[0] == "READY=1", log.read_text()
            time.sleep(1.5)
            rounds = r"hvextd\.reclaim INFO: host available \d+ MiB < 1099511627776 MiB"
            assert not re.search(rounds, log.read_text())  # no [reclaim]: no loop

            config.write_text("[reclaim]\ninterval_s = 1\nhost_available_min_mib = 1099511627776\n")
            daemon.send_signal(signal.SIGHUP)
            wait_for(log, rounds, count=3)
            assert "SIGHUP: reloaded" in log.read_text()

            config.write_text("[reclaim]\ninterval_s = 0\n")
            daemon.send_signal(signal.SIGHUP)
            text = wait_for(log, r"ERROR: SIGHUP: config .*\[reclaim\] interval_s: must be a number of seconds "
                                 r"from 1 to 86400, not 0; the configuration in force stays")
            before = len(re.findall(rounds, text))
            wait_for(log, rounds, count=before + 2)  # the old config still runs its rounds
            assert daemon.poll() is None

            config.write_text("[power]\nbudget = 2.5\n[metrics]\nport = 0\n")
            daemon.send_signal(signal.SIGHUP)
            text = wait_for(log, "SIGHUP: reloaded", count=2)
            time.sleep(1.5)  # a round already under way may still log
            settled = len(re.findall(rounds, log.read_text()))
            time.sleep(2.5)
            assert len(re.findall(rounds, log.read_text())) == settled, "[reclaim] removed, rounds went on"
            url = re.findall(r"serving metrics on (http://\S+)", text)[-1]
            assert scrape(url)

            with socket.socket() as busy:  # a [metrics] port it cannot bind: refused, the endpoint stays
                busy.bind(("127.0.0.1", 0))
                busy.listen()
                config.write_text(f"[metrics]\nport = {busy.getsockname()[1]}\n")
                daemon.send_signal(signal.SIGHUP)
                text = wait_for(log, r"ERROR: SIGHUP: cannot serve metrics on 127\.0\.0\.1 port \d+: .*; the "
                                     r"configuration in force stays")
            url = re.findall(r"serving metrics on (http://\S+)", text)[-1]  # port 0 again: a new one
            assert scrape(url)

            config.write_text("[power]\nbudget = 2.5\n")
            daemon.send_signal(signal.SIGHUP)
            wait_for(log, "SIGHUP: reloaded", count=3)
            with pytest.raises(urllib.error.URLError):
                scrape(url)
            daemon.send_signal(signal.SIGPWR)
            wait_for(log, r"pre-pause budget 2\.5 s")
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=20) == 0, log.read_text()
