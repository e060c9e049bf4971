"""hvextd against the real libvirtd: lifecycle events are logged, SIGTERM stops it cleanly, and its
Prometheus endpoint agrees with virsh on a running guest."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hvext import aio
from hvext.host import Domain
from hvext.memory import balloon
from hvext.units import KIB, MIB
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


def dommemstat(name: str) -> dict[str, int]:
    """``virsh dommemstat NAME`` as {statistic: KiB}."""
    out = subprocess.run(["virsh", "dommemstat", name], check=True, capture_output=True, text=True).stdout
    return {key: int(value) for key, value in (line.split() for line in out.splitlines() if line.strip())}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=60) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_agrees_with_dommemstat(hvextd_factory, booted_vm: Domain, tmp_path: Path) -> None:
    name = booted_vm.name
    config = tmp_path / "hvextd.toml"
    config.write_text(f'[metrics]\naddress = "127.0.0.1"\nport = 0\ndomains = ["{name}"]\n')
    boot_target = balloon.recorded_target(booted_vm)
    assert boot_target is not None
    target = boot_target.bytes - 64 * MIB
    try:
        aio.run(balloon.set_and_follow(booted_vm, target, timeout=120))
        daemon = hvextd_factory("--config", str(config))
        url = re.search(r"http://\S+/metrics", daemon.expect("serving metrics on")).group(0)  # type: ignore[union-attr]
        daemon.expect("watching qemu:///system")
        samples = scrape(url)
        dom = (("domain", name),)
        stat = dommemstat(name)
        assert samples[("hvext_domain_balloon_actual_bytes", dom)] == stat["actual"] * KIB
        assert abs(stat["actual"] * KIB - target) <= balloon.REACHED_TOLERANCE
        assert samples[("hvext_domain_balloon_target_bytes", (("domain", name), ("source", "hvext")))] == target
        assert samples[("hvext_domain_memory_max_bytes", dom)] == booted_vm.info()["max_memory_kib"] * KIB
        rss = samples[("hvext_domain_qemu_rss_bytes", dom)]  # from /proc; virsh's from libvirt: close, not equal
        assert abs(rss - stat["rss"] * KIB) < 0.2 * stat["rss"] * KIB, (rss, stat["rss"])
        assert samples[("hvext_libvirt_connected", ())] == 1
        assert samples[("hvext_host_memory_available_bytes", ())] > 0
        # the agent's memory classes: a sampled guest's add up to about what it has (within 2%, plus what
        # the validator tolerates unaccounted)
        again = scrape(url)
        class_total = sum(v for (n, labels), v in again.items()
                          if n == "hvext_domain_memory_class_bytes" and ("domain", name) in labels)
        assert 0.5 * target < class_total <= target, class_total
        assert not any(n == "hvext_scrape_errors_total" and ("domain", name) in labels
                       for (n, labels) in again), again
        assert daemon.stop() == 0
        daemon.expect("stopped")
    finally:
        aio.run(balloon.set_and_follow(booted_vm, boot_target.bytes, timeout=120))
