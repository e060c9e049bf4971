"""QEMU serves one client per QMP monitor: hvextd and everyone else each have one, and the
sessions of one process share a connection, so nobody waits for a greeting that never comes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from hvext import aio
from hvext.host import Domain
from hvext.qmp import SocketQMP

ROOT = Path(__file__).resolve().parents[2]


def hvext(*argv: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process of its own, as a user runs it next to hvextd."""
    return subprocess.run([sys.executable, "-m", "hvext.cli.main", *argv], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_cli_works_while_the_daemon_holds_its_monitor(booted_vm: Domain) -> None:
    socket = booted_vm.facts().qmp_socket  # hvextd's monitor
    assert socket is not None

    async def hold_and_run() -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
        async with await SocketQMP(socket, name="as-hvextd").connect() as daemon:  # as hvextd holds it
            assert (await daemon.execute("query-status"))["running"]
            status = await asyncio.to_thread(hvext, "qmp", booted_vm.name, "query-status")
            memstat = await asyncio.to_thread(hvext, "dommemstat", booted_vm.name, "--json")
            assert (await daemon.execute("query-status"))["running"]  # the daemon's session lives on
            return status, memstat

    status, memstat = aio.run(hold_and_run())
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "running"
    assert memstat.returncode == 0, memstat.stderr
    stats = json.loads(memstat.stdout)
    assert stats["qmp_error"] is None and stats["balloon_actual"] > 0


def test_sessions_of_one_process_share_a_connection(booted_vm: Domain) -> None:
    """hvextd's reclaim follows a balloon for up to 90 s while a SIGPWR save needs QMP: both at once."""
    async def nested() -> tuple[str, str, bool]:
        async with booted_vm.qmp() as first:
            async with booted_vm.qmp() as second:
                a, b = await asyncio.gather(first.execute("query-status"), second.execute("query-balloon"))
                shared = first is second
        return a["status"], str(b["actual"]), shared

    status, actual, shared = aio.run(nested(), timeout=30)
    assert status == "running" and int(actual) > 0 and shared
    # closed when the last user left: a fresh session connects again
    assert aio.run(_status(booted_vm), timeout=30) == "running"


async def _status(domain: Domain) -> str:
    async with domain.qmp() as qmp:
        return str((await qmp.execute("query-status"))["status"])
