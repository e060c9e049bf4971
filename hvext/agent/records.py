"""The guest's records workload (``guest-agent/hvext_agent/records.py``) driven through the agent.

:func:`start` runs ``python3 -m hvext_agent.records write`` detached in the guest; :func:`status`
reads the last record it saw durable; :func:`verify` checks the record file (after a failover:
every record the guest saw durable must be there). What the guest sends back is untrusted: each
result is checked into a frozen value or raises :class:`~hvext.errors.AgentProtocolError`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from hvext.agent.client import AgentClient
from hvext.agent.protocol import loads
from hvext.errors import AgentError, AgentProtocolError, UsageError

DEFAULT_STATUS = "/run/hvext-records.json"
MAX_RECORD = 2**62


@dataclass(frozen=True)
class RecordsStatus:
    """The writer's status file: the last record made durable, and when (guest clock, Unix s)."""

    last_durable: int
    t: float | None
    pid: int | None


@dataclass(frozen=True)
class RecordsCheck:
    """``records verify``: the highest valid record and whether every record up to it is valid."""

    last_valid: int
    contiguous: bool
    records: int
    bad_count: int


def _path(what: str, path: str) -> str:
    if not path.startswith("/") or not path.isprintable() or len(path) > 1024 or "\n" in path:
        raise UsageError(f"{what} {path!r:.80} must be an absolute, printable guest path")
    return path


def _count(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_RECORD:
        raise AgentProtocolError(f"records workload: {key!r} is not a record count")
    return value


def _object(stdout: str, what: str) -> dict[str, Any]:
    value = loads(stdout.strip() or "null", AgentProtocolError, f"the guest's records {what}")
    if not isinstance(value, dict):
        raise AgentProtocolError(f"the guest's records {what} is not a JSON object")
    return value


def parse_status(stdout: str) -> RecordsStatus:
    """Check the status file's text."""
    raw = _object(stdout, "status")
    t, pid = raw.get("t"), raw.get("pid")
    return RecordsStatus(_count(raw, "last_durable"),
                         float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < 1e11
                         else None,
                         pid if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31 else None)


def parse_check(stdout: str) -> RecordsCheck:
    """Check ``records verify``'s output."""
    raw = _object(stdout, "verify output")
    contiguous = raw.get("contiguous")
    if not isinstance(contiguous, bool):
        raise AgentProtocolError("records verify: 'contiguous' is not a boolean")
    return RecordsCheck(_count(raw, "last_valid"), contiguous, _count(raw, "records"), _count(raw, "bad_count"))


async def start(agent: AgentClient, directory: str, *, status_file: str = DEFAULT_STATUS,
                interval: float = 0.0) -> None:
    """Start the writer detached in the guest, appending to *directory* (on the DAX-mounted PMEM)."""
    if not 0 <= interval <= 3600:
        raise UsageError(f"interval {interval!r} must be 0 to 3600 s")
    command = (f"mkdir -p {shlex.quote(_path('directory', directory))} && rm -f {shlex.quote(status_file)} && "
               f"setsid python3 -m hvext_agent.records write --dir {shlex.quote(directory)} "
               f"--status {shlex.quote(_path('status file', status_file))} --interval {interval:g} "
               f">{shlex.quote(status_file + '.log')} 2>&1 </dev/null &")  # its errors, if it fails
    result = await agent.exec(["sh", "-c", command], timeout=30)
    if result.exitcode != 0:
        raise AgentError(f"starting the records workload failed (exit {result.exitcode}): {result.stderr[-300:]}")


async def status(agent: AgentClient, status_file: str = DEFAULT_STATUS) -> RecordsStatus:
    """The writer's last durable record (0 before the first)."""
    result = await agent.exec(["cat", _path("status file", status_file)], timeout=30)
    if result.exitcode != 0:
        raise AgentError(f"no records status in the guest ({status_file}): {result.stderr[-300:]}")
    return parse_status(result.stdout)


async def stop(agent: AgentClient, status_file: str = DEFAULT_STATUS) -> RecordsStatus:
    """Stop the writer (SIGKILL by the pid in its status) and return its final status."""
    before = await status(agent, status_file)
    if before.pid is not None:
        await agent.exec(["kill", "-9", str(before.pid)], timeout=30)  # already gone: fine
    return await status(agent, status_file)


async def verify(agent: AgentClient, directory: str) -> RecordsCheck:
    """Run ``records verify`` on *directory* in the guest."""
    result = await agent.exec(["python3", "-m", "hvext_agent.records", "verify", "--dir",
                               _path("directory", directory)], timeout=120)
    if result.exitcode != 0:
        raise AgentError(f"records verify failed in the guest (exit {result.exitcode}): {result.stderr[-300:]}")
    return parse_check(result.stdout)
