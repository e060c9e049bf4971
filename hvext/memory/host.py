"""The host's own memory figures, from /proc/meminfo (read fresh on every call)."""

from __future__ import annotations

from pathlib import Path

from hvext.units import KIB

MEMINFO = Path("/proc/meminfo")


def meminfo(key: str) -> int:
    """The /proc/meminfo field *key* (e.g. ``MemAvailable``, ``SwapFree``) in bytes; 0 when absent."""
    with open(MEMINFO) as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            if name == key:
                fields = rest.split()
                return int(fields[0]) * (KIB if fields[1:] == ["kB"] else 1)
    return 0
