"""SIGPWR to hvextd runs the power-loss save (libvirt's test driver, a private state dir: no VM).

The daemon's own libvirt loop cannot watch the test driver (no keepalive); the
power-loss handler runs on the main thread regardless, which is what this checks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def test_sigpwr_makes_hvextd_run_the_power_loss_save(tmp_path: Path) -> None:
    env = dict(os.environ, HVEXT_STATE_DIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    log = tmp_path / "hvextd.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "hvext.daemon.main", "-c", "test:///default"],
                                  stderr=out, env=env)
    try:
        deadline = time.monotonic() + 20
        while not log.read_text() and time.monotonic() < deadline:  # up (the test driver has no
            time.sleep(0.1)                                            # keepalive: it logs that, and retries)
        time.sleep(0.5)
        daemon.send_signal(signal.SIGPWR)
        while "bytes saved" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "power loss: 0 bytes saved" in log.read_text(), log.read_text()
        assert (tmp_path / "power" / "registry.lock").exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
