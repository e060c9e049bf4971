"""Every validator of guest or QEMU data, fed arbitrary JSON-like values (deep nesting, huge and
non-finite numbers, wrong types): it returns a value or raises an HvextError, never anything else,
and what it returns can be serialised (``--json``) without tripping over the input."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hvext.agent import client, protocol
from hvext.dirty import pages, rate
from hvext.errors import HvextError
from hvext.memory import balloon, classes, stats
from hvext.pmem import hints

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest-agent"))
from hvext_agent import agent as guest  # noqa: E402

KEYS = ["id", "ok", "result", "error", "class", "desc", "ranges", "kind", "gpa", "length", "epochs", "count",
        "frozen", "missing", "errors", "version", "page_size", "total", "classes", "free", "pmem", "details",
        "kernel", "ballooned", "page-size", "blocks", "pages", "bitmap", "runs", "migratable", "dirty",
        "generation", "interval-ms", "actual", "stats", "last-update", "stat-free-memory", "exitcode", "stdout",
        "stderr", "stdout_truncated", "stdout_bytes", "namespaces", "mount", "size", "type", "data", "addr",
        "memaddr", "meminfo_kb", "vmstat", "status", "dirty-rate", "mode", "sample-pages", "cmd", "args", "name"]
VALUES = ["persistent", "volatile", "hot", "nvdimm", "virtio-pmem", "nvdimm0", "measured", "AAAA", "/x",
          "\x1b[2J", "[bold]", "\ud800"]


def _nest(depth: int, leaf: Any = 0) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"data": value}
    return value


scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
           | st.sampled_from([2 ** 64 - 1, 2 ** 63, 0, 1, 4096])
           | st.integers(min_value=4301, max_value=6000).map(lambda n: 10 ** n)  # over Python's str limit
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | st.sampled_from(VALUES))
json_like = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=6)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=8),
    max_leaves=40)
deep = st.integers(min_value=30, max_value=20_000).map(_nest)
anything = json_like | deep | st.builds(_nest, st.integers(1, 3), json_like)

def _shaped(keys: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the schema's keys (values from *keys*, else anything), so checks past the first run."""
    return st.fixed_dictionaries({}, optional={k: (v if v is not None else anything) for k, v in keys.items()})


def _valid_or(value: Any) -> st.SearchStrategy[Any]:
    return st.just(value) | anything


CLASS_COUNTS = st.dictionaries(st.sampled_from(list(classes.CLASSES)) | st.text(max_size=4),
                               st.integers(0, 2000) | anything, max_size=14)
SHAPED: dict[str, st.SearchStrategy[Any]] = {
    "hints": _shaped({"ranges": st.lists(_shaped({"kind": st.sampled_from(hints.KINDS) | anything,
                                                  "gpa": _valid_or(0x100000000), "length": _valid_or(4096)}),
                                         max_size=4),
                      "epochs": st.dictionaries(st.text(max_size=4), _shaped({"count": None}), max_size=3),
                      "frozen": None, "missing": None, "errors": None}),
    "windows": st.lists(_shaped({"type": st.sampled_from(["nvdimm", "virtio-pmem"]) | anything,
                                 "data": _shaped({"id": _valid_or("nvdimm0"), "addr": _valid_or(1 << 32),
                                                  "memaddr": None, "size": _valid_or(1 << 26)})}), max_size=3),
    "classes": _shaped({"version": _valid_or(1), "page_size": _valid_or(4096), "total": _valid_or(1000),
                        "classes": CLASS_COUNTS, "pmem": None, "details": None, "ballooned": None,
                        "sampled_at": None}),
    "pages": _shaped({"page-size": _valid_or(4096), "generation": _valid_or(1), "interval-ms": _valid_or(10),
                      "blocks": st.lists(_shaped({"id": _valid_or("pc.ram"), "pages": _valid_or(16),
                                                  "length": _valid_or(65536), "migratable": _valid_or(True),
                                                  "dirty": _valid_or(1), "runs": _valid_or([0, 1]),
                                                  "bitmap": _valid_or("AQA=")}), max_size=3)}),
    "balloon": _shaped({"actual": None, "stats": st.dictionaries(st.sampled_from(["stat-free-memory", "x"]),
                                                                 anything, max_size=3), "last-update": None}),
    "exec": _shaped({"exitcode": _valid_or(0), "stdout": _valid_or(""), "stderr": _valid_or(""),
                     "stdout_truncated": None, "stderr_truncated": None, "stdout_bytes": None, "stderr_bytes": None}),
    "meminfo": _shaped({"meminfo_kb": None, "vmstat": None}),
    "pmem-mount": _shaped({"blockdev": None, "mountpoint": None, "dax": None, "steps": None}),
    "namespaces": _shaped({"namespaces": st.lists(_shaped({"namespace": None, "size": None, "mount": None}),
                                                  max_size=3)}),
    "rate": _shaped({"dirty-rate": _valid_or(5), "sample-pages": _valid_or(512),
                     "mode": _valid_or("page-sampling"), "status": None}),
    "commands": st.lists(_shaped({"name": _valid_or("x")}), max_size=3),
    "counters": st.dictionaries(st.text(max_size=8), anything, max_size=4),
}

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WINDOWS = [(0x100000000, 64 << 20, "/dev/shm/x.img")]


