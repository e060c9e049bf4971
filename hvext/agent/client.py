"""An asyncio client for one domain's agent channel (a unix socket libvirt made).

Each session starts with ``guest-sync`` and a random nonce; lines before the
matching reply are stale and dropped. Any protocol violation marks the
session unsynced, so the next request synchronises again. A guest can make a
request fail (AgentTimeout, AgentProtocolError), never hang or crash hvext.

The client's :class:`State` says what it may do; a method called in the wrong
state raises an :class:`~hvext.errors.AgentError` saying so. The requests the
guest agent serves (``guest-agent/hvext_agent/agent.py``) are typed methods
(:meth:`AgentClient.exec`, :meth:`AgentClient.info`, ...) that return checked
values; :meth:`AgentClient.request` stays for the rest.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class AgentInfo:
    """A checked ``info`` result; what the guest left out or sent malformed is None."""

    agent_version: str | None
    protocol: int | None
    kernel: str | None
    machine: str | None
    hostname: str | None
    python: str | None
    uptime_s: float | None


def _text(value: Any, limit: int = 256) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    """A finite, non-negative number from the guest as float, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def agent_info(raw: dict[str, Any]) -> AgentInfo:
    """Check an agent ``info`` result (total: bad fields become None)."""
    protocol = raw.get("protocol")
    return AgentInfo(_text(raw.get("agent_version"), 64),
                     protocol if isinstance(protocol, int) and not isinstance(protocol, bool)
                     and 0 <= protocol < 2**31 else None,
                     _text(raw.get("kernel")), _text(raw.get("machine")), _text(raw.get("hostname")),
                     _text(raw.get("python"), 64), _number(raw.get("uptime_s")))


@dataclass(frozen=True)
class StressStatus:
    """A checked ``stress-status`` result. ``elapsed_s`` is None until the workload paces its writes
    (it first writes its whole working set once)."""

    running: bool
    elapsed_s: float | None = None
    pages_written: int | None = None
    achieved_mib_s: float | None = None
    pfn_sample: tuple[int, ...] = ()


MAX_PFN_SAMPLE = 4096


def stress_status(raw: dict[str, Any]) -> StressStatus:
    """Check an agent ``stress-status`` result; AgentProtocolError without a boolean ``running``."""
    running = raw.get("running")
    if not isinstance(running, bool):
        raise AgentProtocolError("agent stress-status result has no boolean 'running'")
    written = _number(raw.get("pages_written"))
    sample = raw.get("pfn_sample")
    frames = tuple(p for p in sample[:MAX_PFN_SAMPLE] if isinstance(p, int) and not isinstance(p, bool)
                   and 0 <= p < 1 << 55) if isinstance(sample, list) else ()
    return StressStatus(running, _number(raw.get("elapsed_s")),
                        int(written) if written is not None and written < 2**63 else None,
                        _number(raw.get("achieved_mib_s")), frames)


@dataclass(frozen=True)
class MemInfo:
    """A checked ``meminfo`` result: the guest's /proc/meminfo (kB) and /proc/vmstat counters."""

    meminfo_kb: dict[str, int]
    vmstat: dict[str, int]


def counters(raw: Any, limit: int = 4096) -> dict[str, int]:
    """Keep only str -> non-negative int entries of an untrusted mapping (bounded);
    AgentProtocolError when it is not a mapping at all."""
    if not isinstance(raw, dict):
        raise AgentProtocolError("agent meminfo section is not an object")
    clean: dict[str, int] = {}
    for key, value in list(raw.items())[:limit]:
        if isinstance(key, str) and len(key) <= 64 and isinstance(value, int) \
                and not isinstance(value, bool) and 0 <= value < 2**63:
            clean[key] = value
    return clean


def meminfo(raw: dict[str, Any]) -> MemInfo:
    """Check an agent ``meminfo`` result; AgentProtocolError if a section is missing."""
    return MemInfo(counters(raw.get("meminfo_kb")), counters(raw.get("vmstat")))


def pmem_namespaces(raw: Any) -> list[dict[str, Any]]:
    """The agent's ``pmem`` namespaces, checked: string names, an integer size, an optional mount (bounded)."""
    items = raw.get("namespaces") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise AgentProtocolError("agent pmem result has no namespaces list")

    def text(value: Any) -> str | None:
        return value[:128] if isinstance(value, str) else None

    namespaces = []
    for item in items[:256]:
        if not isinstance(item, dict):
            continue
        size = item.get("size")
        mount = item.get("mount") if isinstance(item.get("mount"), dict) else None
        namespaces.append({
            "namespace": text(item.get("namespace")), "mode": text(item.get("mode")),
            "size": size if isinstance(size, int) and not isinstance(size, bool) and 0 <= size < 2**63 else None,
            "blockdev": text(item.get("blockdev")), "chardev": text(item.get("chardev")),
            "mount": None if mount is None else {"mountpoint": text(mount.get("mountpoint")),
                                                 "fstype": text(mount.get("fstype")), "dax": mount.get("dax") is True}})
    return namespaces


