"""hvextd v1 against the real libvirtd: lifecycle events are logged, SIGTERM stops it cleanly."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from tests.unit.test_cli import DEAD_URI


class Hvextd:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "hvext.daemon.main", *args],
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip())

    def expect(self, text: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"hvextd never logged {text!r}; it logged: {seen}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


@pytest.fixture
def hvextd_factory() -> Iterator:
    daemons: list[Hvextd] = []

    def start(*args: str) -> Hvextd:
        daemons.append(Hvextd(*args))
        return daemons[-1]
    yield start
    for daemon in daemons:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()


def test_logs_lifecycle_events_and_stops_on_sigterm(hvextd_factory, tmp_path) -> None:
    daemon = hvextd_factory()
    daemon.expect("watching qemu:///system")
    name = f"hvext-test-{os.getpid()}-events"
    xml = tmp_path / "d.xml"
    xml.write_text(f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
                   "<os><type arch='x86_64'>hvm</type></os></domain>")
    try:
        subprocess.run(["virsh", "-q", "define", str(xml)], check=True, capture_output=True)
        daemon.expect(f"domain {name} defined")
    finally:
        subprocess.run(["virsh", "-q", "undefine", name], capture_output=True)
    daemon.expect(f"domain {name} undefined")
    assert daemon.stop() == 0
    daemon.expect("stopped")


def test_unreachable_libvirtd_is_retried_and_sigterm_still_stops_it(hvextd_factory) -> None:
    daemon = hvextd_factory("-c", DEAD_URI)
    daemon.expect("retrying in")
    assert daemon.stop() == 0
