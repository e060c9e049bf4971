"""The replication log (C16): epochs of changed PMEM blocks, checksummed, append-only, and the replica
image that applies whole epochs only.

A log file starts with a 16-byte header (``HVXRLOG1``, version, CRC-32) and then holds *entries*,
each a 32-byte header and a payload::

    magic "HVRE" | kind u8 | flags u8 | device u16 | epoch u64 | offset u64 | length u32 | crc32 u32

``DATA`` carries *length* bytes for byte *offset* of device *device*; ``ZERO`` says those bytes are
zero (no payload); ``COMMIT`` ends epoch *epoch* (payload: entries, data bytes, Unix time in ns;
flag ``FULL``: the epoch holds every block of every device, so it applies over anything). The CRC
covers the header's first 28 bytes and the payload. An epoch exists once its COMMIT is in the file:
a reader stops at the first entry that is torn, fails its CRC, breaks the order (an epoch's entries,
then its COMMIT, then only newer epochs) or is larger than allowed, and everything after the last
COMMIT before that point is ignored (and cut off when the file is opened for appending).

The owner keeps one log per PMEM device (``device`` = 0); a replica keeps one per domain
(``device`` = the device's index) and applies it to one image per device (:class:`ReplicaImage`):
received epochs are fsynced to its log *before* any byte reaches an image, the images are fsynced,
then ``state.json`` (atomically replaced) names the epoch applied, then the log is emptied. A
replica killed anywhere in that sequence redoes every committed epoch in its log on open
(writes of whole blocks are idempotent), so after :meth:`ReplicaImage.open` every image holds
exactly one whole epoch, never a part of one.

Untrusted input: a log received from a peer is parsed by the same strict reader
(:func:`parse_entries`) and each entry is checked against the devices' sizes before it is stored.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from hvext import durable
from hvext.agent import protocol
from hvext.errors import HAError
from hvext.paths import UnsafePathError, private_dir

FILE_MAGIC = b"HVXRLOG1"
VERSION = 1
FILE_HEADER = struct.Struct("<8sII")          # magic, version, crc32 of the first 12 bytes
ENTRY_MAGIC = b"HVRE"
ENTRY = struct.Struct("<4sBBHQQII")           # magic, kind, flags, device, epoch, offset, length, crc32
COMMIT = struct.Struct("<QQQ")                # entries, data bytes, Unix time (ns)
DATA, ZERO, COMMIT_KIND = 1, 2, 3
FULL = 1
#: The largest payload of one entry (a block; hvext uses 64 KiB blocks).
MAX_ENTRY = 1 << 24
MAX_DEVICES = 64
BLOCK_SIZE = 64 * 1024


class LogError(HAError):
    """A replication log or replica image cannot be used (I/O, a bad entry, a bad state file)."""


@dataclass(frozen=True)
class Entry:
    kind: int
    flags: int
    device: int
    epoch: int
    offset: int
    length: int
    data: bytes = b""     # DATA: the bytes; COMMIT: the packed COMMIT payload; ZERO: empty

    def encode(self) -> bytes:
        head = ENTRY.pack(ENTRY_MAGIC, self.kind, self.flags, self.device, self.epoch, self.offset, self.length, 0)
        crc = zlib.crc32(self.data, zlib.crc32(head[:28]))
        return head[:28] + struct.pack("<I", crc) + self.data


def data_entry(device: int, epoch: int, offset: int, block: bytes) -> Entry:
    """A DATA entry, or a ZERO one when *block* is all zero (no payload is stored or sent)."""
    if block.count(0) == len(block):
        return Entry(ZERO, 0, device, epoch, offset, len(block))
    return Entry(DATA, 0, device, epoch, offset, len(block), bytes(block))


def commit_entry(epoch: int, entries: int, nbytes: int, full: bool, at_ns: int | None = None,
                 device: int = 0) -> Entry:
    payload = COMMIT.pack(entries, nbytes, time.time_ns() if at_ns is None else at_ns)
    return Entry(COMMIT_KIND, FULL if full else 0, device, epoch, 0, len(payload), payload)


@dataclass(frozen=True)
class Epoch:
    """One committed epoch of a log: where its entries are in the file (start .. end, COMMIT included)."""

    epoch: int
    start: int
    end: int
    full: bool
    entries: int
    nbytes: int          # bytes of data the epoch changes (DATA and ZERO lengths)
    at_ns: int           # when it was cut (the owner's clock)


@dataclass
class Scan:
    epochs: list[Epoch] = field(default_factory=list)
    valid_end: int = FILE_HEADER.size      # end of the last committed epoch (what is kept)
    stopped: str = ""                       # why reading stopped before the end ("" : clean end)


def _read_entry(buf: bytes, pos: int) -> tuple[Entry, int] | str:
    """The entry at *pos* of *buf* and the position after it, or why there is none."""
    if len(buf) - pos < ENTRY.size:
        return "torn entry header"
    magic, kind, flags, device, epoch, offset, length, crc = ENTRY.unpack_from(buf, pos)
    if magic != ENTRY_MAGIC:
        return "bad entry magic"
    if kind not in (DATA, ZERO, COMMIT_KIND) or flags & ~FULL or (flags and kind != COMMIT_KIND):
        return f"bad entry kind {kind}/{flags}"
    if length > MAX_ENTRY or device >= MAX_DEVICES and kind != COMMIT_KIND:
        return "entry too large or bad device"
    size = length if kind == DATA else COMMIT.size if kind == COMMIT_KIND else 0
    if kind == COMMIT_KIND and length != COMMIT.size:
        return "bad commit length"
    if len(buf) - pos - ENTRY.size < size:
        return "torn entry payload"
    data = buf[pos + ENTRY.size:pos + ENTRY.size + size]
    if zlib.crc32(data, zlib.crc32(buf[pos:pos + 28])) != crc:
        return "checksum mismatch"
    return Entry(kind, flags, device, epoch, offset, length, bytes(data)), pos + ENTRY.size + size


def scan_entries(buf: bytes, start: int = 0, after_epoch: int = 0) -> tuple[list[tuple[Epoch, list[Entry]]], Scan]:
    """Every committed epoch in *buf* from *start* (epochs must grow, all above *after_epoch*), with its
    entries (COMMIT excluded), and where and why reading stopped. Never raises on bad bytes."""
    out: list[tuple[Epoch, list[Entry]]] = []
    scan = Scan(valid_end=start)
    pos, current, last = start, [], after_epoch
    epoch_start = start
    while pos < len(buf):
        got = _read_entry(buf, pos)
        if isinstance(got, str):
            scan.stopped = got
            break
        entry, nxt = got
        if entry.epoch <= last or (current and entry.epoch != current[0].epoch):
            scan.stopped = f"epoch {entry.epoch} out of order"
            break
        if entry.kind == COMMIT_KIND:
            count, nbytes, at_ns = COMMIT.unpack(entry.data)
            if count != len(current) or nbytes != sum(e.length for e in current):
                scan.stopped = f"commit of epoch {entry.epoch} does not match its entries"
                break
            info = Epoch(entry.epoch, epoch_start, nxt, bool(entry.flags & FULL), count, nbytes, at_ns)
            out.append((info, current))
            scan.epochs.append(info)
            scan.valid_end = nxt
            last, current, epoch_start = entry.epoch, [], nxt
        else:
            current.append(entry)
        pos = nxt
    if current and not scan.stopped:
        scan.stopped = f"epoch {current[0].epoch} has no commit (torn tail)"
    return out, scan


def parse_entries(buf: bytes, after_epoch: int = 0) -> list[tuple[Epoch, list[Entry]]]:
    """Committed epochs received from a peer: every byte must belong to one (LogError otherwise)."""
    epochs, scan = scan_entries(buf, 0, after_epoch)
    if scan.stopped or scan.valid_end != len(buf):
        raise LogError(f"received log entries are not whole committed epochs: {scan.stopped or 'trailing bytes'}")
    return epochs


def _private_file(path: Path) -> int:
    """Open or create *path* read-write, 0600, never through a link; its directory must be private."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise LogError(f"cannot open {path}: {err.strerror}") from err
    st = os.fstat(fd)
    if not (st.st_mode & 0o170000 == 0o100000) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise LogError(f"{path} is not a private regular file of ours; remove it")
    os.fchmod(fd, 0o600)
    return fd


