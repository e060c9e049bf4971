"""The agent wire protocol, host side: framing and validation of untrusted replies.

Everything the guest sends is untrusted. Lines are capped at
:data:`MAX_LINE` bytes (longer ones are skipped, never buffered whole), JSON
is parsed only from capped lines, with bounded nesting (:data:`MAX_DEPTH`)
and numbers (at most :data:`MAX_INT_DIGITS` digits, finite floats, no
NaN/Infinity), and replies are checked against a schema before anyone looks
inside. Validation failures raise :class:`hvext.errors.AgentProtocolError`,
never anything else.

The guest agent (``guest-agent/hvext_agent``, standard library only) keeps
its own copies of the protocol version, the channel name and these limits;
``tests/unit/test_agent_protocol.py`` checks that both sides agree.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

from hvext.errors import AgentError, AgentProtocolError, HvextError

PROTOCOL_VERSION = 1
#: The virtio-serial port the agent listens on (``hvext_agent.PORT_NAME`` in the guest).
CHANNEL_NAME = "org.hvext.agent.0"
#: Longest reply line the host reads (the agent caps what it sends to fit, JSON escaping included).
MAX_LINE = 256 * 1024
#: Longest request line the agent reads (its ``MAX_LINE``).
AGENT_MAX_LINE = 64 * 1024
#: Deepest nesting of arrays/objects accepted, on both sides (replies need about 6).
MAX_DEPTH = 32
#: Longest integer accepted, on both sides (Python refuses more than 4300 digits anyway).
MAX_INT_DIGITS = 40
READ_CHUNK = 64 * 1024


def encode_request(request_id: int, command: str, args: dict[str, Any] | None = None) -> bytes:
    """One request line; AgentError if it is longer than the agent reads."""
    line = json.dumps({"id": request_id, "cmd": command, "args": args or {}},
                      separators=(",", ":")).encode() + b"\n"
    if len(line) > AGENT_MAX_LINE:
        raise AgentError(f"agent request {command!r} is {len(line)} bytes; the agent reads at most {AGENT_MAX_LINE}")
    return line


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _refuse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _too_deep(value: Any, limit: int) -> bool:
    """True if *value* nests arrays/objects more than *limit* levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def loads(line: bytes | str, error: type[HvextError] = AgentProtocolError, source: str = "agent") -> Any:
    """Parse untrusted JSON (from *source*) within hvext's limits, or raise *error*, never anything else."""
    try:
        value = json.loads(line, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_refuse_constant)
    except RecursionError as err:
        raise error(f"{source} sent JSON nested too deeply ({len(line)} bytes)") from err
    except (ValueError, UnicodeDecodeError, TypeError) as err:
        raise error(f"{source} sent a line that is not JSON within hvext's limits ({len(line)} bytes)") from err
    if _too_deep(value, MAX_DEPTH):
        raise error(f"{source} sent JSON nested more than {MAX_DEPTH} levels")
    return value


@dataclass(frozen=True)
class Reply:
    """A schema-checked reply: either ``result`` (ok) or ``error_class``/``error_desc``."""

    id: int | str | None
    ok: bool
    result: dict[str, Any] | None = None
    error_class: str = ""
    error_desc: str = ""


def parse_reply(line: bytes) -> Reply:
    """Parse one line into a :class:`Reply` or raise AgentProtocolError saying what is wrong."""
    message = loads(line)
    if not isinstance(message, dict):
        raise AgentProtocolError("agent sent JSON that is not an object")
    reply_id = message.get("id")
    if reply_id is not None and (not isinstance(reply_id, (int, str)) or isinstance(reply_id, bool)):
        raise AgentProtocolError("agent reply has an invalid id")
    ok = message.get("ok")
    if ok is True:
        result = message.get("result")
        if not isinstance(result, dict):
            raise AgentProtocolError("agent reply 'result' is not an object")
        return Reply(reply_id, True, result=result)
    if ok is False:
        error = message.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("class"), str) \
                or not isinstance(error.get("desc"), str):
            raise AgentProtocolError("agent error reply lacks error.class/error.desc strings")
        return Reply(reply_id, False, error_class=error["class"][:100], error_desc=error["desc"][:1000])
    raise AgentProtocolError("agent reply has no boolean 'ok'")


class LineReader:
    """Reads newline-terminated lines of at most *max_line* bytes from a stream.

    A longer line is consumed and dropped (``oversized`` counts them) without
    ever holding more than *max_line* + one chunk in memory.
    """

    def __init__(self, reader: asyncio.StreamReader, max_line: int = MAX_LINE) -> None:
        self.reader = reader
        self.max_line = max_line
        self.buffer = bytearray()
        self.discarding = False
        self.oversized = 0

    async def readline(self) -> bytes:
        """The next complete line without its newline; EOFError when the stream ends."""
        while True:
            newline = self.buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self.buffer[:newline])
                del self.buffer[: newline + 1]
                if self.discarding:
                    self.discarding = False
                    continue
                if len(line) > self.max_line:
                    self.oversized += 1
                    continue
                return line
            if len(self.buffer) > self.max_line:
                if not self.discarding:
                    self.oversized += 1
                self.discarding = True
                self.buffer.clear()
            chunk = await self.reader.read(READ_CHUNK)
            if not chunk:
                raise EOFError("agent channel closed")
            self.buffer += chunk
