"""Dirty page lists over an interval, from the hvext patch series' QMP commands (C9).

``x-hvext-dirty-log-start`` makes QEMU log writes to guest RAM in a bitmap of
its own (migration and calc-dirty-rate keep theirs); each
``x-hvext-query-dirty-pages`` returns, per RAM block, the pages written since
the previous query. :class:`DirtyLog` wraps that as an async context manager;
:class:`DirtyPages` is the decoded, validated result later capabilities use
(power-loss saves, dirty-data recovery, mirroring). On a stock QEMU the
commands are missing and :class:`DirtyLog` raises UnsupportedError.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hvext.errors import QMPError, UnsupportedError
from hvext.qmp import QMPSession

START, STOP, QUERY = "x-hvext-dirty-log-start", "x-hvext-dirty-log-stop", "x-hvext-query-dirty-pages"
GIB = 1 << 30


@dataclass(frozen=True)
class DirtyBlock:
    """Dirty pages of one RAM block, as sorted, non-overlapping (first page, count) runs."""

    id: str
    length: int
    migratable: bool
    pages: int
    runs: tuple[tuple[int, int], ...]

    @property
    def dirty(self) -> int:
        return sum(count for _, count in self.runs)

    def page_numbers(self) -> Iterator[int]:
        for first, count in self.runs:
            yield from range(first, first + count)

    def contains(self, page: int) -> bool:
        return any(first <= page < first + count for first, count in self.runs)


@dataclass(frozen=True)
class DirtyPages:
    page_size: int
    generation: int
    interval_ms: int
    blocks: dict[str, DirtyBlock] = field(default_factory=dict)
    fetch_seconds: float = 0.0

    @property
    def dirty(self) -> int:
        return sum(b.dirty for b in self.blocks.values())

    def histogram(self, block: str, bucket: int = GIB) -> list[int]:
        """Dirty pages per *bucket* bytes of the block (default: per GiB)."""
        b = self.blocks[block]
        per = max(1, bucket // self.page_size)
        counts = [0] * max(1, -(-b.pages // per))
        for first, count in b.runs:
            page = first
            while page < first + count:
                index = page // per
                upto = min(first + count, (index + 1) * per)
                counts[index] += upto - page
                page = upto
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"page_size": self.page_size, "generation": self.generation, "interval_ms": self.interval_ms,
                "dirty": self.dirty, "fetch_seconds": self.fetch_seconds,
                "blocks": {k: {"length": b.length, "migratable": b.migratable, "pages": b.pages,
                               "dirty": b.dirty, "runs": [list(r) for r in b.runs]} for k, b in self.blocks.items()}}


def _runs_from_bitmap(data: bytes, pages: int) -> tuple[tuple[int, int], ...]:
    runs: list[tuple[int, int]] = []
    start = None
    for page in range(pages):
        bit = data[page >> 3] >> (page & 7) & 1
        if bit and start is None:
            start = page
        elif not bit and start is not None:
            runs.append((start, page - start))
            start = None
    if start is not None:
        runs.append((start, pages - start))
    return tuple(runs)


def decode(reply: Any, fetch_seconds: float = 0.0) -> DirtyPages:
    """Check and decode an ``x-hvext-query-dirty-pages`` reply (QEMU is trusted, but be exact)."""
    try:
        page_size = int(reply["page-size"])
        blocks: dict[str, DirtyBlock] = {}
        for raw in reply["blocks"]:
            pages = int(raw["pages"])
            if "bitmap" in raw:
                data = base64.b64decode(raw["bitmap"])
                if len(data) != (pages + 7) // 8:
                    raise ValueError(f"bitmap of {raw['id']} has {len(data)} bytes for {pages} pages")
                runs = _runs_from_bitmap(data, pages)
            else:
                flat = [int(x) for x in raw.get("runs", [])]
                if len(flat) % 2:
                    raise ValueError(f"odd run list for {raw['id']}")
                runs = tuple(zip(flat[::2], flat[1::2]))
                end = 0
                for first, count in runs:
                    if first < end or count <= 0 or first + count > pages:
                        raise ValueError(f"bad run ({first}, {count}) in {raw['id']} of {pages} pages")
                    end = first + count
            block = DirtyBlock(str(raw["id"]), int(raw["length"]), bool(raw["migratable"]), pages, runs)
            if block.dirty != int(raw["dirty"]):
                raise ValueError(f"{block.id}: runs hold {block.dirty} pages, QEMU says {raw['dirty']}")
            blocks[block.id] = block
        return DirtyPages(page_size, int(reply["generation"]), int(reply["interval-ms"]), blocks, fetch_seconds)
    except (KeyError, TypeError, ValueError) as err:
        raise QMPError(f"malformed {QUERY} reply: {err}") from err


class DirtyLog:
    """``async with DirtyLog(qmp) as log: pages = await log.fetch()``; stops logging on exit."""

    def __init__(self, qmp: QMPSession, encoding: str = "runs") -> None:
        self.qmp = qmp
        self.encoding = encoding

    async def __aenter__(self) -> DirtyLog:
        commands = {c["name"] for c in await self.qmp.execute("query-commands")}
        if QUERY not in commands:
            raise UnsupportedError("dirty page lists need the patched QEMU (`make qemu`); "
                                   "this QEMU only gives dirty rates (`hvext domdirtyrate`)")
        await self.qmp.execute(START)
        return self

    async def fetch(self) -> DirtyPages:
        started = time.perf_counter()
        reply = await self.qmp.execute(QUERY, {"encoding": self.encoding})
        return decode(reply, time.perf_counter() - started)

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.qmp.execute(STOP)
        except QMPError:
            if exc[0] is None:
                raise
