"""A memory-dirtying workload with a known rate and working set (runs as its own process).

``python3 -m hvext_agent.stress --rate-mib 50 --wss-mib 128 --seconds 30 --status FILE``
writes one byte in each 4 KiB page of a working set, page after page, paced
so that the pages dirtied per second match the requested rate, and keeps a
JSON status (pages written, achieved rate) in FILE about once a second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PAGE = 4096
PFN_SAMPLE = 64


def physical_pages(view: memoryview, count: int) -> list[int]:
    """Guest page frame numbers of *count* evenly spaced pages of *view* (from /proc/self/pagemap).

    Lets the host check that a dirty page list holds the pages this workload writes.
    """
    import ctypes
    address = ctypes.addressof(ctypes.c_char.from_buffer(view.obj))  # type: ignore[arg-type]
    pages = len(view) // PAGE
    frames = []
    with open("/proc/self/pagemap", "rb") as pagemap:
        for index in range(0, pages, max(1, pages // count)):
            pagemap.seek((address // PAGE + index) * 8)
            entry = int.from_bytes(pagemap.read(8), "little")
            if entry >> 63 & 1:  # present
                frames.append(entry & ((1 << 55) - 1))
    return frames[:count]


_frames: list[int] = []


def run(rate_mib: float, wss_mib: int, seconds: float, status_path: str) -> None:
    pages = wss_mib * 256
    buffer = bytearray(wss_mib << 20)
    view = memoryview(buffer)
    for offset in range(0, len(buffer), PAGE):  # fault everything in first: the rate then measures dirtying only
        view[offset] = 1
    global _frames
    _frames = physical_pages(view, PFN_SAMPLE)
    target = rate_mib * 256  # pages per second
    started = time.monotonic()
    written = 0
    page = 0
    value = 2
    last_status = 0.0
    deadline = started + seconds if seconds > 0 else float("inf")
    batch = max(1, int(target / 100))
    while True:
        now = time.monotonic()
        if now >= deadline:
            break
        due = (now - started) * target
        if written >= due:
            time.sleep(min(0.01, (written - due) / target if target else 0.01))
            continue
        for _ in range(batch):
            view[page * PAGE] = value
            page += 1
            if page == pages:
                page = 0
                value = value % 250 + 2
        written += batch
        if now - last_status >= 1.0:
            _status(status_path, started, written, rate_mib, wss_mib, running=True)
            last_status = now
    _status(status_path, started, written, rate_mib, wss_mib, running=False)


def _status(path: str, started: float, written: int, rate_mib: float, wss_mib: int, *, running: bool) -> None:
    elapsed = max(1e-9, time.monotonic() - started)
    data = {"pfn_sample": _frames, "running": running, "elapsed_s": round(elapsed, 3), "pages_written": written,
            "achieved_mib_s": round(written / 256 / elapsed, 2), "rate_mib_s": rate_mib, "wss_mib": wss_mib}
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(data, handle)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m hvext_agent.stress")
    parser.add_argument("--rate-mib", type=float, required=True)
    parser.add_argument("--wss-mib", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=0)
    parser.add_argument("--status", required=True)
    args = parser.parse_args(argv)
    run(args.rate_mib, args.wss_mib, args.seconds, args.status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
