"""Persistence hints and epochs from guest applications (VPM), and their resolution for the host.

Applications on a DAX file system on pmem say which file ranges are
persistent, volatile (scratch) or hot, and mark epoch boundaries ("everything
written so far is durable")::

    from hvext_agent import hints
    hints.declare("/mnt/pmem/app.db", "persistent")
    hints.declare("/mnt/pmem/scratch", "volatile")
    ... write, msync/fsync ...
    hints.epoch("/mnt/pmem/app.db")   # blocks while the host freezes applications at epochs

or from a shell: ``python3 -m hvext_agent.hints declare PATH KIND`` /
``python3 -m hvext_agent.hints epoch PATH``. A freeze holds applications at
their epoch until the host thaws them, or FREEZE_HOLD_S seconds of guest time
at most (the guest's clock stops while it is paused), so a host that never
comes back cannot stop them for good. Records go to a JSON-lines file
in /run; the agent resolves file ranges to guest physical addresses (FIEMAP
plus the pmem device's physical start) when the host asks.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import sys
import time
from typing import Any

HINTS_DIR = "/run/hvext/hints"
RECORDS = HINTS_DIR + "/hints.jsonl"
FREEZE = HINTS_DIR + "/freeze"
KINDS = ("persistent", "volatile", "hot")
MAX_RECORDS_BYTES = 1 << 20
MAX_RECORDS = 4096
#: A freeze the host never thaws ends by itself after this many seconds of guest time.
FREEZE_HOLD_S = 60.0
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 1
FIEMAP_EXTENT = struct.Struct("=QQQ2Q I3I")
FIEMAP_HEADER = struct.Struct("=QQIIII")
_epochs: dict[str, int] = {}


def _append(record: dict[str, Any]) -> None:
    os.makedirs(HINTS_DIR, exist_ok=True)
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(RECORDS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, line)
    finally:
        os.close(fd)


def declare(path: str, kind: str, offset: int = 0, length: int | None = None) -> None:
    """Say that bytes [offset, offset+length) of *path* (default: the whole file) are of *kind*."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    if offset < 0 or (length is not None and length <= 0):
        raise ValueError("offset must be >= 0 and length > 0")
    _append({"op": "declare", "path": os.path.abspath(path), "kind": kind, "offset": offset,
             "length": length, "pid": os.getpid()})


def epoch(path: str) -> int:
    """Mark an epoch boundary for *path*: what was written (and synced) before is durable.

    While the host asks for a freeze (before a power-loss save or a snapshot),
    this call waits here, so the host copies the device exactly at an epoch.
    """
    path = os.path.abspath(path)
    number = _epochs[path] = _epochs.get(path, 0) + 1
    _append({"op": "epoch", "path": path, "epoch": number, "pid": os.getpid(), "t": time.time()})
    started = time.monotonic()
    if _frozen_until(started) > started:
        frozen = f"{HINTS_DIR}/frozen-{os.getpid()}"
        with open(frozen, "w") as handle:
            json.dump({"path": path, "epoch": number}, handle)
        try:
            while time.monotonic() < _frozen_until(started):
                time.sleep(0.02)
        finally:
            os.unlink(frozen)
    return number


def _frozen_until(started: float) -> float:
    """When the current freeze ends by itself (``time.monotonic()``; 0: no freeze).

    Never later than FREEZE_HOLD_S after *started* (the caller's first look), so an
    unreadable or rewritten freeze file cannot hold anyone longer."""
    try:
        with open(FREEZE) as handle:
            raw = handle.read(256)
    except FileNotFoundError:
        return 0.0
    except OSError:
        raw = ""
    try:
        until = float(json.loads(raw)["until"])
    except (ValueError, KeyError, TypeError):
        until = started + FREEZE_HOLD_S
    return min(until, started + FREEZE_HOLD_S)


