"""Domain.wait_agent notices an agent that comes up within a fraction of a second (it polls at a
short fixed interval; a growing back-off added up to 2 s to every `hvext start --wait-agent`).

A running domain of libvirt's test driver whose agent channel is a unix socket where the real guest
agent (guest-agent/hvext_agent) starts serving at a known moment.
"""

from __future__ import annotations

import platform
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from hvext import aio
from hvext.domxml import AGENT_PORT
from hvext.host import Host

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest-agent"))
from hvext_agent.agent import Agent  # noqa: E402


@pytest.fixture
def domain_with_channel(tmp_path: Path) -> Iterator[tuple[Host, str, Path]]:
    sock = tmp_path / "agent.sock"
    host = Host("test:///default")
    name = f"hvext-test-agent-{uuid.uuid4().hex[:8]}"
    dom = host.conn.createXML(
        f"<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os>"
        f"<devices><channel type='unix'><source mode='bind' path='{sock}'/>"
        f"<target type='virtio' name='{AGENT_PORT}'/></channel></devices></domain>", 0)
    try:
        yield host, name, sock
    finally:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
        host.conn.close()


def serve_agent_at(sock: Path, delay: float, stop: threading.Event) -> threading.Thread:
    """After *delay* seconds, serve the real agent on *sock* (one connection at a time) until *stop*."""
    def run() -> None:
        if stop.wait(delay):
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(sock))
            server.listen(4)
            server.settimeout(0.1)
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(0.5)
                    agent = Agent(conn.fileno())
                    while not stop.is_set():
                        try:
                            chunk = conn.recv(65536)
                        except TimeoutError:
                            continue
                        if not chunk:
                            break
                        agent.feed(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_wait_agent_answers_soon_after_the_agent_comes_up(domain_with_channel: tuple[Host, str, Path]) -> None:
    host, name, sock = domain_with_channel
    stop = threading.Event()
    up_after = 3.2  # past several attempts: a back-off would be sleeping up to 2 s by now
    started = time.monotonic()
    thread = serve_agent_at(sock, up_after, stop)
    try:
        info = aio.run(host.lookup(name).wait_agent(20))
        waited = time.monotonic() - started
    finally:
        stop.set()
        thread.join(timeout=5)
    assert info.kernel
    assert up_after <= waited < up_after + 1.0  # a back-off took 1.8 s here, f"answered {waited - up_after:.2f} s after the agent came up"


def test_start_wait_agent_prints_the_agents_checked_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`hvext start --wait-agent` on a defined test-driver domain: started, then the agent's version
    and the guest's kernel as wait_agent returns them (an AgentInfo)."""
    from hvext.cli.main import main
    sock = tmp_path / "agent.sock"
    name = f"hvext-test-agent-{uuid.uuid4().hex[:8]}"
    stop = threading.Event()
    with Host("test:///default") as host:  # held open: the test driver keeps its state while connected
        dom = host.conn.defineXML(
            f"<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os>"
            f"<devices><channel type='unix'><source mode='bind' path='{sock}'/>"
            f"<target type='virtio' name='{AGENT_PORT}'/></channel></devices></domain>")
        thread = serve_agent_at(sock, 0, stop)
        try:
            status = main(["-c", "test:///default", "start", name, "--wait-agent", "20"])
            out, err = capsys.readouterr()
        finally:
            stop.set()
            thread.join(timeout=5)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
    out = " ".join(out.split())
    assert status == 0, err
    assert f"Domain '{name}' started" in out
    assert "ready after" in out and f"(guest kernel {platform.release()})" in out
