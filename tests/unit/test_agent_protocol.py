"""The agent protocol: the real guest agent against the host client, and hostile fake peers."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hvext.agent.client import (AgentClient, AgentInfo, ExecResult, MemInfo, PmemMount, State, agent_info, meminfo,
                                 pmem_mount, stress_status)
from hvext.agent.protocol import MAX_LINE, LineReader, parse_reply
from hvext.errors import AgentError, AgentProtocolError, AgentTimeout, AgentUnavailable

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest-agent"))
from hvext_agent.agent import Agent  # noqa: E402

Peer = Callable[[socket.socket], None]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Peer], Path]]:
    """Run *peer* on the accepted end of a unix socket in a thread; yield the socket path."""
    servers: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def start(peer: Peer) -> Path:
        path = tmp_path / f"agent{len(servers)}.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(1)
        servers.append(server)

        def run() -> None:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    peer(conn)
                except OSError:
                    pass

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    yield start
    for server in servers:
        server.close()
    for thread in threads:
        thread.join(timeout=5)


def real_agent(testing: bool = False) -> Peer:
    def peer(conn: socket.socket) -> None:
        agent = Agent(conn.fileno(), testing=testing)
        while chunk := conn.recv(65536):
            agent.feed(chunk)
    return peer


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_real_agent_sync_ping_info_meminfo(serve) -> None:
    async def session() -> None:
        async with AgentClient(serve(real_agent()), timeout=5) as client:
            hello = await client.sync()
            assert hello["protocol"] == 1 and "meminfo" in hello["commands"]
            assert await client.ping() is None
            info = await client.info()
            assert isinstance(info, AgentInfo) and info.protocol == 1
            assert info.kernel and info.uptime_s is not None and info.uptime_s > 0
            mem = await client.request("meminfo")
            assert mem["meminfo_kb"]["MemTotal"] > 0 and "pgfault" in mem["vmstat"]
            typed = await client.meminfo()
            assert isinstance(typed, MemInfo) and typed.meminfo_kb["MemTotal"] == mem["meminfo_kb"]["MemTotal"]
            assert typed.vmstat["pgfault"] > 0
            with pytest.raises(AgentError, match="CommandNotFound"):
                await client.request("no-such-command")
    run(session())


def test_stale_replies_before_sync_are_dropped(serve) -> None:
    def peer(conn: socket.socket) -> None:
        conn.sendall(b'{"id": 1, "ok": true, "result": {"stale": true}}\n' * 5 + b'{"id": 2, "ok": tr')
        real_agent()(conn)

    async def session() -> None:
        async with AgentClient(serve(peer), timeout=5) as client:
            await client.sync()
            assert await client.request("ping") == {}
    run(session())


@pytest.mark.parametrize("mode,detail", [
    ("garbage", "invalid line"), ("huge", "over"), ("wrong-id", "unrelated"), ("bad-schema", "invalid line"),
    ("silence", "within"),
])
def test_misbehaving_real_agent_gives_clear_error_then_recovers(serve, mode: str, detail: str) -> None:
    async def session() -> None:
        async with AgentClient(serve(real_agent(testing=True)), timeout=1.5) as client:
            await client.request("x-test-misbehave", {"mode": mode})
            with pytest.raises(AgentTimeout, match=detail):
                await client.request("info")
            assert (await client.info()).kernel  # re-synchronised
    run(session())


def test_the_client_moves_through_its_states_and_refuses_calls_out_of_turn(serve) -> None:
    async def session() -> None:
        client = AgentClient(serve(real_agent(testing=True)), timeout=1.5)
        assert client.state is State.DISCONNECTED
        with pytest.raises(AgentUnavailable, match="cannot send 'ping': .* not connected"):
            await client.ping()
        await client.connect()
        try:
            assert client.state is State.CONNECTED
            with pytest.raises(AgentError, match="cannot connect: the agent client is connected"):
                await client.connect()
            await client.ping()  # synchronises first
            assert client.state is State.SYNCED
            await client.request("x-test-misbehave", {"mode": "silence"})
            with pytest.raises(AgentTimeout):
                await client.ping()
            assert client.state is State.CONNECTED  # unsynced: the next request synchronises again
            assert (await client.info()).kernel
            assert client.state is State.SYNCED
        finally:
            await client.close()
        assert client.state is State.DISCONNECTED
        with pytest.raises(AgentUnavailable, match="not connected"):
            await client.sync()
    run(session())


def test_a_channel_that_closed_leaves_the_client_broken_until_it_reconnects(serve) -> None:
    def one_reply(conn: socket.socket) -> None:
        agent, seen = Agent(conn.fileno()), b""
        while b"guest-sync" not in seen or not seen.endswith(b"\n"):  # the handshake, and nothing else
            if not (chunk := conn.recv(65536)):
                return
            agent.feed(chunk)
            seen += chunk
        conn.shutdown(socket.SHUT_RDWR)

    async def session() -> None:
        async with AgentClient(serve(one_reply), timeout=5) as client:
            await client.sync()
            with pytest.raises(AgentUnavailable, match="closed during 'ping'"):
                await client.ping()
            assert client.state is State.BROKEN
            with pytest.raises(AgentUnavailable, match="broke earlier .*closed during 'ping'.*connect again"):
                await client.info()  # refused at once, not sent into the dead channel
        assert client.state is State.DISCONNECTED
    run(session())


def test_info_and_stress_status_are_checked_whatever_the_guest_sends() -> None:
    assert agent_info({"kernel": ["x"], "protocol": True, "uptime_s": float("nan"), "hostname": "h" * 999}) \
        == AgentInfo(None, None, None, None, "h" * 256, None, None)
    assert agent_info({"uptime_s": 5, "protocol": 1}).uptime_s == 5.0
    status = stress_status({"running": True, "elapsed_s": 1.5, "pages_written": 7, "pfn_sample": [1, -1, "2", 3]})
    assert (status.running, status.elapsed_s, status.pages_written, status.pfn_sample) == (True, 1.5, 7, (1, 3))
    assert stress_status({"running": False}).elapsed_s is None  # not pacing yet
    with pytest.raises(AgentProtocolError, match="running"):
        stress_status({"running": "yes"})


def test_endless_line_keeps_memory_bounded(serve) -> None:
    stop = threading.Event()

    def flood(conn: socket.socket) -> None:
        conn.recv(4096)
        chunk = b"x" * 65536
        while not stop.is_set():
            conn.sendall(chunk)

    async def session() -> None:
        client = AgentClient(serve(flood), timeout=1.0)
        await client.connect()
        try:
            with pytest.raises(AgentTimeout, match="over"):
                await client.sync()
            assert client._reader is not None and len(client._reader.buffer) <= MAX_LINE + 65536
        finally:
            stop.set()
            await client.close()
    run(session())


def test_reply_flood_with_foreign_ids_is_a_protocol_error(serve) -> None:
    def peer(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b'{"id": 999999, "ok": true, "result": {}}\n' * 100)
        conn.recv(4096)

    async def session() -> None:
        async with AgentClient(serve(peer), timeout=5) as client:
            with pytest.raises(AgentProtocolError, match="match no request"):
                await client.sync()
    run(session())


def test_wrong_protocol_version_is_refused(serve) -> None:
    def peer(conn: socket.socket) -> None:
        data = b""
        while b'"guest-sync"' not in data or not data.endswith(b"\n"):  # the client sends b"\xff\n" first
            data += conn.recv(4096)
        request = json.loads([line for line in data.split(b"\n") if line.startswith(b"{")][0])
        reply = {"id": request["id"], "ok": True, "result": {"nonce": request["args"]["nonce"], "protocol": 99}}
        conn.sendall(json.dumps(reply).encode() + b"\n")
        conn.recv(4096)

    async def session() -> None:
        async with AgentClient(serve(peer), timeout=5) as client:
            with pytest.raises(AgentProtocolError, match="protocol 99"):
                await client.sync()
    run(session())


def test_closed_channel_and_missing_socket(serve, tmp_path: Path) -> None:
    async def session() -> None:
        async with AgentClient(serve(lambda conn: None), timeout=5) as client:
            with pytest.raises(AgentUnavailable, match="closed"):
                await client.sync()
        with pytest.raises(AgentUnavailable, match="cannot open"):
            await AgentClient(tmp_path / "nothing.sock").connect()
    run(session())


@pytest.mark.parametrize("line,message", [
    (b"[1, 2]", "not an object"), (b'{"id": 1}', "boolean 'ok'"), (b'{"id": true, "ok": true}', "invalid id"),
    (b'{"id": 1, "ok": true, "result": 5}', "not an object"), (b'{"id": 1, "ok": false, "error": "x"}', "error.class"),
    (b"\xff\xfe", "not JSON"),
])
def test_parse_reply_rejects(line: bytes, message: str) -> None:
    with pytest.raises(AgentProtocolError, match=message):
        parse_reply(line)


def test_line_reader_skips_oversized_lines() -> None:
    async def session() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"a" * 100 + b"\nshort\n" + b"b" * 300 + b"\nend\n")
        reader.feed_eof()
        lines = LineReader(reader, max_line=50)
        assert await lines.readline() == b"short"
        assert await lines.readline() == b"end"
        assert lines.oversized == 2
        with pytest.raises(EOFError):
            await lines.readline()
    run(session())


@pytest.mark.parametrize("line", [
    b"[" * 5000, b"[" * 100_000 + b"]" * 100_000, b'{"id": 1, "ok": true, "result": ' + b'{"a":' * 5000 + b"1" + b"}" * 5001,
    b'{"id": 1, "ok": true, "result": {"deep": ' + b"[" * 200 + b"]" * 200 + b"}}",  # under the parser's limit
    b'{"id": 1, "ok": true, "result": {"n": ' + b"9" * 5000 + b"}}",  # over Python's int-from-str limit
    b'{"id": 1, "ok": true, "result": {"n": ' + b"9" * 100 + b"}}",
    b'{"id": 1, "ok": true, "result": {"n": NaN}}', b'{"id": 1, "ok": true, "result": {"n": -Infinity}}',
    b'{"id": 1, "ok": true, "result": {"n": 1e999}}',
], ids=["open-5000", "nested-100000", "objects-5000", "nested-200", "int-5000-digits", "int-100-digits",
        "nan", "infinity", "1e999"])
def test_parse_reply_refuses_deep_nesting_and_absurd_numbers(line: bytes) -> None:
    with pytest.raises(AgentProtocolError):
        parse_reply(line)


def test_parse_reply_keeps_ordinary_nesting_and_numbers() -> None:
    reply = parse_reply(b'{"id": 3, "ok": true, "result": {"a": [[{"b": [1, 2.5, -3, 18446744073709551615]}]]}}')
    assert reply.result == {"a": [[{"b": [1, 2.5, -3, 2 ** 64 - 1]}]]}


def _agent_replies(lines: list[bytes]) -> list[dict]:
    """Feed *lines* to a real Agent on a socket pair and return every reply it sent."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.setblocking(False)
        agent = Agent(theirs.fileno())
        for line in lines:
            agent.feed(line + b"\n")
        ours.setblocking(False)
        data = b""
        try:
            while chunk := ours.recv(1 << 20):
                data += chunk
        except BlockingIOError:
            pass
    return [json.loads(raw) for raw in data.split(b"\n") if raw.strip()]


