"""On-disk format of the RVM log: header slots, records, and the scanner.

The log is a preallocated file used as a ring of ``capacity`` bytes::

    offset 0     header slot 0   (4 KiB; HEADER + crc32)
    offset 4096  header slot 1   (4 KiB)
    offset 8192  record area     (capacity bytes, a ring)

Positions in the ring are *log sequence numbers* (LSNs): byte counts that only
grow; a record at LSN ``l`` lives at file offset ``8192 + l % capacity`` and
never straddles the end of the ring. The header names the oldest record that
may still be unapplied (``head_lsn``) and a random ``salt`` that seeds every
record's CRC32, so records left over from an earlier incarnation of the log
never validate. Headers are written alternately to the two slots (slot =
generation % 2); the valid slot with the highest generation wins, so a torn
header write leaves the previous one in force.

A record is a 24-byte header followed by a payload, padded to 8 bytes::

    u32 crc      CRC32 (seeded with the salt) of everything after this field
    u16 kind     1 = transaction, 2 = segment declaration, 3 = wrap
    u16 flags    0
    u32 length   whole record, header and padding included
    u32 count    transaction: number of ranges; segment declaration: segment id
    u64 lsn      the record's own LSN (rejects stale records from earlier laps)

A transaction payload is a table of ``count`` range entries (u32 segment
id, u32 length, u64 segment offset), then the new values of the ranges, in
table order, back to back. A segment declaration
payload is the segment's absolute path (file-system encoding); it precedes,
in the same epoch, every transaction record that names the segment id. A
wrap record says "continue at the start of the ring"; when fewer than 24
bytes are left before the end of the ring the wrap is implicit.

Recovery reads records from ``head_lsn`` while each one is valid (CRC, LSN,
kind, length, structure); the first invalid record is the torn tail, and it
and everything after it are ignored. All integers are little-endian.
"""

from __future__ import annotations

import functools
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from hvext.rvm.errors import (
    RVMLogCorruptError,
    RVMNotALogError,
    RVMVersionError,
)

MAGIC = b"HVRVMLOG"
VERSION = 1
SLOT_SIZE = 4096
DATA_START = 2 * SLOT_SIZE
ALIGN = 8
MIN_CAPACITY = 64 * 1024
MIN_LOG_SIZE = DATA_START + MIN_CAPACITY

# magic, version, flags, log_size, capacity, head_lsn, generation, salt
HEADER = struct.Struct("<8sIIQQQQI")
U32 = struct.Struct("<I")
# crc, kind, flags, length, count, lsn
REC = struct.Struct("<IHHIIQ")
REC_BODY = struct.Struct("<HHIIQ")  # REC without the crc
RANGE = struct.Struct("<IIQ")  # segment id, length, segment offset


@functools.lru_cache(maxsize=128)
def range_table(count: int) -> struct.Struct:
    """The Struct packing a table of ``count`` range entries in one call."""
    return struct.Struct("<" + "IIQ" * count)


@functools.lru_cache(maxsize=128)
def txn_body(count: int) -> struct.Struct:
    """The Struct packing a transaction record's header without its crc, then its ``count`` range entries."""
    return struct.Struct("<HHIIQ" + "IIQ" * count)

KIND_TXN = 1
KIND_SEG = 2
KIND_WRAP = 3

READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class LogHeader:
    """The decoded contents of one header slot."""

    log_size: int
    capacity: int
    head_lsn: int
    generation: int
    salt: int


def pack_header(h: LogHeader) -> bytes:
    """Encode a header slot (fields + CRC32 of them)."""
    body = HEADER.pack(MAGIC, VERSION, 0, h.log_size, h.capacity, h.head_lsn, h.generation, h.salt)
    return body + U32.pack(zlib.crc32(body))


def header_offset(generation: int) -> int:
    """File offset of the slot a header of this generation is written to."""
    return (generation % 2) * SLOT_SIZE


def capacity_for(log_size: int) -> int:
    """Ring capacity of a log file of ``log_size`` bytes."""
    return (log_size - DATA_START) // ALIGN * ALIGN


