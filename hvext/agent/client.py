"""An asyncio client for one domain's agent channel (a unix socket libvirt made).

Each session starts with ``guest-sync`` and a random nonce; lines before the
matching reply are stale and dropped. Any protocol violation marks the
session unsynced, so the next request synchronises again. A guest can make a
request fail (AgentTimeout, AgentProtocolError), never hang or crash hvext.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

from hvext.agent.protocol import MAX_LINE, PROTOCOL_VERSION, LineReader, encode_request, parse_reply
from hvext.errors import AgentError, AgentProtocolError, AgentTimeout, AgentUnavailable

DEFAULT_TIMEOUT_S = 10.0
MAX_SKIPPED_LINES = 64


@dataclass(frozen=True)
class ExecResult:
    """A checked ``exec`` result: exit code and (possibly cut) output of a program run in the guest."""

    exitcode: int
    stdout: str
    stderr: str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_bytes: int = 0  # what the program wrote, before any cut
    stderr_bytes: int = 0


def exec_result(raw: Any) -> ExecResult:
    """Check an agent ``exec`` result; AgentProtocolError if it is not shaped right."""
    if not isinstance(raw, dict):
        raise AgentProtocolError("agent exec result is not an object")
    code, stdout, stderr = raw.get("exitcode"), raw.get("stdout"), raw.get("stderr")
    if not isinstance(code, int) or isinstance(code, bool) or not -256 <= code <= 255:
        raise AgentProtocolError("agent exec result has no valid exit code")
    if not isinstance(stdout, str) or not isinstance(stderr, str):
        raise AgentProtocolError("agent exec result has no stdout/stderr strings")
    flags = [raw.get(k, False) for k in ("stdout_truncated", "stderr_truncated")]
    sizes = [raw.get(k, len(v)) for k, v in (("stdout_bytes", stdout), ("stderr_bytes", stderr))]
    if not all(isinstance(f, bool) for f in flags) or \
            not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**63 for n in sizes):
        raise AgentProtocolError("agent exec result has invalid truncation fields")
    return ExecResult(code, stdout, stderr, flags[0], flags[1], sizes[0], sizes[1])


class AgentClient:
    """Request/reply over the agent channel; use as ``async with AgentClient(path) as agent``."""

    def __init__(self, socket: Path, *, name: str = "agent", timeout: float = DEFAULT_TIMEOUT_S,
                 max_line: int = MAX_LINE) -> None:
        self.socket = socket
        self.timeout = timeout
        self.max_line = max_line
        self.log = logging.getLogger(f"hvext.agent.{name}")
        self._reader: LineReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._next_id = secrets.randbits(31)  # ids of an earlier session's stale replies are unlikely to match
        self._synced = False
        self._lock = asyncio.Lock()
        self.agent_version: str | None = None
        self.commands: frozenset[str] = frozenset()

    async def connect(self) -> AgentClient:
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket)), self.timeout)
        except (OSError, asyncio.TimeoutError) as err:
            raise AgentUnavailable(f"cannot open the agent channel {self.socket}: {err}") from err
        self._reader = LineReader(reader, self.max_line)
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
            self._writer = None

    async def __aenter__(self) -> AgentClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def sync(self, timeout: float | None = None) -> dict[str, Any]:
        """The handshake: send guest-sync with a random nonce, drop everything until its reply."""
        async with self._lock:
            return await self._sync(timeout or self.timeout)

    async def _sync(self, timeout: float) -> dict[str, Any]:
        nonce = secrets.randbits(53)
        assert self._writer is not None
        self._writer.write(b"\xff\n")  # ends any half-written line in the guest's parser
        result = await self._roundtrip("guest-sync", {"nonce": nonce}, timeout,
                                       accept=lambda r: r.get("nonce") == nonce)
        protocol = result.get("protocol")
        if protocol != PROTOCOL_VERSION:
            raise AgentProtocolError(f"agent speaks protocol {protocol!r}, hvext speaks {PROTOCOL_VERSION}")
        version = result.get("agent_version")
        commands = result.get("commands")
        self.agent_version = version[:64] if isinstance(version, str) else None
        self.commands = frozenset(c for c in commands[:256] if isinstance(c, str)) \
            if isinstance(commands, list) else frozenset()
        self._synced = True
        return {"agent_version": self.agent_version, "protocol": protocol, "commands": sorted(self.commands)}

    async def request(self, command: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> dict[str, Any]:
        """Run *command* in the guest and return its (schema-checked) result object."""
        timeout = timeout or self.timeout
        async with self._lock:
            if not self._synced:
                await self._sync(timeout)
            try:
                return await self._roundtrip(command, args, timeout)
            except (AgentTimeout, AgentProtocolError):
                self._synced = False
                raise

    async def exec(self, argv: list[str], *, stdin: str = "", timeout: float = 60.0) -> ExecResult:
        """Run *argv* in the guest (at most *timeout* s there) and return its checked result."""
        raw = await self.request("exec", {"argv": argv, "stdin": stdin, "timeout": timeout}, timeout=timeout + 10)
        return exec_result(raw)

    async def _roundtrip(self, command: str, args: dict[str, Any] | None, timeout: float,
                         accept: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Send one request and return the result of the first valid reply that matches it.

        Replies to other ids (or that *accept* refuses, e.g. a stale sync nonce) are
        skipped, up to MAX_SKIPPED_LINES; invalid lines likewise.
        """
        if self._writer is None or self._reader is None:
            raise AgentUnavailable("agent channel is not connected")
        request_id = self._next_id
        self._next_id += 1
        deadline = time.monotonic() + timeout
        skipped = invalid = 0
        try:
            self._writer.write(encode_request(request_id, command, args))
            await asyncio.wait_for(self._writer.drain(), timeout)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                line = await asyncio.wait_for(self._reader.readline(), remaining)
                if not line.strip():
                    continue  # the agent ends stale partial lines with a bare newline
                try:
                    reply = parse_reply(line)
                except AgentProtocolError as err:
                    invalid += 1
                    self.log.warning("dropping invalid line from agent: %s", err)
                    if invalid > MAX_SKIPPED_LINES:
                        raise
                    continue
                if reply.id != request_id or (reply.ok and accept is not None and not accept(reply.result or {})):
                    skipped += 1
                    if skipped > MAX_SKIPPED_LINES:
                        raise AgentProtocolError(f"agent sent {skipped} replies that match no request")
                    continue
                if not reply.ok:
                    raise AgentError(f"agent command {command!r} failed: {reply.error_class}: {reply.error_desc}")
                assert reply.result is not None
                return reply.result
        except asyncio.TimeoutError as err:
            detail = []
            if invalid:
                detail.append(f"{invalid} invalid line(s)")
            if self._reader.oversized:
                detail.append(f"{self._reader.oversized} line(s) over {self.max_line} bytes")
            if skipped:
                detail.append(f"{skipped} unrelated repl(ies)")
            extra = f" (it sent {', '.join(detail)})" if detail else ""
            raise AgentTimeout(f"agent did not answer {command!r} within {timeout:.0f} s{extra}; "
                               "is the agent running in the guest?") from err
        except (EOFError, ConnectionError, OSError) as err:
            raise AgentUnavailable(f"agent channel closed during {command!r}: {err}") from err