@pytest.mark.parametrize("line", [
    b"[" * 5000, b'{"id": 1, "cmd": "ping", "args": ' + b"[" * 100_000 + b"}",
    b'{"id": ' + b"9" * 5000 + b', "cmd": "ping"}', b'{"id": 1, "cmd": "ping", "args": {"x": NaN}}',
], ids=["open-5000", "nested-100000", "int-5000-digits", "nan"])
def test_agent_answers_hostile_requests_with_an_error_and_keeps_serving(line: bytes) -> None:
    first, second = _agent_replies([line, b'{"id": 2, "cmd": "ping", "args": {}}'])
    assert first["ok"] is False and first["error"]["class"] == "ParseError", first
    assert second == {"id": 2, "ok": True, "result": {}}


def test_constants_agree_across_the_host_guest_boundary() -> None:
    """Each side defines them once (host: hvext.agent.protocol, hvext.pmem.hints, hvext.agent.client;
    guest: hvext_agent and its modules); they must be equal (or fit) across the channel."""
    import hvext_agent
    from hvext_agent import agent as guest
    from hvext_agent import hints as guest_hints
    from hvext_agent import stress as guest_stress

    from hvext import domxml
    from hvext.agent import client, protocol
    from hvext.pmem import hints
    assert guest.HOST_MAX_LINE == protocol.MAX_LINE  # what the agent may send is what the host reads
    assert guest.MAX_LINE == protocol.AGENT_MAX_LINE  # and the other way round
    assert (guest.MAX_DEPTH, guest.MAX_INT_DIGITS) == (protocol.MAX_DEPTH, protocol.MAX_INT_DIGITS)
    assert hvext_agent.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION
    assert hvext_agent.PORT_NAME == protocol.CHANNEL_NAME == domxml.AGENT_PORT  # the port libvirt makes
    assert guest_hints.FREEZE_HOLD_S == hints.FREEZE_HOLD_S  # a freeze the host never thaws ends then
    assert guest_hints.KINDS == hints.KINDS
    assert guest_stress.PFN_SAMPLE <= client.MAX_PFN_SAMPLE  # the host keeps the whole sample