def read_header(fd: int, path: str = "") -> LogHeader:
    """Read and validate the header; return the newest valid slot.

    Raises RVMNotALogError (no slot has the magic), RVMVersionError (a slot
    with the magic has another version) or RVMLogCorruptError (no slot is
    valid, or the fields are inconsistent).
    """
    slots = []
    size = HEADER.size + U32.size
    for i in range(2):
        raw = os.pread(fd, size, i * SLOT_SIZE)
        slots.append(raw)
    magic_slots = [raw for raw in slots if len(raw) == size and raw[:8] == MAGIC]
    if not magic_slots:
        raise RVMNotALogError(f"{path or 'file'} is not an hvext RVM log (no log magic)")
    valid: list[LogHeader] = []
    for raw in magic_slots:
        magic, version, _flags, log_size, capacity, head, gen, salt = HEADER.unpack_from(raw)
        if version != VERSION:
            raise RVMVersionError(
                f"{path or 'log'} has RVM log format version {version}; this code reads version {VERSION}"
            )
        (crc,) = U32.unpack_from(raw, HEADER.size)
        if crc != zlib.crc32(raw[: HEADER.size]):
            continue
        valid.append(LogHeader(log_size, capacity, head, gen, salt))
    if not valid:
        raise RVMLogCorruptError(f"{path or 'log'}: both header slots are damaged")
    h = max(valid, key=lambda x: x.generation)
    if (
        h.log_size < MIN_LOG_SIZE
        or h.capacity != capacity_for(h.log_size)
        or h.capacity < MIN_CAPACITY
    ):
        raise RVMLogCorruptError(
            f"{path or 'log'}: inconsistent header (size {h.log_size}, capacity {h.capacity})"
        )
    return h


def physical(lsn: int, capacity: int) -> int:
    """File offset of the byte at ``lsn``."""
    return DATA_START + lsn % capacity


