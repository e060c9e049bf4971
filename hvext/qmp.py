"""QMP sessions: hvext's own monitor sockets (with events) or libvirt passthrough.

A domain hvext defined carries two extra QMP monitors (see ``domxml.QMPMonitor``)
that :class:`SocketQMP` talks to with ``qemu.qmp``: commands and events, without
disturbing libvirt's own monitor. QEMU serves one client per monitor, so hvextd
uses one (:func:`use_monitor` ``("daemon")``) and every other process the other;
within a process, concurrent sessions share one connection (:func:`shared`:
qemu.qmp matches replies to commands and hands events to every listener). A
domain hvext did not define is reached through libvirt's QMP passthrough
(:class:`PassthroughQMP`): commands only. All raise
:class:`hvext.errors.QMPError` with the underlying error as cause; for a
command QEMU refused, with QEMU's error class and description
(``error_class``, ``desc``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, Runstate
from qemu.qmp import QMPError as _QMPLibError

from hvext.agent.protocol import loads as bounded_json
from hvext.errors import QMPError, UnsupportedError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
EXECUTE_TIMEOUT_S = 60.0

#: Longest QEMU error class or description kept on a QMPError.
MAX_ERROR_TEXT = 1000

Monitor = Literal["daemon", "cli"]
_monitor: Monitor = "cli"


def use_monitor(which: Monitor) -> None:
    """Choose which of a domain's hvext monitors this process uses (hvextd: "daemon"; default "cli")."""
    global _monitor
    if which not in ("daemon", "cli"):
        raise ValueError(f"unknown QMP monitor {which!r}")
    _monitor = which


def monitor() -> Monitor:
    """The hvext monitor this process uses (see :func:`use_monitor`)."""
    return _monitor


def _text(value: Any) -> str | None:
    """QEMU's error class or description, capped (it is untrusted), or None if it is not a string."""
    return value[:MAX_ERROR_TEXT] if isinstance(value, str) else None


class QMPSession(Protocol):
    """What capability packages may rely on."""

    supports_events: bool

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any: ...

    async def close(self) -> None: ...


class SocketQMP:
    """A qemu.qmp client on hvext's monitor socket; one logger per connection."""

    supports_events = True

    def __init__(self, socket: Path, *, name: str) -> None:
        self.socket = socket
        self.client = QMPClient(name)
        self.client.logger = logging.getLogger(f"hvext.qmp.{name}")

    async def connect(self) -> SocketQMP:
        try:
            await asyncio.wait_for(self.client.connect(str(self.socket)), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError as err:
            raise QMPError(f"hvext's QMP monitor at {self.socket} did not greet within {CONNECT_TIMEOUT_S:.0f} s; "
                           "QEMU serves one client per monitor: is another process using it? (hvextd has a "
                           "monitor of its own on domains defined since hvext gave them two)") from err
        except (ConnectError, OSError) as err:
            raise QMPError(f"cannot connect to hvext's QMP monitor at {self.socket}: {err}; "
                           "is the domain running?") from err
        return self

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        try:
            return await asyncio.wait_for(self.client.execute(command, arguments), EXECUTE_TIMEOUT_S)
        except ExecuteError as err:
            raise QMPError(f"QMP {command} failed: {err}", error_class=_text(err.error_class),
                           desc=_text(str(err))) from err
        except asyncio.TimeoutError as err:
            raise QMPError(f"QMP {command} timed out after {EXECUTE_TIMEOUT_S:.0f} s") from err
        except (_QMPLibError, OSError, EOFError) as err:
            raise QMPError(f"QMP {command}: monitor connection failed ({err}); did QEMU exit?") from err

    async def pass_fd(self, name: str, fd: int) -> None:
        """Hand QEMU the file descriptor *fd* (SCM_RIGHTS) under *name* (``getfd``), for ``fd:NAME`` URIs."""
        try:
            self.client.send_fd_scm(fd)
        except (_QMPLibError, OSError) as err:
            raise QMPError(f"passing a file descriptor to QEMU failed ({err}); did QEMU exit?") from err
        await self.execute("getfd", {"fdname": name})

    async def events(self, *names: str) -> AsyncIterator[dict[str, Any]]:
        """Yield events (all, or only *names*) until the caller stops iterating."""
        listener = EventListener(names or None)
        with self.client.listen(listener):
            async for event in listener:
                yield dict(event)

    @property
    def connected(self) -> bool:
        return bool(self.client.runstate == Runstate.RUNNING)

    async def close(self) -> None:
        await self.client.disconnect()

    async def __aenter__(self) -> SocketQMP:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class _Shared:
    session: SocketQMP
    users: int = 0


_sessions: dict[Path, _Shared] = {}
_connecting: dict[Path, asyncio.Lock] = {}


@contextlib.asynccontextmanager
async def shared(socket: Path, *, name: str) -> AsyncIterator[SocketQMP]:
    """A session on the monitor at *socket*, sharing this process's connection to it.

    The connection is opened by the first user and closed when the last one
    leaves; a connection that died is replaced for the next user. (QEMU would
    leave a second connection of the same process waiting for a greeting.)
    """
    lock = _connecting.setdefault(socket, asyncio.Lock())
    async with lock:
        entry = _sessions.get(socket)
        if entry is None or not entry.session.connected:
            entry = _Shared(await SocketQMP(socket, name=name).connect())
            _sessions[socket] = entry
        entry.users += 1
    try:
        yield entry.session
    finally:
        entry.users -= 1
        if entry.users == 0:
            if _sessions.get(socket) is entry:
                del _sessions[socket]
            await entry.session.close()


def passthrough_result(command: str, raw: str) -> Any:
    """The ``return`` of a QMP reply libvirt passed through (QEMU's text: checked, QMPError otherwise)."""
    reply = bounded_json(raw, QMPError, f"QEMU (through libvirt, for {command})")
    if not isinstance(reply, dict):
        raise QMPError(f"QMP {command}: QEMU's reply is not an object")
    if "error" in reply:
        error = reply["error"]
        desc = error.get("desc") if isinstance(error, dict) else None
        raise QMPError(f"QMP {command} failed: {desc if isinstance(desc, str) else str(error)[:200]}",
                       error_class=_text(error.get("class")) if isinstance(error, dict) else None,
                       desc=_text(desc))
    if "return" not in reply:
        raise QMPError(f"QMP {command}: QEMU's reply has neither 'return' nor 'error'")
    return reply["return"]


class PassthroughQMP:
    """libvirt's ``qemuMonitorCommand`` for domains without hvext's socket (no events)."""

    supports_events = False

    def __init__(self, send: Callable[[str, str], str]) -> None:
        """*send(command, request)*: QEMU's raw reply text, or QMPError (:meth:`hvext.host.Domain.monitor_command`)."""
        self.send = send

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        loop = asyncio.get_running_loop()
        raw = await loop.run_in_executor(None, self.send, command, json.dumps(request))
        return passthrough_result(command, raw)

    async def events(self, *names: str) -> AsyncIterator[dict[str, Any]]:
        raise UnsupportedError("QMP events need hvext's monitor socket; this domain was not defined by hvext")
        yield {}  # pragma: no cover  (makes this an async generator)

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> PassthroughQMP:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