def test_a_request_longer_than_the_agent_reads_is_refused_on_the_host() -> None:
    from hvext.agent.protocol import AGENT_MAX_LINE, encode_request
    with pytest.raises(AgentError, match="at most"):
        encode_request(1, "exec", {"argv": ["cat"], "stdin": "x" * AGENT_MAX_LINE})


@pytest.mark.parametrize("script", [
    "import sys; sys.stdout.write('a' * 2_000_000)",                       # plain, 2 MB
    "import sys; sys.stdout.buffer.write(bytes(range(32)) * 70_000)",      # control bytes: 6 bytes each as JSON
    "import sys; sys.stdout.buffer.write(b'\\xff' * 500_000); sys.stderr.write('e' * 900_000)",  # invalid UTF-8
])
def test_large_exec_output_is_cut_to_fit_the_hosts_line_and_said_so(serve, script: str) -> None:
    async def session() -> None:
        async with AgentClient(serve(real_agent()), timeout=20) as client:
            result = await client.exec([sys.executable, "-c", script], timeout=30)
            assert result.exitcode == 0
            assert result.stdout_truncated is True and result.stdout_bytes > len(result.stdout)
            assert len(result.stdout) > 10_000  # as much as fits, not nothing
            await client.ping()
    run(session())


def test_small_exec_output_is_whole(serve) -> None:
    async def session() -> None:
        async with AgentClient(serve(real_agent()), timeout=20) as client:
            result = await client.exec(["sh", "-c", "printf 'hi\\n'; printf err >&2"])
            assert result == ExecResult(0, "hi\n", "err", False, False, 3, 3)
    run(session())