class _Device:
    alias, path = "nvdimm0", "/dev/shm/x.img"


def _total(call: Callable[[], Any]) -> Any:
    """Run a validator: a value or an HvextError are fine; the value must serialise."""
    try:
        value = call()
    except HvextError:
        return None
    if hasattr(value, "to_dict"):
        json.dumps(value.to_dict(), default=str)
    return value


#: name -> (validator, the shaped inputs it is fed besides anything)
VALIDATORS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "hints.validate": (lambda raw: hints.validate(raw, WINDOWS, "vm"), "hints"),
    "hints._windows_from": (lambda raw: hints._windows_from(raw, {"nvdimm0": _Device()}), "windows"),
    "classes.validate": (lambda raw: classes.validate(raw, domain="vm", host_limit=1 << 30), "classes"),
    "classes.validate-no-limit": (lambda raw: classes.validate(raw, domain="vm"), "classes"),
    "client.counters": (client.counters, "counters"),
    # AgentClient.request returns an object, always: these validators are fed objects only
    "client.meminfo": (lambda raw: client.meminfo(raw) if isinstance(raw, dict) else None, "meminfo"),
    "client.pmem_mount": (lambda raw: client.pmem_mount(raw) if isinstance(raw, dict) else None, "pmem-mount"),
    "stats.guest_stats": (stats.guest_stats, "balloon"),
    "balloon.actual_bytes": (balloon.actual_bytes, "balloon"),
    "balloon.stat_value": (lambda raw: balloon.stat_value(raw, "stat-free-memory"), "balloon"),
    "balloon.stats_fresh": (balloon.stats_fresh, "balloon"),
    "pages.decode": (pages.decode, "pages"),
    "pages.command_names": (pages.command_names, "commands"),
    "rate.parse_result": (lambda raw: rate.parse_result(raw, "page-sampling", 1.0, 0.0), "rate"),
    "client.exec_result": (client.exec_result, "exec"),
    "client.pmem_namespaces": (client.pmem_namespaces, "namespaces"),
}


@pytest.mark.parametrize("name", sorted(VALIDATORS))
@PROPERTY
@given(data=st.data())
def test_validators_return_a_value_or_raise_hvext_error(name: str, data: st.DataObject) -> None:
    validator, shape = VALIDATORS[name]
    raw = data.draw(anything | SHAPED[shape], label="raw")
    _total(lambda: validator(raw))


def _dumps(value: Any) -> bytes:
    """JSON text of a generated value; huge ints and deep nesting get their own text strategies below."""
    try:
        return json.dumps(value, allow_nan=True).encode()
    except (ValueError, RecursionError):
        return b"null"


def _lines() -> st.SearchStrategy[bytes]:
    as_json = anything.map(_dumps)
    replies = st.fixed_dictionaries({"id": scalars, "ok": st.booleans() | scalars, "result": anything,
                                     "error": anything}).map(_dumps)
    nested_text = st.integers(1, 50_000).map(lambda n: b"[" * n) | st.integers(1, 50_000).map(
        lambda n: b'{"id":1,"ok":true,"result":' + b'{"a":' * n)
    huge_numbers = st.integers(1, 6000).map(lambda n: b'{"id":1,"ok":true,"result":{"n":' + b"7" * n + b"}}")
    return as_json | replies | nested_text | huge_numbers | st.binary(max_size=200)


@PROPERTY
@given(line=_lines())
def test_parse_reply_returns_a_reply_or_raises_protocol_error(line: bytes) -> None:
    reply = _total(lambda: protocol.parse_reply(line))
    if reply is not None:
        json.dumps(reply.result)  # no NaN, no huge int: what was kept can be printed as JSON


@PROPERTY
@given(line=_lines())
def test_guest_agent_answers_any_line_and_keeps_serving(line: bytes) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.setblocking(False)
        ours.settimeout(5)
        agent = guest.Agent(theirs.fileno())
        try:
            request = guest.parse_request(line.strip())
        except guest.RequestError:
            request = None
        if isinstance(request, dict) and request.get("cmd") not in ("ping", "guest-sync", None):
            return  # do not run arbitrary commands (exec, stress) on this machine
        agent.feed(line.replace(b"\n", b" ") + b"\n" + b'{"id": "last", "cmd": "ping"}\n')
        data = b""
        while not data.endswith(b'{"id":"last","ok":true,"result":{}}\n'):
            data += ours.recv(1 << 20)