def private_dirs(base: Path, *parts: str) -> Path:
    """``base/part/...``, each level made 0700 without following links (LogError when unsafe)."""
    for part in parts:
        if not part or "/" in part or part in (".", ".."):
            raise LogError(f"{part!r:.80} cannot name a directory")
    path = Path(base)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        private_dir(path)
        for part in parts:
            path = private_dir(path / part)
    except (UnsafePathError, OSError) as err:
        raise LogError(f"cannot make private directory {path}: {err}") from err
    return path


class Log:
    """One log file, open for appending (the owner's per device; a replica's per domain)."""

    def __init__(self, path: Path, fd: int, scan: Scan) -> None:
        self.path = path
        self.fd = fd
        self.epochs: list[Epoch] = list(scan.epochs)
        self.end = scan.valid_end

    @classmethod
    def open(cls, path: Path) -> Log:
        """Open or create the log at *path*; a torn or corrupt tail after the last commit is cut off."""
        fd = _private_file(path)
        try:
            size = os.fstat(fd).st_size
            if size < FILE_HEADER.size:
                head = FILE_HEADER.pack(FILE_MAGIC, VERSION, 0)
                head = head[:12] + struct.pack("<I", zlib.crc32(head[:12]))
                os.ftruncate(fd, 0)
                os.pwrite(fd, head, 0)
                os.fsync(fd)
                return cls(path, fd, Scan())
            buf = _read_all(fd, size)
            magic, version, crc = FILE_HEADER.unpack_from(buf)
            if magic != FILE_MAGIC or version != VERSION or zlib.crc32(buf[:12]) != crc:
                raise LogError(f"{path} is not an hvext replication log (version {VERSION})")
            _, scan = scan_entries(buf, FILE_HEADER.size)
            if scan.valid_end != size:
                os.ftruncate(fd, scan.valid_end)
                os.fsync(fd)
            return cls(path, fd, scan)
        except OSError as err:
            os.close(fd)
            raise LogError(f"cannot read {path}: {err.strerror}") from err
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def last(self) -> int:
        return self.epochs[-1].epoch if self.epochs else 0

    @property
    def first(self) -> int:
        return self.epochs[0].epoch if self.epochs else 0

    def append(self, data: bytes, *, sync: bool = True) -> list[Epoch]:
        """Append whole committed epochs (already encoded; checked here); fsync unless told not to."""
        epochs, scan = scan_entries(data, 0, self.last)
        if scan.stopped or scan.valid_end != len(data):
            raise LogError(f"refusing to append to {self.path}: {scan.stopped or 'trailing bytes'}")
        try:
            _write_all(self.fd, data, self.end)
            if sync:
                os.fsync(self.fd)
        except OSError as err:
            os.ftruncate(self.fd, self.end)
            raise LogError(f"cannot append to {self.path}: {err.strerror}") from err
        added = [Epoch(e.epoch, e.start + self.end, e.end + self.end, e.full, e.entries, e.nbytes, e.at_ns)
                 for e, _ in epochs]
        self.end += len(data)
        self.epochs += added
        return added

    def read(self, start: int, end: int) -> bytes:
        return _read_all(self.fd, end - start, start)

    def read_epochs(self, after: int, limit: int = 1 << 62) -> tuple[list[Epoch], bytes]:
        """The committed epochs above *after* (raw, COMMITs included), at least one and at most about
        *limit* bytes."""
        chosen: list[Epoch] = []
        for info in self.epochs:
            if info.epoch > after and (not chosen or info.end - chosen[0].start <= limit):
                chosen.append(info)
        if not chosen:
            return [], b""
        return chosen, self.read(chosen[0].start, chosen[-1].end)

    def entries(self, info: Epoch) -> list[Entry]:
        epochs, _ = scan_entries(self.read(info.start, info.end), 0, info.epoch - 1)
        return epochs[0][1] if epochs else []

    def drop_through(self, epoch: int) -> None:
        """Forget the epochs up to *epoch* (every replica has them): empty the file, or keep the rest."""
        keep = [e for e in self.epochs if e.epoch > epoch]
        if len(keep) == len(self.epochs):
            return
        if not keep:
            os.ftruncate(self.fd, FILE_HEADER.size)
            os.fsync(self.fd)
            self.epochs, self.end = [], FILE_HEADER.size
            return
        tail = self.read(keep[0].start, self.end)
        head = self.read(0, FILE_HEADER.size)
        tmp = self.path.with_name(self.path.name + ".compact")
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = _private_file(tmp)
        try:
            _write_all(fd, head + tail, 0)
            os.fsync(fd)
            os.replace(tmp, self.path)
            durable.fsync_dir(self.path.parent)
        except OSError as err:
            os.close(fd)
            raise LogError(f"cannot compact {self.path}: {err.strerror}") from err
        os.close(self.fd)
        self.fd = fd
        shift = keep[0].start - FILE_HEADER.size
        self.epochs = [Epoch(e.epoch, e.start - shift, e.end - shift, e.full, e.entries, e.nbytes, e.at_ns)
                       for e in keep]
        self.end -= shift

    def pending_bytes(self, after: int) -> int:
        return sum(e.end - e.start for e in self.epochs if e.epoch > after)