def test_a_reply_over_the_hosts_limit_becomes_an_error_the_host_can_read() -> None:
    ours, theirs = socket.socketpair()
    received = bytearray()

    def read() -> None:
        while chunk := ours.recv(1 << 20):
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with ours:
        with theirs:
            Agent(theirs.fileno()).send({"id": 5, "ok": True, "result": {"x": "\x01" * 100_000}})
        reader.join(timeout=10)
    lines = bytes(received).split(b"\n")
    assert len(lines[0]) <= MAX_LINE, f"a reply line of {len(lines[0])} bytes: the host would drop it"
    reply = parse_reply(lines[0])
    assert (reply.id, reply.ok, reply.error_class) == (5, False, "ReplyTooLong")


def test_pmem_mount_result_is_checked() -> None:
    assert pmem_mount({"blockdev": "pmem1", "mountpoint": "/mnt/pm", "dax": True, "steps": ["mount -o dax"]}) == \
        PmemMount("pmem1", "/mnt/pm", True, ("mount -o dax",))
    assert pmem_mount({"blockdev": 5, "dax": "yes", "steps": [1, "x" * 9000]}) == PmemMount(None, None, False, ("x" * 4096,))


def test_meminfo_without_its_sections_is_a_protocol_error() -> None:
    with pytest.raises(AgentProtocolError, match="not an object"):
        meminfo({"meminfo_kb": {"MemTotal": 1}})
    assert meminfo({"meminfo_kb": {"MemTotal": 1, "Bad": -1, "Flag": True}, "vmstat": {}}) == MemInfo({"MemTotal": 1}, {})
