"""Host swapping of a VM's memory: page guest RAM of the QEMU process out to host swap.

The controller uses ``process_madvise(MADV_PAGEOUT)`` on the QEMU process's
guest-RAM mappings, in 2 MiB chunks from the top of guest RAM down, until
the process's resident set has shrunk by the requested amount. It needs free
host swap (``make setup`` creates a swap file when the host has none). The
host kernel here has neither soft-dirty bits nor idle page tracking, so the
chunks are not ranked by hotness: pages the guest uses again fault back in.
The QEMU PID comes from libvirt's pid file, never from scraping ``ps``.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hvext.errors import DomainStateError, HostError, UnsupportedError
from hvext.memory.host import meminfo
from hvext.units import KIB, MIB

SYS_PROCESS_MADVISE = 440  # x86_64
MADV_PAGEOUT = 21
CHUNK = 2 << 20
BATCH = 32  # chunks per syscall (64 MiB)
LIBVIRT_RUN_DIR = Path(os.environ.get("HVEXT_LIBVIRT_RUN_DIR", "/run/libvirt/qemu"))


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    rss: int
    swap: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PageoutResult:
    requested: int
    rss_before: int
    rss_after: int
    swap_before: int
    swap_after: int
    seconds: float

    @property
    def reclaimed(self) -> int:
        return max(0, self.rss_before - self.rss_after)


def qemu_pid(domain_name: str, run_dir: Path = LIBVIRT_RUN_DIR) -> int:
    """The QEMU PID libvirt recorded for a running domain on this host."""
    pidfile = run_dir / f"{domain_name}.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
    except FileNotFoundError as err:
        raise DomainStateError(f"no QEMU pid file {pidfile}: is {domain_name!r} running on this host?") from err
    except (ValueError, ProcessLookupError) as err:
        raise DomainStateError(f"QEMU of {domain_name!r} is not running ({pidfile})") from err
    return pid


def process_memory(pid: int) -> dict[str, int]:
    """Rss, Pss and Swap of a process in bytes (from /proc/PID/smaps_rollup)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB":
                    values[key] = int(parts[0]) * KIB
    except OSError as err:
        raise DomainStateError(f"process {pid} vanished: {err}") from err
    return {"rss": values.get("Rss", 0), "pss": values.get("Pss", 0), "swap": values.get("Swap", 0)}


def guest_ram_mappings(pid: int, ram_bytes: int) -> list[Mapping]:
    """The QEMU mappings that hold guest RAM: anonymous, read-write, exactly *ram_bytes* long.

    libvirt gives each NUMA cell a RAM backend of the cell's size; hvext domains
    have one cell holding all boot memory.
    """
    found: list[Mapping] = []
    current: list[int] | None = None
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                first = line.split(maxsplit=5)
                if "-" in first[0] and len(first) >= 5 and not first[0].endswith(":"):
                    start, end = (int(x, 16) for x in first[0].split("-"))
                    anonymous = len(first) == 5 or first[5].strip() == ""
                    current = [start, end, 0, 0] if anonymous and first[1].startswith("rw") \
                        and end - start == ram_bytes else None
                    if current is not None:
                        found.append(Mapping(start, end, 0, 0))
                elif current is not None and first[0] in ("Rss:", "Swap:"):
                    value = int(first[1]) * KIB
                    last = found[-1]
                    found[-1] = Mapping(last.start, last.end, value if first[0] == "Rss:" else last.rss,
                                        value if first[0] == "Swap:" else last.swap)
    except OSError as err:
        raise DomainStateError(f"cannot read the mappings of process {pid}: {err}") from err
    if not found:
        raise HostError(f"no guest RAM mapping of {ram_bytes} bytes in process {pid}")
    return found


def process_madvise(pidfd: int, ranges: list[tuple[int, int]], advice: int) -> int:
    """``process_madvise(pidfd, ranges, advice)``: the bytes advised, or ``-errno`` (the caller decides)."""
    iov = (_IOVec * len(ranges))(*[_IOVec(start, length) for start, length in ranges])
    done = _libc.syscall(SYS_PROCESS_MADVISE, pidfd, iov, len(ranges), advice, 0)
    return int(done) if done >= 0 else -ctypes.get_errno()


def pageout(pidfd: int, ranges: list[tuple[int, int]]) -> None:
    """Page *ranges* of the process behind *pidfd* out to swap (``MADV_PAGEOUT``); HostError on failure."""
    done = process_madvise(pidfd, ranges, MADV_PAGEOUT)
    if done < 0:
        raise HostError(f"process_madvise(MADV_PAGEOUT) failed: {os.strerror(-done)}")


def page_out(pid: int, ram_bytes: int, amount: int, *, deadline_s: float = 60.0) -> PageoutResult:
    """Shrink the QEMU process's resident guest RAM by about *amount* bytes through host swap."""
    if amount <= 0:
        raise ValueError("amount must be positive")
    free_swap = meminfo("SwapFree")
    if free_swap < amount:
        raise UnsupportedError(f"host swap has {free_swap // MIB} MiB free, {amount // MIB} MiB needed; "
                               "`make setup` creates a swap file")
    started = time.monotonic()
    before = process_memory(pid)
    mappings = guest_ram_mappings(pid, ram_bytes)
    chunks = [(start, CHUNK) for m in mappings for start in range(m.end - CHUNK, m.start - 1, -CHUNK)]
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as err:
        raise DomainStateError(f"QEMU process {pid} is gone: {err}") from err
    try:
        for index in range(0, len(chunks), BATCH):
            pageout(pidfd, chunks[index:index + BATCH])
            now = process_memory(pid)
            if before["rss"] - now["rss"] >= amount or time.monotonic() - started > deadline_s:
                break
    finally:
        os.close(pidfd)
    after = process_memory(pid)
    return PageoutResult(amount, before["rss"], after["rss"], before["swap"], after["swap"],
                         time.monotonic() - started)