def aligned(n: int) -> int:
    """``n`` rounded up to the record alignment."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


def record_crc(body_header: bytes, parts: list, salt: int) -> int:
    """CRC32 of a record: its header without the crc field, then the payload parts."""
    crc = zlib.crc32(body_header, salt)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


class Record(NamedTuple):
    """One valid record found by :class:`Scanner`."""

    lsn: int
    kind: int
    length: int
    count: int
    ranges: list  # TXN: [(segment id, segment offset, memoryview of new values)]
    path: bytes  # SEG: the segment path


class Scanner:
    """Reads valid records of a log ring in LSN order, through a read buffer.

    Iterating stops at the first invalid record (the torn tail) or at
    ``stop_lsn``; afterwards ``end_lsn`` is the LSN where it stopped and
    ``torn`` says whether it stopped on an invalid record rather than at
    ``stop_lsn``. Wrap records are consumed, not yielded.
    """

    def __init__(self, fd: int, capacity: int, salt: int, file_size: int) -> None:
        self._fd = fd
        self._cap = capacity
        self._salt = salt
        self._file_size = file_size
        self._buf = memoryview(b"")
        self._buf_lsn = 0
        self.end_lsn = 0
        self.torn = False

    def _window(self, lsn: int, n: int) -> tuple[memoryview, int] | None:
        """(buffer, position) holding ``n`` bytes at ``lsn``, or None if the file is short."""
        start = lsn - self._buf_lsn
        if 0 <= start and start + n <= len(self._buf):
            return self._buf, start
        room = self._cap - lsn % self._cap  # records never cross the ring end
        phys = physical(lsn, self._cap)
        want = min(max(n, READ_CHUNK), room, max(0, self._file_size - phys))
        if want < n:
            return None
        data = os.pread(self._fd, want, phys)
        if len(data) < n:
            return None
        self._buf = memoryview(data)
        self._buf_lsn = lsn
        return self._buf, 0

    def scan(self, start_lsn: int, stop_lsn: int | None = None) -> Iterator[Record]:
        """Yield the valid records from ``start_lsn`` on."""
        cap, salt = self._cap, self._salt
        lsn = start_lsn
        hsize = REC.size
        rsize = RANGE.size
        unpack_rec, iter_ranges, crc32 = REC.unpack_from, RANGE.iter_unpack, zlib.crc32
        self.torn = True
        while stop_lsn is None or lsn < stop_lsn:
            room = cap - lsn % cap
            if room < hsize:  # implicit wrap
                lsn += room
                continue
            win = self._window(lsn, hsize)
            if win is None:
                break
            buf, pos = win
            crc, kind, flags, length, count, rec_lsn = unpack_rec(buf, pos)
            if (
                rec_lsn != lsn
                or flags != 0
                or length < hsize
                or length % ALIGN
                or length > room
                or kind not in (KIND_TXN, KIND_SEG, KIND_WRAP)
            ):
                break
            if pos + length > len(buf):
                win = self._window(lsn, length)
                if win is None:
                    break
                buf, pos = win
            end = pos + length
            if crc32(buf[pos + 4 : end], salt) != crc:
                break
            if kind == KIND_WRAP:
                if length != hsize:
                    break
                lsn += room
                continue
            ranges: list = []
            path = b""
            if kind == KIND_TXN:
                p = pos + hsize + rsize * count  # the data follows the range table
                if p > end:
                    break
                for seg_id, n, off in iter_ranges(buf[pos + hsize : p]):
                    ranges.append((seg_id, off, buf[p : p + n]))
                    p += n
                if p > end or aligned(p - pos) != length:
                    break
            else:
                path = bytes(buf[pos + hsize : end]).rstrip(b"\0")
                if not path:
                    break
            yield Record(lsn, kind, length, count, ranges, path)
            lsn += length
        else:
            self.torn = False
        self.end_lsn = lsn

    def ranges(self, start_lsn: int, stop_lsn: int) -> Iterator[tuple[int, int, memoryview]]:
        """Yield (segment id, segment offset, new bytes) of every range logged in [start, stop).

        For truncation, which reads back records this process wrote (and
        synced) itself: the structure of every record is checked (LSN, kind,
        length, table) but not its CRC, which would cost a pass over all the
        data (about 0.3 us per KiB). Stops early, with ``torn`` set, at a record
        that does not parse; ``end_lsn`` says where.
        """
        cap = self._cap
        hsize, rsize = REC.size, RANGE.size
        unpack_rec, iter_ranges, unpack_range = REC.unpack_from, RANGE.iter_unpack, RANGE.unpack_from
        lsn = start_lsn
        buf, buf_lsn = self._buf, self._buf_lsn
        self.torn = True
        while lsn < stop_lsn:
            room = cap - lsn % cap
            if room < hsize:  # implicit wrap
                lsn += room
                continue
            pos = lsn - buf_lsn
            if pos < 0 or pos + hsize > len(buf):
                win = self._window(lsn, hsize)
                if win is None:
                    break
                buf, pos = win
                buf_lsn = lsn
            _crc, kind, flags, length, count, rec_lsn = unpack_rec(buf, pos)
            if rec_lsn != lsn or flags or length < hsize or length & (ALIGN - 1) or length > room:
                break
            if pos + length > len(buf):
                win = self._window(lsn, length)
                if win is None:
                    break
                buf, pos = win
                buf_lsn = lsn
            if kind == KIND_TXN:
                p = pos + hsize + rsize * count
                if count == 1 and length >= hsize + rsize:  # the common case: no table loop
                    seg_id, n, off = unpack_range(buf, pos + hsize)
                    if (hsize + rsize + n + ALIGN - 1) & ~(ALIGN - 1) != length:
                        break
                    yield seg_id, off, buf[p : p + n]
                    lsn += length
                    continue
                if p > pos + length:
                    break
                table = list(iter_ranges(buf[pos + hsize : p]))
                q = p
                for entry in table:
                    q += entry[1]
                if (q - pos + ALIGN - 1) & ~(ALIGN - 1) != length:
                    break  # checked before yielding: no byte of a bad record is applied
                for seg_id, n, off in table:
                    yield seg_id, off, buf[p : p + n]
                    p += n
            elif kind == KIND_WRAP:
                lsn += room
                continue
            elif kind != KIND_SEG:
                break
            lsn += length
        else:
            self.torn = False
        self.end_lsn = lsn