def _read_all(fd: int, size: int, offset: int = 0) -> bytes:
    chunks, done = [], 0
    while done < size:
        chunk = os.pread(fd, min(size - done, 1 << 24), offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def encode_epoch(epoch: int, blocks: Iterable[Entry], full: bool, device: int = 0) -> bytes:
    """Entries of one epoch and its COMMIT, encoded (what the owner appends and ships)."""
    entries = list(blocks)
    out = [e.encode() for e in entries]
    out.append(commit_entry(epoch, len(entries), sum(e.length for e in entries), full, device=device).encode())
    return b"".join(out)


# -------------------------------------------------------------------- replica image
@dataclass(frozen=True)
class DeviceSpec:
    name: str
    size: int

    @staticmethod
    def check_name(name: Any) -> str:
        if not isinstance(name, str) or not 0 < len(name) <= 64 or not all(c.isalnum() or c in "-_." for c in name) \
                or name.startswith("."):
            raise LogError(f"device name {name!r:.80} is not usable (letters, digits, - _ ., at most 64)")
        return name


class ReplicaImage:
    """A replica's copy of one domain's PMEM devices: ``<name>.img`` per device, ``received.log``,
    ``state.json`` {"stream", "epoch", "devices", "at_ns"}; see the module docstring for the order
    of writes that keeps every image at a whole epoch."""

    STATE = "state.json"
    LOG = "received.log"

    def __init__(self, directory: Path, lock_fd: int) -> None:
        self.directory = directory
        self.lock_fd = lock_fd
        self.stream = ""
        self.epoch = 0
        self.at_ns = 0
        self.devices: list[DeviceSpec] = []
        self.log: Log | None = None
        self.fds: list[int] = []

    @classmethod
    def open(cls, directory: Path, *, wait: float | None = None) -> ReplicaImage:
        """Open (locked: one user at a time) and recover: committed epochs in the log are redone."""
        try:
            lock_fd = durable.lock_file(directory / "replica.lock", wait=wait)
        except OSError as err:
            raise LogError(f"cannot lock replica {directory}: {err}") from err
        image = cls(directory, lock_fd)
        try:
            image._load_state()
            image._open_files()
            image.recover()
        except BaseException:
            image.close()
            raise
        return image

    def _load_state(self) -> None:
        path = self.directory / self.STATE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            raise LogError(f"cannot read {path}: {err.strerror}") from err
        try:
            data = protocol.loads(raw, LogError, str(path))
            if not isinstance(data, dict):
                raise LogError("not an object")
            stream, epoch, at_ns = data.get("stream"), data.get("epoch"), data.get("at_ns", 0)
            devices = data.get("devices")
            if not isinstance(stream, str) or len(stream) > 300:
                raise LogError("bad stream")
            for value in (epoch, at_ns):
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise LogError("bad epoch or time")
            if not isinstance(devices, list) or len(devices) > MAX_DEVICES:
                raise LogError("bad devices")
            specs = [DeviceSpec(DeviceSpec.check_name(d.get("name")), _size(d.get("size")))
                     for d in devices if isinstance(d, dict)]
            if len(specs) != len(devices):
                raise LogError("bad device")
        except LogError as err:
            raise LogError(f"replica state {path} is unusable: {err}") from err
        self.stream, self.epoch, self.at_ns, self.devices = stream, epoch, at_ns, specs

    def _open_files(self) -> None:
        self.log = Log.open(self.directory / self.LOG)
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        for spec in self.devices:
            fd = _private_file(self.directory / f"{spec.name}.img")
            if os.fstat(fd).st_size != spec.size:
                os.ftruncate(fd, spec.size)
            self.fds.append(fd)

    def _write_state(self) -> None:
        data = {"stream": self.stream, "epoch": self.epoch, "at_ns": self.at_ns,
                "devices": [{"name": d.name, "size": d.size} for d in self.devices]}
        try:
            durable.atomic_write(self.directory / self.STATE, json.dumps(data).encode())
        except OSError as err:
            raise LogError(f"cannot write {self.directory / self.STATE}: {err.strerror}") from err

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        if self.log is not None:
            self.log.close()
            self.log = None
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def __enter__(self) -> ReplicaImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def receive(self, stream: str, data: bytes, devices: list[DeviceSpec], *, hook: Any = None) -> int:
        """Store and apply received epochs of *stream* over *devices*; the applied epoch after it.

        Epochs follow the applied one without a gap, unless an epoch is FULL. A new stream (a new
        owner, a restarted one) or new devices must start with a FULL epoch: until it is applied the
        images and state keep the last whole epoch of the old stream."""
        if not isinstance(stream, str) or not 0 < len(stream) <= 300:
            raise LogError("bad stream id")
        new_stream = stream != self.stream or devices != self.devices
        epochs = parse_entries(data, 0 if new_stream else self.epoch)
        if not epochs:
            return self.epoch
        if new_stream and not epochs[0][0].full:
            raise LogError(f"epoch {epochs[0][0].epoch} of a new stream is not full: a full epoch must come first")
        expected = None if new_stream else self.epoch + 1
        for info, entries in epochs:
            if expected is not None and info.epoch != expected and not info.full:
                raise LogError(f"epoch {info.epoch} received, {expected} expected (a gap, and it is not full)")
            expected = info.epoch + 1
            for e in entries:
                if e.device >= len(devices) or e.offset + e.length > devices[e.device].size:
                    raise LogError(f"entry for device {e.device} at {e.offset}+{e.length} is outside the devices")
        assert self.log is not None
        if new_stream:
            self.log.drop_through(1 << 62)
            self.log.append(data)            # durable before the state names the new stream
            self.stream, self.devices, self.epoch = stream, list(devices), 0
            self._write_state()              # epoch 0: recovery redoes the whole log (the full epoch first)
            self._open_files()
        else:
            self.log.append(data)
        self.recover(hook=hook)
        return self.epoch

    def recover(self, *, hook: Any = None) -> None:
        """Redo every committed epoch in the log above the applied one, then record and drop them."""
        assert self.log is not None
        todo = [e for e in self.log.epochs if e.epoch > self.epoch]
        if not todo:
            if self.log.epochs:
                self.log.drop_through(1 << 63)
            return
        for info in todo:
            for entry in self.log.entries(info):
                fd = self.fds[entry.device]
                block = entry.data if entry.kind == DATA else bytes(entry.length)
                _write_all(fd, block, entry.offset)
                if hook is not None:
                    hook("block", info.epoch)
        for fd in self.fds:
            os.fsync(fd)
        if hook is not None:
            hook("synced", todo[-1].epoch)
        self.epoch, self.at_ns = todo[-1].epoch, todo[-1].at_ns
        self._write_state()
        if hook is not None:
            hook("state", self.epoch)
        self.log.drop_through(self.epoch)

    def image_path(self, name: str) -> Path:
        return self.directory / f"{DeviceSpec.check_name(name)}.img"

    def read_image(self, index: int) -> BinaryIO:
        return os.fdopen(os.dup(self.fds[index]), "rb")

    def iter_image(self, index: int, chunk: int = 1 << 20) -> Iterator[bytes]:
        size = self.devices[index].size
        for offset in range(0, size, chunk):
            yield os.pread(self.fds[index], min(chunk, size - offset), offset)


def _size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 40:
        raise LogError(f"bad device size {value!r:.40}")
    return value
