"""Guest RAM pages between peers (hvext.ha.pagexfer) over the real TLS transport, in one process: a
source region read in batches, a standby copy written through a ramsync Target, and refusals (a host
without the cluster's credentials, a domain not offered, extents outside the region)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvext.errors import HAError
from hvext.ha import pagexfer, peer, ramsync, volatile_policy as vp
from hvext.ha.etcd import Credentials
from tests.unit.test_replication_peer import _creds

PAGE = 4096
PAGES = 256


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Credentials]:
    root = tmp_path_factory.mktemp("pki")
    root.chmod(0o700)
    return {"server": _creds(root, "cluster", "server"), "member": _creds(root, "cluster", "member"),
            "intruder": _creds(root, "other", "intruder")}


@pytest.fixture
def service(tmp_path: Path, pkis: dict[str, Credentials]) -> Iterator[dict[str, Any]]:
    ram = tmp_path / "ram"
    ram.write_bytes(os.urandom(PAGES * PAGE))
    copies: dict[str, Path] = {}

    def make_copy(domain: str, size: int, fresh: bool) -> Path:
        path = tmp_path / f"copy-{domain}"
        if fresh or not path.exists():
            path.write_bytes(b"")
            os.truncate(path, size)
        copies[domain] = path
        return path

    others: list[str] = []

    def replication(header: dict[str, Any], payload: bytes, who: str) -> tuple[dict[str, Any], bytes]:
        others.append(header["op"])
        return {"replica": True}, b""

    regions = pagexfer.RegionService(make_copy, lambda d: (ram, PAGES * PAGE) if d == "dom" else None)
    server = peer.Server(pkis["server"], peer.route(replication, {pagexfer.PREFIX: regions.handle}), "127.0.0.1", 0)
    try:
        yield {"server": server, "ram": ram, "copies": copies, "others": others, "regions": regions}
    finally:
        server.close()
        regions.close()


def test_a_member_pulls_exactly_the_listed_pages_of_a_source(service: dict[str, Any],
                                                             pkis: dict[str, Credentials]) -> None:
    runs = vp.union([(3, 1), (10, 5), (200, 40)])
    data = service["ram"].read_bytes()
    with pagexfer.connect(pkis["member"], f"127.0.0.1:{service['server'].port}") as conn:
        region = pagexfer.SocketRegion(conn, "dom", "source", PAGES * PAGE)
        got = b"".join(region.read(batch) for batch in vp.batches(runs, PAGE, 8 * PAGE))
        assert conn.request({"op": "hello"})[0] == {"replica": True}  # other ops go to the other service
    want = b"".join(data[f * PAGE:(f + n) * PAGE] for f, n in runs)
    assert got == want
    payload = vp.pages(runs) * PAGE
    assert payload < region.wire_bytes <= payload * vp.PULL_RATIO_LIMIT
    assert region.requests == len(vp.batches(runs, PAGE, 8 * PAGE)) and service["others"] == ["hello"]


def test_a_standby_copy_is_written_through_a_ramsync_target(service: dict[str, Any],
                                                            pkis: dict[str, Credentials]) -> None:
    runs = ((0, 2), (7, 1), (100, 30))
    with pagexfer.connect(pkis["member"], f"127.0.0.1:{service['server'].port}") as conn:
        target = pagexfer.PeerTarget(pagexfer.open_copy(conn, "other", PAGES * PAGE, fresh=True), batch=16 * PAGE)
        fd = ramsync.open_source(service["ram"], PAGES * PAGE)
        try:
            result = ramsync.copy_runs(fd, runs, PAGE, target)
        finally:
            os.close(fd)
        assert target.read(7 * PAGE, PAGE) == service["ram"].read_bytes()[7 * PAGE:8 * PAGE]
        target.close()
        with pytest.raises(peer.PeerError, match="no open copy"):  # closed: its token is gone
            target.region.write(((0, PAGE),), bytes(PAGE))
    assert result.pages == 33 and target.written == 33 * PAGE
    copy, source = service["copies"]["other"].read_bytes(), service["ram"].read_bytes()
    for page in range(PAGES):
        listed = any(f <= page < f + n for f, n in runs)
        want = source[page * PAGE:(page + 1) * PAGE] if listed else bytes(PAGE)
        assert copy[page * PAGE:(page + 1) * PAGE] == want, page


def test_refusals(service: dict[str, Any], pkis: dict[str, Credentials]) -> None:
    port = service["server"].port
    # Another CA's certificate, also when it trusts the cluster's CA: refused before any handler.
    intruder = pkis["intruder"]
    for creds in (intruder, Credentials(pkis["member"].ca, intruder.cert, intruder.key)):
        with pytest.raises(peer.PeerError):
            with pagexfer.connect(creds, f"127.0.0.1:{port}") as conn:
                pagexfer.SocketRegion(conn, "dom", "source", PAGES * PAGE).read(((0, PAGE),))
    deadline = time.monotonic() + 10
    while service["server"].refused < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service["server"].refused == 2
    with pagexfer.connect(pkis["member"], f"127.0.0.1:{port}") as conn:
        with pytest.raises(peer.PeerError, match="offers no RAM"):
            pagexfer.SocketRegion(conn, "secret", "source", PAGES * PAGE).read(((0, PAGE),))
        with pytest.raises(peer.PeerError, match="outside"):
            pagexfer.SocketRegion(conn, "dom", "source", PAGES * PAGE).read(((PAGES * PAGE - 10, PAGE),))
        with pytest.raises(peer.PeerError, match="read-only"):
            pagexfer.SocketRegion(conn, "dom", "source", PAGES * PAGE).write(((0, PAGE),), bytes(PAGE))
        with pytest.raises(peer.PeerError, match="no open copy"):
            pagexfer.SocketRegion(conn, "dom", "copy", PAGES * PAGE, "guessed").write(((0, PAGE),), bytes(PAGE))
        with pytest.raises(peer.PeerError, match="whole pages"):
            pagexfer.open_copy(conn, "dom", 1000)


def test_a_bad_peer_address_is_a_clear_error(pkis: dict[str, Credentials]) -> None:
    with pytest.raises(HAError, match="host:port"):
        pagexfer.connect(pkis["member"], "nowhere")