# -- agent side -------------------------------------------------------------
def _extents(path: str, offset: int, length: int) -> list[tuple[int, int, int]]:
    """(file offset, device offset, length) of the file range, from FIEMAP."""
    count = 64
    request = bytearray(FIEMAP_HEADER.size + count * FIEMAP_EXTENT.size)
    FIEMAP_HEADER.pack_into(request, 0, offset, length, FIEMAP_FLAG_SYNC, 0, count, 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, request)
    finally:
        os.close(fd)
    mapped = FIEMAP_HEADER.unpack_from(request, 0)[3]
    extents = []
    for index in range(min(mapped, count)):
        logical, physical, size, *_ = FIEMAP_EXTENT.unpack_from(request, FIEMAP_HEADER.size + index * FIEMAP_EXTENT.size)
        start, end = max(logical, offset), min(logical + size, offset + length)
        if end > start:
            extents.append((start, physical + (start - logical), end - start))
    return extents


def _device_of(path: str) -> tuple[str, int]:
    """The pmem block device holding *path* and the guest physical address of its first byte."""
    st = os.stat(path)
    sysdir = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    name = os.path.basename(sysdir)
    if not name.startswith("pmem"):
        raise ValueError(f"{path} is not on a pmem device ({name})")
    with open(f"{sysdir}/device/resource") as handle:
        return name, int(handle.read().strip(), 16)


def resolve() -> dict[str, Any]:
    """Hints as guest physical ranges, epochs per device, and which processes sit frozen at an epoch."""
    ranges, errors, epochs, pids = [], [], {}, set()
    try:
        with open(RECORDS, "rb") as handle:
            lines = handle.read(MAX_RECORDS_BYTES).splitlines()[:MAX_RECORDS]
    except FileNotFoundError:
        lines = []
    for raw in lines:
        try:
            record = json.loads(raw)
            path = record["path"]
            device, base = _device_of(path)
            pids.add(int(record.get("pid", 0)))
            if record["op"] == "epoch":
                entry = epochs.setdefault(device, {"count": 0, "last_t": 0.0})
                entry["count"] += 1
                entry["last_t"] = max(entry["last_t"], float(record.get("t", 0)))
                continue
            size = os.path.getsize(path)
            length = record.get("length") or max(0, size - record["offset"])
            for _, physical, extent in _extents(path, record["offset"], length):
                ranges.append({"kind": record["kind"], "gpa": base + physical, "length": extent,
                               "device": device, "path": path})
        except (OSError, ValueError, KeyError, TypeError) as err:
            errors.append(f"{raw[:80]!r}: {err}")
    frozen = []
    if os.path.isdir(HINTS_DIR):
        frozen = [int(n.split("-", 1)[1]) for n in os.listdir(HINTS_DIR) if n.startswith("frozen-")]
    live = sorted(p for p in pids if p > 0 and os.path.exists(f"/proc/{p}"))
    now = time.monotonic()
    return {"ranges": ranges[:MAX_RECORDS], "epochs": epochs, "errors": errors[:32], "processes": live,
            "frozen": sorted(frozen), "freeze_requested": _frozen_until(now) > now}


def freeze(timeout: float, hold: float = FREEZE_HOLD_S) -> dict[str, Any]:
    """Ask hinting processes to stop at their next epoch; wait (bounded) until all living ones do.

    The freeze ends at :func:`thaw`, or by itself *hold* seconds (guest time) from now."""
    os.makedirs(HINTS_DIR, exist_ok=True)
    now = time.monotonic()
    tmp = f"{FREEZE}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump({"until": now + min(max(hold, 0.0), FREEZE_HOLD_S)}, handle)
    os.replace(tmp, FREEZE)  # appears complete: an application never reads half of it
    deadline = now + timeout
    while True:
        state = resolve()
        missing = [p for p in state["processes"] if p not in state["frozen"]]
        if not missing or time.monotonic() >= deadline:
            state["missing"] = missing
            return state
        time.sleep(0.02)


def thaw() -> dict[str, Any]:
    try:
        os.unlink(FREEZE)
    except FileNotFoundError:
        pass
    return {}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 3 and args[0] == "declare":
        declare(args[1], args[2], *(int(a) for a in args[3:5]))
    elif len(args) == 2 and args[0] == "epoch":
        print(epoch(args[1]))
    else:
        print("usage: python3 -m hvext_agent.hints declare PATH KIND [OFFSET LENGTH] | epoch PATH", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
