"""The host-to-host transport (hvext.ha.peer): only holders of the cluster's credentials get through."""

from __future__ import annotations

import socket
import ssl
import time
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvext.errors import HAError
from hvext.ha import peer
from hvext.ha.etcd import Credentials
from hvext.lab import pki


def _creds(directory: Path, ca_name: str, stem: str) -> Credentials:
    ca = directory / ca_name
    if not ca.exists():
        pki.make_ca(ca, ca_name)
    cert, key = pki.issue(ca, directory, stem, stem, alt_names=["IP:127.0.0.1", "DNS:localhost"])
    return Credentials(ca / "ca-cert.pem", cert, key)


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Credentials]:
    root = tmp_path_factory.mktemp("pki")
    root.chmod(0o700)
    return {"server": _creds(root, "cluster", "server"), "member": _creds(root, "cluster", "member"),
            "intruder": _creds(root, "other", "intruder")}


@pytest.fixture
def server(pkis: dict[str, Credentials]) -> Iterator[tuple[peer.Server, list[str]]]:
    seen: list[str] = []

    def handler(header: dict[str, Any], payload: bytes, who: str) -> tuple[dict[str, Any], bytes]:
        seen.append(str(header.get("op")))
        if header.get("op") == "fail":
            raise HAError("told to fail")
        return {"echo": header.get("op"), "size": len(payload)}, payload[::-1]

    srv = peer.Server(pkis["server"], handler, "127.0.0.1", 0)
    try:
        yield srv, seen
    finally:
        srv.close()


def test_a_member_talks_frames_and_gets_errors_as_replies(server: tuple[peer.Server, list[str]],
                                                          pkis: dict[str, Credentials]) -> None:
    srv, seen = server
    with peer.Connection(pkis["member"], "127.0.0.1", srv.port) as conn:
        assert conn.request({"op": "ping"}, b"abc") == ({"echo": "ping", "size": 3}, b"cba")
        with pytest.raises(peer.PeerError, match="told to fail"):
            conn.request({"op": "fail"})
        assert conn.request({"op": "again"})[0]["echo"] == "again"  # the connection survives an error reply
    assert seen == ["ping", "fail", "again"]


def test_a_peer_without_the_clusters_credentials_is_refused(server: tuple[peer.Server, list[str]],
                                                            pkis: dict[str, Credentials]) -> None:
    srv, seen = server
    # A certificate from another CA.
    with pytest.raises(peer.PeerError):
        with peer.Connection(pkis["intruder"], "127.0.0.1", srv.port) as conn:
            conn.request({"op": "intruder"})
    # No client certificate at all (but trusting the cluster's CA).
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cafile=str(pkis["server"].ca))
    with pytest.raises((ssl.SSLError, OSError)):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw, \
                bare.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            peer.send_frame(tls, {"op": "nocert"})
            tls.recv(1)  # TLS 1.3: the server's refusal arrives here
            raise OSError("no refusal")  # pragma: no cover - would mean the server answered
    # Plain TCP, speaking the frame format.
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
        raw.sendall(peer.FRAME.pack(peer.MAGIC, 13, 0) + b'{"op":"tcp"}')
        try:
            answer = raw.recv(100)
        except OSError:
            answer = b""
        assert not answer.startswith(peer.MAGIC)  # at most a TLS alert, never a reply
    # A client that does not trust the server's CA refuses the server too.
    with pytest.raises(peer.PeerError):
        peer.Connection(Credentials(pkis["intruder"].ca, pkis["member"].cert, pkis["member"].key),
                        "127.0.0.1", srv.port)
    deadline = time.monotonic() + 10  # the server counts a refusal in its own thread, after the client saw it
    while srv.refused < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen == [] and srv.refused >= 4  # the handler never ran


def test_garbage_frames_close_the_connection_and_the_server_lives_on(server: tuple[peer.Server, list[str]],
                                                                     pkis: dict[str, Credentials]) -> None:
    srv, seen = server
    ctx = peer.client_context(pkis["member"])
    for bad in (b"XXXX" + bytes(12), peer.FRAME.pack(peer.MAGIC, peer.MAX_HEADER + 1, 0),
                peer.FRAME.pack(peer.MAGIC, 3, 0) + b"[1]", peer.FRAME.pack(peer.MAGIC, 200, 0) + b"[" * 200,
                struct.pack("<4sIQ", peer.MAGIC, 2, peer.MAX_PAYLOAD + 1) + b"{}"):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(bad)
            assert tls.recv(100) == b""    # closed, no reply
    with peer.Connection(pkis["member"], "127.0.0.1", srv.port) as conn:
        assert conn.request({"op": "after"})[0]["echo"] == "after"
    assert seen == ["after"]
