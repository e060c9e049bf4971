"""Guest RAM pages between hvextd peers (C17 standby copies, C18 dirty-data recovery).

Two paths, kept apart so that an RDMA transport can replace the data path later:

* the **data path**, :class:`RemoteRegion`: one-sided reads and writes of byte extents of a peer's
  memory region (a guest's RAM file there), what RDMA gives for a registered region.
  :class:`SocketRegion` implements it with requests over :mod:`hvext.ha.peer`'s TLS transport (client
  certificates of the cluster's CA, both ways: a host without the cluster's credentials never reaches
  a handler). :class:`PeerTarget` puts a :class:`hvext.ha.ramsync.Target` on any RemoteRegion, so the
  ramsync copier sends dirty pages to a peer as it writes a local file;
* the **control path**: opening a region, a source's final dirty list and device state
  (:mod:`hvext.ha.volatile`), always over the peer socket.

Regions on the serving host (:class:`RegionService`, hvextd's peer handler for ops ``ram-*``):

* ``source``: the RAM file of a domain this host offers pages of (it has a baseline here, C18);
  read-only;
* ``copy``: this host's own RAM file of a domain that does *not* run here (a standby copy, C17),
  opened with ``ram-open`` (created QEMU's, 0600, like any RAM file; a domain running here is
  refused), then read and written with the random token the open returned.

Every extent a peer names is checked against the region (:func:`volatile_policy.check_extents`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hvext.errors import DomainNotFound, HAError, HvextError
from hvext.ha import peer, ramsync
from hvext.ha import volatile_policy as vpolicy
from hvext.ha.etcd import Credentials
from hvext.ha.peer import Handler
from hvext.host import Host
from hvext.memory import ramfile
from hvext.pmem import devices

log = logging.getLogger("hvextd.pagexfer")

Extents = tuple[tuple[int, int], ...]
OPS = ("ram-open", "ram-read", "ram-write", "ram-close")
PREFIX = "ram-"


class RemoteRegion(Protocol):
    """A region of guest RAM on another host, addressed by byte offset (the data path)."""

    size: int
    wire_bytes: int  # bytes sent and received for this region so far (headers included)

    def read(self, extents: Extents) -> bytes: ...

    def write(self, extents: Extents, data: bytes) -> None: ...

    def close(self) -> None: ...


def _frame_bytes(header: dict[str, Any], payload: bytes) -> int:
    return peer.FRAME.size + len(json.dumps(header).encode()) + len(payload)


class SocketRegion:
    """:class:`RemoteRegion` over an authenticated peer connection (requests ``ram-read`` / ``ram-write``)."""

    def __init__(self, conn: peer.Connection, domain: str, kind: str, size: int, token: str = "") -> None:
        self.link = conn
        self.domain = domain
        self.kind = kind
        self.size = size
        self.token = token
        self.wire_bytes = 0
        self.requests = 0

    def call(self, header: dict[str, Any], payload: bytes = b"") -> tuple[dict[str, Any], bytes]:
        """One request on the region's connection, its bytes counted."""
        reply, data = self.link.request(header, payload)
        self.wire_bytes += _frame_bytes(header, payload) + _frame_bytes(reply, data)
        self.requests += 1
        return reply, data

    def _header(self, op: str, extents: Extents) -> dict[str, Any]:
        return {"op": op, "domain": self.domain, "region": self.kind, "token": self.token,
                "extents": [list(e) for e in extents]}

    def read(self, extents: Extents) -> bytes:
        want = sum(length for _, length in extents)
        _, data = self.call(self._header("ram-read", extents))
        if len(data) != want:
            raise peer.PeerError(f"peer sent {len(data)} bytes of {self.domain}'s RAM for {want} asked")
        return data

    def write(self, extents: Extents, data: bytes) -> None:
        if len(data) != sum(length for _, length in extents):
            raise ValueError("data does not fill the extents")
        self.call(self._header("ram-write", extents), data)

    def close(self) -> None:
        if self.kind == "copy" and self.token:
            with contextlib.suppress(HvextError):
                self.call({"op": "ram-close", "domain": self.domain, "region": self.kind, "token": self.token})