@dataclass(frozen=True)
class PmemMount:
    """A checked ``pmem-mount`` result: the block device mounted (it may change when the guest
    reconfigured the namespace), where, whether with DAX, and the commands the guest ran."""

    blockdev: str | None
    mountpoint: str | None
    dax: bool
    steps: tuple[str, ...] = ()


def pmem_mount(raw: dict[str, Any]) -> PmemMount:
    """Check an agent ``pmem-mount`` result (total: malformed fields become None, False or dropped)."""
    steps = raw.get("steps")
    return PmemMount(_text(raw.get("blockdev"), 128), _text(raw.get("mountpoint"), 4096), raw.get("dax") is True,
                     tuple(s[:4096] for s in steps[:64] if isinstance(s, str)) if isinstance(steps, list) else ())


class State(enum.Enum):
    """Where an :class:`AgentClient` is; it only moves along these arrows::

        DISCONNECTED --connect--> CONNECTED --sync--> SYNCED
        SYNCED --timeout or protocol violation--> CONNECTED (the next request synchronises again)
        CONNECTED/SYNCED --channel closed or failed--> BROKEN
        any --close--> DISCONNECTED
    """

    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    SYNCED = "synced"
    BROKEN = "broken"


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
        self._state = State.DISCONNECTED
        self._broken_by = ""
        self._lock = asyncio.Lock()
        self.agent_version: str | None = None
        self.commands: frozenset[str] = frozenset()

    @property
    def state(self) -> State:
        return self._state

    def _require(self, action: str, *states: State) -> None:
        """Refuse *action* unless the client is in one of *states* (AgentUnavailable when it has no
        usable channel, AgentError for a misuse such as connecting twice)."""
        if self._state in states:
            return
        if self._state is State.DISCONNECTED:
            raise AgentUnavailable(f"cannot {action}: the agent channel {self.socket} is not connected")
        if self._state is State.BROKEN:
            raise AgentUnavailable(f"cannot {action}: the agent channel {self.socket} broke earlier "
                                   f"({self._broken_by}); close it and connect again")
        raise AgentError(f"cannot {action}: the agent client is {self._state.value}, "
                         f"not {' or '.join(s.value for s in states)}")

    async def connect(self) -> AgentClient:
        """Open the channel (DISCONNECTED -> CONNECTED; the first request synchronises)."""
        self._require("connect", State.DISCONNECTED)
        try:
            reader, self._writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket)), self.timeout)
        except (OSError, asyncio.TimeoutError) as err:
            raise AgentUnavailable(f"cannot open the agent channel {self.socket}: {err}") from err
        self._reader = LineReader(reader, self.max_line)
        self._state = State.CONNECTED
        return self

    async def close(self) -> None:
        """Close the channel, whatever the state (-> DISCONNECTED; :meth:`connect` may follow)."""
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
            self._writer = None
        self._reader = None
        self._state = State.DISCONNECTED

    async def __aenter__(self) -> AgentClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def sync(self, timeout: float | None = None) -> dict[str, Any]:
        """The handshake: send guest-sync with a random nonce, drop everything until its reply."""
        async with self._lock:
            self._require("synchronise", State.CONNECTED, State.SYNCED)
            return await self._sync(timeout or self.timeout)

    async def _sync(self, timeout: float) -> dict[str, Any]:
        nonce = secrets.randbits(53)
        self._state = State.CONNECTED
        assert self._writer is not None
        self._writer.write(b"\xff\n")  # ends any half-written line in the guest's parser
        result = await self._guarded(self._roundtrip("guest-sync", {"nonce": nonce}, timeout,
                                                     accept=lambda r: r.get("nonce") == nonce))
        protocol = result.get("protocol")
        if protocol != PROTOCOL_VERSION:
            raise AgentProtocolError(f"agent speaks protocol {protocol!r}, hvext speaks {PROTOCOL_VERSION}")
        version = result.get("agent_version")
        commands = result.get("commands")
        self.agent_version = version[:64] if isinstance(version, str) else None
        self.commands = frozenset(c for c in commands[:256] if isinstance(c, str)) \
            if isinstance(commands, list) else frozenset()
        self._state = State.SYNCED
        return {"agent_version": self.agent_version, "protocol": protocol, "commands": sorted(self.commands)}

    async def request(self, command: str, args: dict[str, Any] | None = None,
                      timeout: float | None = None) -> dict[str, Any]:
        """Run *command* in the guest and return its (schema-checked) result object."""
        timeout = timeout or self.timeout
        async with self._lock:
            self._require(f"send {command!r}", State.CONNECTED, State.SYNCED)
            if self._state is not State.SYNCED:
                await self._sync(timeout)
            return await self._guarded(self._roundtrip(command, args, timeout))

    async def _guarded(self, exchange: Awaitable[dict[str, Any]]) -> dict[str, Any]:
        """Await one exchange and move the state on its failure: a timeout or a protocol violation
        leaves the session unsynced, a channel that closed or failed leaves the client broken."""
        try:
            return await exchange
        except (AgentTimeout, AgentProtocolError):
            self._state = State.CONNECTED
            raise
        except AgentUnavailable as err:
            self._state, self._broken_by = State.BROKEN, str(err)[:200]
            raise

    # -- the guest agent's requests, typed --------------------------------
    async def ping(self) -> None:
        """A round trip that does nothing in the guest."""
        await self.request("ping")

    async def info(self) -> AgentInfo:
        """The agent's version and the guest's kernel, machine, host name and uptime, checked."""
        return agent_info(await self.request("info"))

    async def exec(self, argv: list[str], *, stdin: str = "", timeout: float = 60.0) -> ExecResult:
        """Run *argv* in the guest (at most *timeout* s there) and return its checked result."""
        raw = await self.request("exec", {"argv": argv, "stdin": stdin, "timeout": timeout}, timeout=timeout + 10)
        return exec_result(raw)

    async def pmem_hints(self) -> dict[str, Any]:
        """The guest's persistence hints, unchecked beyond being an object: only
        :func:`hvext.pmem.hints.validate` can check them (against the domain's devices)."""
        return await self.request("pmem-hints")

    async def pmem_freeze(self, guest_wait: float, *, timeout: float | None = None) -> dict[str, Any]:
        """Freeze hinting applications at their next epoch (the guest waits at most *guest_wait* s)
        and return the hints as :meth:`pmem_hints` does."""
        return await self.request("pmem-freeze", {"timeout": round(guest_wait, 3)}, timeout=timeout)

    async def pmem_thaw(self) -> None:
        """Let frozen applications go on past their epoch."""
        await self.request("pmem-thaw")

    async def stress_start(self, rate_mib_s: float, wss_mib: int) -> None:
        """Start the guest's memory-dirtying workload (replacing a running one)."""
        await self.request("stress-start", {"rate_mib_s": rate_mib_s, "wss_mib": wss_mib})

    async def stress_status(self) -> StressStatus:
        """The workload's checked status."""
        return stress_status(await self.request("stress-status"))

    async def stress_stop(self) -> None:
        """Stop the workload (nothing when none runs)."""
        await self.request("stress-stop")

    async def meminfo(self) -> MemInfo:
        """The guest's /proc/meminfo and /proc/vmstat, checked."""
        return meminfo(await self.request("meminfo"))

    async def pmem(self) -> list[dict[str, Any]]:
        """The guest's pmem namespaces (and their mounts), checked."""
        return pmem_namespaces(await self.request("pmem"))

    async def pmem_mount(self, blockdev: str, mountpoint: str, *, format: bool = False) -> PmemMount:
        """Mount the guest's pmem *blockdev* at *mountpoint* with DAX (*format* makes a new file system,
        destroying the device's data) and return the checked result."""
        return pmem_mount(await self.request("pmem-mount", {"blockdev": blockdev, "mountpoint": mountpoint,
                                                            "format": format}))

    async def memclass(self, *, interval: float | None = None, cached: bool = False,
                       max_age: float | None = None) -> dict[str, Any]:
        """The guest's memory classes, unchecked beyond being an object: only
        :func:`hvext.memory.classes.validate` can check them (against the host's limit).

        *interval* starts (or retimes) the agent's periodic sampler; *cached* takes
        its last sample when not older than *max_age* seconds.
        """
        args: dict[str, Any] = {"cached": cached}
        if interval is not None:
            args["interval"] = interval
        if max_age is not None:
            args["max_age"] = max_age
        return await self.request("memclass", args)

    async def _roundtrip(self, command: str, args: dict[str, Any] | None, timeout: float,
                         accept: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
        """Send one request and return the result of the first valid reply that matches it.

        Replies to other ids (or that *accept* refuses, e.g. a stale sync nonce) are
        skipped, up to MAX_SKIPPED_LINES; invalid lines likewise.
        """
        assert self._writer is not None and self._reader is not None  # the callers' _require
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
