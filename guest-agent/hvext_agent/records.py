"""Numbered, checksummed records appended to a file on (DAX-mounted) PMEM: the HA workload.

``python3 -m hvext_agent.records write --dir D --status F [--count N] [--interval S]``
appends fixed-size records to ``D/records.dat``: record *n* (1, 2, ...) sits at
offset ``(n - 1) * RECORD_SIZE`` and holds a magic, *n*, the time it was
written, a payload derived from *n* and a SHA-256 checksum of all that. After
each record the file is made durable (``fdatasync``; on ext4/xfs with DAX this
flushes the CPU caches to the persistence domain); only then does the status
file (replaced atomically) say ``{"last_durable": n, ...}``. So every record
the status file ever named must be found after any crash. A writer started on
an existing file continues after its last valid record.

``python3 -m hvext_agent.records verify --dir D`` prints
``{"last_valid": N, "contiguous": bool, ...}``: *N* is the highest valid
record, *contiguous* says whether every record 1..N is valid (a torn record
after N, the one being written at a crash, does not count against it).

Standard library only (it runs in the guest; also run on the host by the tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time

FILE_NAME = "records.dat"
RECORD_SIZE = 128
MAGIC = b"HVR1"
#: magic, record number, time written (ns since the epoch)
HEADER = struct.Struct("<4sQQ")
DIGEST_SIZE = 32
PAYLOAD_SIZE = RECORD_SIZE - HEADER.size - DIGEST_SIZE
#: Bad record numbers listed by verify (the count is always complete).
MAX_LISTED = 32


def payload(number: int) -> bytes:
    """The payload of record *number*: derived from it, so verify checks content, not only framing."""
    seed = hashlib.sha256(b"hvext-records\0" + number.to_bytes(8, "little")).digest()
    return (seed * (PAYLOAD_SIZE // len(seed) + 1))[:PAYLOAD_SIZE]


def encode(number: int, written_ns: int) -> bytes:
    """Record *number* as RECORD_SIZE bytes."""
    body = HEADER.pack(MAGIC, number, written_ns) + payload(number)
    return body + hashlib.sha256(body).digest()


def decode(raw: bytes, number: int) -> int | None:
    """The time record *number* was written (ns) if *raw* is that record intact, else None."""
    if len(raw) != RECORD_SIZE:
        return None
    body, digest = raw[:-DIGEST_SIZE], raw[-DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        return None
    magic, found, written_ns = HEADER.unpack_from(body)
    if magic != MAGIC or found != number or body[HEADER.size:] != payload(number):
        return None
    return int(written_ns)


def verify(directory: str) -> dict[str, object]:
    """Check every record slot of ``directory/records.dat`` (see the module doc)."""
    path = os.path.join(directory, FILE_NAME)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return {"last_valid": 0, "contiguous": True, "records": 0, "bad": [], "bad_count": 0,
                "tail_bytes": 0, "file": path, "exists": False}
    slots = len(data) // RECORD_SIZE
    valid = [decode(data[i * RECORD_SIZE:(i + 1) * RECORD_SIZE], i + 1) is not None for i in range(slots)]
    last_valid = max((i + 1 for i, ok in enumerate(valid) if ok), default=0)
    bad = [i + 1 for i in range(last_valid) if not valid[i]]
    return {"last_valid": last_valid, "contiguous": not bad, "records": sum(valid), "bad": bad[:MAX_LISTED],
            "bad_count": len(bad), "tail_bytes": len(data) - last_valid * RECORD_SIZE, "file": path,
            "exists": True}


def _write_status(path: str, status: dict[str, object]) -> None:
    """Replace the status file atomically (a reader never sees half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(status, handle)
    os.replace(tmp, path)


def write(directory: str, status_path: str, count: int = 0, interval: float = 0.0) -> int:
    """Append records (forever when *count* is 0), durable one by one; the last durable number."""
    os.makedirs(directory, exist_ok=True)
    found = verify(directory)
    number = int(found["last_valid"])  # type: ignore[arg-type]
    fd = os.open(os.path.join(directory, FILE_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.time()
        first = number + 1
        _write_status(status_path, {"last_durable": number, "first": first, "pid": os.getpid(),
                                    "dir": directory, "started": started, "t": started})
        while count == 0 or number < first - 1 + count:
            record = encode(number + 1, time.time_ns())
            offset = number * RECORD_SIZE
            if os.pwrite(fd, record, offset) != RECORD_SIZE:
                raise OSError(f"short write of record {number + 1}")
            os.fdatasync(fd)  # the record, and the file size that reaches it, are durable
            number += 1
            _write_status(status_path, {"last_durable": number, "first": first, "pid": os.getpid(),
                                        "dir": directory, "started": started, "t": time.time()})
            if interval > 0:
                time.sleep(interval)
    finally:
        os.close(fd)
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m hvext_agent.records")
    sub = parser.add_subparsers(dest="action", required=True)
    w = sub.add_parser("write", help="append durable records, reporting the last durable one in --status")
    w.add_argument("--dir", required=True)
    w.add_argument("--status", required=True)
    w.add_argument("--count", type=int, default=0, help="records to write (0: until killed)")
    w.add_argument("--interval", type=float, default=0.0, help="seconds between records")
    v = sub.add_parser("verify", help="print the highest valid record and whether 1..it are all valid")
    v.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    if args.action == "write":
        if args.count < 0 or not 0 <= args.interval <= 3600:
            parser.error("--count must be >= 0 and --interval 0 to 3600")
        print(json.dumps({"last_durable": write(args.dir, args.status, args.count, args.interval)}))
    else:
        print(json.dumps(verify(args.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