def open_copy(conn: peer.Connection, domain: str, size: int, *, fresh: bool = False) -> SocketRegion:
    """Open (create) the peer's standby copy of *domain*'s RAM, *size* bytes; *fresh* empties it first."""
    reply, _ = conn.request({"op": "ram-open", "domain": domain, "region": "copy", "size": size, "fresh": fresh})
    token = reply.get("token")
    if not isinstance(token, str) or not token:
        raise peer.PeerError("the peer did not open the copy (no token)")
    return SocketRegion(conn, domain, "copy", size, token)


class PeerTarget:
    """A :class:`hvext.ha.ramsync.Target` on a :class:`RemoteRegion`: writes are gathered into batches of at
    most :data:`volatile_policy.BATCH_BYTES` and sent at :meth:`flush` (or when a batch is full)."""

    def __init__(self, region: RemoteRegion, batch: int = vpolicy.BATCH_BYTES) -> None:
        self.region = region
        self.batch = batch
        self.extents: list[tuple[int, int]] = []
        self.data: list[bytes] = []
        self.pending = 0
        self.written = 0

    def write(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > self.region.size:
            raise ramsync.MirrorTargetError(f"write at {offset:#x} is outside the {self.region.size}-byte copy")
        view = memoryview(data)
        while view:
            if self.pending >= self.batch:
                self.flush()
            piece = view[: self.batch - self.pending]
            if self.extents and sum(self.extents[-1]) == offset:
                self.extents[-1] = (self.extents[-1][0], self.extents[-1][1] + len(piece))
            else:
                self.extents.append((offset, len(piece)))
            self.data.append(bytes(piece))
            self.pending += len(piece)
            offset += len(piece)
            view = view[len(piece):]

    def read(self, offset: int, length: int) -> bytes:
        self.flush()
        return self.region.read(((offset, length),))

    def flush(self) -> None:
        if not self.extents:
            return
        extents, data = tuple(self.extents), b"".join(self.data)
        self.extents, self.data, self.pending = [], [], 0
        try:
            self.region.write(extents, data)
        except HvextError as err:
            raise ramsync.MirrorTargetError(f"cannot write the standby copy: {err}") from err
        self.written += len(data)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.region.close()


# ------------------------------------------------------------------------------------------ serving side


def read_extents(path: Path, size: int, extents: Extents) -> bytes:
    """The bytes of *extents* of the file at *path* (no link followed; at least *size* bytes)."""
    fd = ramsync.open_source(path, size)
    try:
        out = []
        for offset, length in extents:
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise ramsync.RamSourceError(f"{path} ended at {offset + len(data):#x}")
            out.append(data)
        return b"".join(out)
    except OSError as err:
        raise ramsync.RamSourceError(f"cannot read {path}: {err.strerror}") from err
    finally:
        os.close(fd)


def write_extents(fd: int, extents: Extents, data: bytes) -> None:
    view, at = memoryview(data), 0
    for offset, length in extents:
        piece = view[at:at + length]
        while piece:
            n = os.pwrite(fd, piece, offset)
            piece, offset = piece[n:], offset + n
        at += length


@dataclass
class _Copy:
    path: Path
    size: int
    fd: int


#: What a host offers to read: domain -> (its RAM file, size), or None when it offers none.
SourceLookup = Callable[[str], "tuple[Path, int] | None"]
#: Where a standby copy goes: (domain, size, fresh) -> the file, created or checked (refusing a running domain).
CopyMaker = Callable[[str, int, bool], Path]


def ram_file_copy(uri: str | None) -> CopyMaker:
    """Standby copies in this host's RAM file of the domain (QEMU's, 0600, :mod:`hvext.memory.ramfile`), so
    that a failover starts QEMU on it directly; a domain running here is refused."""
    def make(domain: str, size: int, fresh: bool) -> Path:
        with Host(uri) as host:
            try:
                if host.lookup(domain).is_active():
                    raise HAError(f"{domain!r} runs on this host: its RAM file is not a standby copy")
            except DomainNotFound:
                pass
            ram = ramfile.RamFile(ramfile.ram_path(domain, host.host_id), size)
            ramfile.prepare_on(host, domain, ram)
        if fresh:
            ramfile.empty(ram)
        return ram.path
    return make


class RegionService:
    """hvextd's handler of ``ram-*`` requests (see the module docstring); *sources* says which domains' RAM
    this host lets peers read; *extra* handles further ``ram-*`` control ops (C18's final list)."""

    def __init__(self, copies: CopyMaker, sources: SourceLookup, extra: dict[str, Handler] | None = None) -> None:
        self.make_copy = copies
        self.sources = sources
        self.extra = dict(extra or {})
        self.copies: dict[str, _Copy] = {}
        self.guard = threading.Lock()

    def handle(self, header: dict[str, Any], payload: bytes, who: str) -> tuple[dict[str, Any], bytes]:
        op = header.get("op")
        if op in self.extra:
            return self.extra[op](header, payload, who)
        domain = header.get("domain")
        if not isinstance(domain, str) or not domain or "/" in domain or len(domain) > 200:
            raise HAError("a RAM request names no domain")
        if op == "ram-open":
            return self._open(domain, header), b""
        if op not in OPS:
            raise HAError(f"unknown request {op!r:.40}")
        if header.get("region") == "source":
            if op != "ram-read":
                raise HAError("a source region is read-only")
            found = self.sources(domain)
            if found is None:
                raise HAError(f"this host offers no RAM of {domain!r}")
            path, size = found
            return {"ok": True}, read_extents(path, size, vpolicy.check_extents(header.get("extents"), size))
        if header.get("region") != "copy":
            raise HAError("a RAM request names no region (source or copy)")
        with self.guard:
            copy = self.copies.get(f"{domain}/{header.get('token')}")
            if copy is None:
                raise HAError(f"no open copy of {domain!r} with that token (open it first)")
            if op == "ram-close":
                del self.copies[f"{domain}/{header.get('token')}"]
                os.close(copy.fd)
                return {"ok": True}, b""
        extents = vpolicy.check_extents(header.get("extents"), copy.size)
        try:
            if op == "ram-read":
                return {"ok": True}, b"".join(os.pread(copy.fd, n, o) for o, n in extents)
            if len(payload) != sum(n for _, n in extents):
                raise HAError("the payload does not fill the extents")
            write_extents(copy.fd, extents, payload)
        except OSError as err:
            raise HAError(f"the copy of {domain!r}: {err.strerror}") from err
        return {"ok": True, "bytes": len(payload)}, b""

    def _open(self, domain: str, header: dict[str, Any]) -> dict[str, Any]:
        size = header.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 4096 or size > 1 << 46:
            raise HAError("a copy needs a positive size in whole pages")
        path = self.make_copy(domain, size, header.get("fresh") is True)
        fd = devices.open_backing(path, os.O_RDWR)
        if os.fstat(fd).st_size != size:
            os.close(fd)
            raise HAError(f"the copy {path} has another size than {size}")
        token = secrets.token_hex(16)
        with self.guard:
            self.copies[f"{domain}/{token}"] = _Copy(path, size, fd)
        return {"token": token, "path": str(path)}

    def close(self) -> None:
        with self.guard:
            for copy in self.copies.values():
                os.close(copy.fd)
            self.copies.clear()


def connect(creds: Credentials, address: str, timeout: float = 30.0) -> peer.Connection:
    """A connection to the peer at ``host:port`` (``[v6]:port`` too); *timeout* seconds for the connect and
    for each later read or write."""
    name, _, port = address.rpartition(":")
    if not name or not port.isdigit():
        raise HAError(f"peer address {address!r:.80} is not host:port")
    return peer.Connection(creds, name.strip("[]"), int(port), timeout=timeout)
