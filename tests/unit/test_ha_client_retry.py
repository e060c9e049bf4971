"""hvext.ha.client against a small HTTP server speaking etcd's JSON gateway: etcd's "leader changed"
(gRPC Unavailable, HTTP 503, retryable) is repeated once for a request that changes nothing, and never
for a write (its outcome is unknown). The whole path is real: requests, etcd3gw, the translation."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from etcd3gw.client import Etcd3Client

from hvext.errors import ClusterUnavailable
from hvext.ha.client import API_PATH, Client
from hvext.ha.etcd import Credentials

LEADER_CHANGED = {"error": "etcdserver: leader changed", "code": 14, "message": "etcdserver: leader changed"}
#: The same error in a streamed reply (LeaseKeepAlive is a stream): the gateway has sent its HTTP 200 already.
STREAMED_LEADER_CHANGED = {"error": {"grpc_code": 14, "http_code": 503, "message": "etcdserver: leader changed",
                                     "http_status": "Service Unavailable"}}


class Gateway(ThreadingHTTPServer):
    """Answers the first *failures* requests with etcd's "leader changed", then an empty success."""

    def __init__(self, failures: int) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.failures = failures
        self.streamed = False  # fail like a stream (HTTP 200, {"error": ...}) rather than with a 503
        self.asked: list[str] = []


class Handler(BaseHTTPRequestHandler):
    server: Gateway

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.asked.append(self.path)
        failing = len(self.server.asked) <= self.server.failures
        if self.path.endswith("/lease/keepalive"):
            success = {"result": {"header": {}, "ID": "7", "TTL": "5"}}
        else:
            success = {"header": {}, "kvs": []}
        if failing and self.server.streamed:
            body, status = json.dumps(STREAMED_LEADER_CHANGED).encode(), 200
        else:
            body, status = json.dumps(LEADER_CHANGED if failing else success).encode(), 503 if failing else 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, Client]]:
    server = Gateway(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = Client(["https://127.0.0.1:1"], Credentials(tmp_path / "ca", tmp_path / "cert", tmp_path / "key"))
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # plain HTTP: no cluster PKI needed here
    client._clients = [(endpoint, Etcd3Client(host="127.0.0.1", port=server.server_address[1], protocol="http",
                                              api_path=API_PATH))]
    try:
        yield server, client
    finally:
        client.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("gateway", [1], indirect=True)
def test_a_read_that_meets_a_leader_change_is_repeated_once(gateway: tuple[Gateway, Client]) -> None:
    server, client = gateway
    assert client.hosts() == {}
    assert server.asked == ["/v3/kv/range", "/v3/kv/range"]


@pytest.mark.parametrize("gateway", [2], indirect=True)
def test_a_second_leader_change_is_reported(gateway: tuple[Gateway, Client]) -> None:
    server, client = gateway
    with pytest.raises(ClusterUnavailable, match="leader changed"):
        client.owners()
    assert len(server.asked) == 2


@pytest.mark.parametrize("gateway", [1], indirect=True)
def test_a_write_that_meets_a_leader_change_is_not_repeated(gateway: tuple[Gateway, Client]) -> None:
    server, client = gateway
    with pytest.raises(ClusterUnavailable, match="leader changed"):
        client.delete_record("/hvext/final/", "vm1")
    assert server.asked == ["/v3/kv/deleterange"]


@pytest.mark.parametrize("gateway", [1], indirect=True)
def test_the_quorum_read_confirming_a_renewal_is_repeated_once_on_its_endpoint(gateway: tuple[Gateway, Client]) -> None:
    server, client = gateway
    client.confirm()
    assert server.asked == ["/v3/kv/range", "/v3/kv/range"]


@pytest.mark.parametrize("gateway", [1], indirect=True)
def test_a_streamed_error_of_a_keepalive_is_a_failed_renewal_not_an_expiry(gateway: tuple[Gateway, Client]) -> None:
    """A keepalive's {"error": ...} after the gateway's 200 was read as TTL -1 ("expired"), and hvextd gave
    up a lease etcd still held (a lab host's lease was replaced while a member was down)."""
    server, client = gateway
    server.streamed = True
    assert client.keepalive(7) == 5  # "leader changed": repeated once, like a 503
    assert server.asked == ["/v3/lease/keepalive", "/v3/lease/keepalive"]
    server.failures = len(server.asked) + 2  # the next two fail: the repeat too
    with pytest.raises(ClusterUnavailable, match="leader changed"):
        client.keepalive(7)
