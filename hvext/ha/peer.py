"""Host-to-host transport of the HA cluster (replication, C16): TLS with the cluster's CA, both ways.

Every connection is TLS 1.2+ where *both* sides present a certificate signed by the cluster CA
(the member certificate ``hvext cluster init|join`` made, :class:`hvext.ha.etcd.Credentials`):
a peer without the cluster's credentials (no certificate, another CA's, plain TCP) fails the
handshake and never reaches a handler. Members are equally trusted (as in etcd), so the server
does not check the client's name, and the client accepts any member's certificate for the
address it dialled (host names are not in every member's certificate).

On a connection, requests and replies are *frames*::

    "HVRP" | header length u32 | payload length u64 | header (JSON object) | payload (bytes)

The header is checked as untrusted JSON (size, depth: :func:`hvext.agent.protocol.loads`) and the
payload is bounded by :data:`MAX_PAYLOAD`; anything else closes the connection. One request gets
one reply; a handler's :class:`HvextError` becomes a reply ``{"error": ...}``.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

from hvext.agent import protocol
from hvext.errors import HAError, HvextError
from hvext.ha.etcd import Credentials

log = logging.getLogger("hvextd.peer")

PORT = 2390
MAGIC = b"HVRP"
FRAME = struct.Struct("<4sIQ")
MAX_HEADER = 64 * 1024
MAX_PAYLOAD = 256 << 20
#: Seconds a peer may stay silent in the middle of a frame (or an idle connection) before it is dropped.
IDLE_TIMEOUT_S = 60.0

Handler = Callable[[dict[str, Any], bytes, str], tuple[dict[str, Any], bytes]]


def route(default: Handler, prefixed: dict[str, Handler]) -> Handler:
    """One handler for a :class:`Server` shared by several services: a request whose op starts with a key
    of *prefixed* goes to that handler, any other to *default*."""
    def handler(header: dict[str, Any], payload: bytes, who: str) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        if isinstance(op, str):
            for prefix, target in prefixed.items():
                if op.startswith(prefix):
                    return target(header, payload, who)
        return default(header, payload, who)
    return handler


class PeerError(HAError):
    """A peer connection failed: refused, unreachable, closed, or it sent something that is not a frame."""


def _context(creds: Credentials, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=str(creds.ca))
        ctx.load_cert_chain(str(creds.cert), str(creds.key))
    except (OSError, ssl.SSLError) as err:
        raise PeerError(f"cannot load the cluster credentials ({creds.cert}, {creds.ca}): {err}") from err
    ctx.check_hostname = False            # any member of the cluster (see the module docstring)
    ctx.verify_mode = ssl.CERT_REQUIRED   # the client's certificate too, on the server
    return ctx


def server_context(creds: Credentials) -> ssl.SSLContext:
    return _context(creds, True)


def client_context(creds: Credentials) -> ssl.SSLContext:
    return _context(creds, False)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise PeerError("the peer closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def send_frame(sock: socket.socket, header: dict[str, Any], payload: bytes = b"") -> None:
    head = json.dumps(header).encode()
    if len(head) > MAX_HEADER or len(payload) > MAX_PAYLOAD:
        raise PeerError("frame too large")
    sock.sendall(FRAME.pack(MAGIC, len(head), len(payload)) + head)
    if payload:
        sock.sendall(payload)


def recv_frame(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """One frame from *sock*, checked (PeerError for anything that is not one)."""
    magic, head_len, payload_len = FRAME.unpack(_recv_exact(sock, FRAME.size))
    if magic != MAGIC or head_len > MAX_HEADER or payload_len > MAX_PAYLOAD:
        raise PeerError("the peer sent something that is not an hvext frame (or one too large)")
    header = protocol.loads(_recv_exact(sock, head_len), PeerError, "the peer's frame header")
    if not isinstance(header, dict):
        raise PeerError("the peer's frame header is not an object")
    return header, _recv_exact(sock, payload_len) if payload_len else b""


class Server:
    """A TLS listener on (*address*, *port*) answering frames with *handler* (one thread per connection)."""

    def __init__(self, creds: Credentials, handler: Handler, address: str = "", port: int = PORT) -> None:
        self.context = server_context(creds)
        self.handler = handler
        try:
            self.sock = socket.create_server((address, port), reuse_port=False)
        except OSError as err:
            raise PeerError(f"cannot listen on {address or '*'}:{port} for peers: {err.strerror}") from err
        self.port = self.sock.getsockname()[1]
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="hvext-peer", daemon=True)
        self.refused = 0         # handshakes that failed (no or wrong credentials)
        self.open: set[socket.socket] = set()   # connections being served (closed with the server)
        self.guard = threading.Lock()
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                raw, addr = self.sock.accept()
            except OSError:
                if self.closing.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(raw, addr), name="hvext-peer-conn", daemon=True).start()

    def _serve(self, raw: socket.socket, addr: tuple[Any, ...]) -> None:
        who = f"{addr[0]}:{addr[1]}"
        raw.settimeout(IDLE_TIMEOUT_S)
        with self.guard:
            if self.closing.is_set():
                raw.close()
                return
            self.open.add(raw)
        try:
            self._serve_tls(raw, who)
        finally:
            with self.guard:
                self.open = {c for c in self.open if c.fileno() >= 0 and c is not raw}
            raw.close()

    def _serve_tls(self, raw: socket.socket, who: str) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as err:
            self.refused += 1
            log.warning("peer %s refused: %s", who, err)
            raw.close()
            return
        with self.guard:  # the descriptor now belongs to the TLS socket
            self.open.add(tls)
        with tls:
            while not self.closing.is_set():
                try:
                    header, payload = recv_frame(tls)
                except (PeerError, OSError, ssl.SSLError) as err:
                    if not isinstance(err, PeerError) or "closed" not in str(err):
                        log.info("peer %s: %s", who, err)
                    return
                try:
                    reply, data = self.handler(header, payload, who)
                except HvextError as err:
                    reply, data = {"error": str(err)}, b""
                except Exception as err:  # a bug must not kill the listener
                    log.exception("peer %s: handler failed", who)
                    reply, data = {"error": f"unexpected {type(err).__name__}"}, b""
                try:
                    send_frame(tls, reply, data)
                except (OSError, PeerError) as err:
                    log.info("peer %s: %s", who, err)
                    return

    def close(self) -> None:
        self.closing.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=5)
        with self.guard:
            for conn in self.open:  # a closed server answers nobody, also on connections already open
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Connection:
    """A client connection to a peer's :class:`Server`; :meth:`request` sends one frame and reads the reply."""

    def __init__(self, creds: Credentials, address: str, port: int = PORT, timeout: float = 10.0) -> None:
        self.where = f"{address}:{port}"
        try:
            raw = socket.create_connection((address, port), timeout=timeout)
        except OSError as err:
            raise PeerError(f"peer {self.where} is unreachable: {err.strerror or err}") from err
        try:
            self.sock = client_context(creds).wrap_socket(raw, server_hostname=address)
        except (ssl.SSLError, OSError) as err:
            raw.close()
            raise PeerError(f"peer {self.where} refused the TLS handshake: {err}") from err

    def request(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """Send a request; its reply. PeerError when the connection fails or the peer reports an error."""
        try:
            send_frame(self.sock, header, payload)
            reply, data = recv_frame(self.sock)
        except (OSError, ssl.SSLError) as err:
            raise PeerError(f"peer {self.where}: {err}") from err
        if "error" in reply:
            raise PeerError(f"peer {self.where}: {str(reply['error'])[:300]}")
        return reply, data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
