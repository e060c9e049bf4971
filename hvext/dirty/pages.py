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
from hvext.units import GIB

START, STOP, QUERY = "x-hvext-dirty-log-start", "x-hvext-dirty-log-stop", "x-hvext-query-dirty-pages"


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


MAX_PAGES = 1 << 52  # 2**64 bytes of 4 KiB pages
PAGE_SIZES = tuple(1 << n for n in range(12, 31))  # 4 KiB .. 1 GiB
MAX_BLOCKS = 1024


def _uint(value: Any, what: str, limit: int = 1 << 63) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise ValueError(f"{what} is not an integer from 0 to {limit - 1}")
    return value


def _block(raw: Any) -> DirtyBlock:
    if not isinstance(raw, dict):
        raise ValueError("a block is not an object")
    block_id = raw.get("id")
    if not isinstance(block_id, str) or not block_id or len(block_id) > 256:
        raise ValueError("a block has no id string")
    pages = _uint(raw.get("pages"), f"pages of {block_id}", MAX_PAGES)
    if not isinstance(raw.get("migratable"), bool):
        raise ValueError(f"migratable of {block_id} is not a boolean")
    if "bitmap" in raw:
        if not isinstance(raw["bitmap"], str):
            raise ValueError(f"bitmap of {block_id} is not a string")
        data = base64.b64decode(raw["bitmap"], validate=True)
        if len(data) != (pages + 7) // 8:
            raise ValueError(f"bitmap of {block_id} has {len(data)} bytes for {pages} pages")
        runs = _runs_from_bitmap(data, pages)
    else:
        flat = raw.get("runs", [])
        if not isinstance(flat, list):
            raise ValueError(f"run list of {block_id} is not a list")
        if len(flat) % 2:
            raise ValueError(f"odd run list for {block_id}")
        flat = [_uint(x, f"a run of {block_id}", MAX_PAGES) for x in flat]
        runs = tuple(zip(flat[::2], flat[1::2]))
        end = 0
        for first, count in runs:
            if first < end or count <= 0 or first + count > pages:
                raise ValueError(f"bad run ({first}, {count}) in {block_id} of {pages} pages")
            end = first + count
    block = DirtyBlock(block_id, _uint(raw.get("length"), f"length of {block_id}"), raw["migratable"], pages, runs)
    if block.dirty != _uint(raw.get("dirty"), f"dirty of {block_id}", MAX_PAGES):
        raise ValueError(f"{block_id}: runs hold {block.dirty} pages, QEMU says {raw['dirty']}")
    return block


def decode(reply: Any, fetch_seconds: float = 0.0) -> DirtyPages:
    """Check and decode an ``x-hvext-query-dirty-pages`` reply; QMPError for anything malformed."""
    try:
        if not isinstance(reply, dict):
            raise ValueError("the reply is not an object")
        page_size = reply.get("page-size")
        if page_size not in PAGE_SIZES or isinstance(page_size, bool) or not isinstance(page_size, int):
            raise ValueError(f"page size is not a power of two from {PAGE_SIZES[0]} to {PAGE_SIZES[-1]}")
        raw_blocks = reply.get("blocks")
        if not isinstance(raw_blocks, list) or len(raw_blocks) > MAX_BLOCKS:
            raise ValueError(f"blocks is not a list (of at most {MAX_BLOCKS})")
        blocks: dict[str, DirtyBlock] = {}
        for raw in raw_blocks:
            block = _block(raw)
            if block.id in blocks:
                raise ValueError(f"block {block.id} appears twice")
            blocks[block.id] = block
        return DirtyPages(page_size, _uint(reply.get("generation"), "generation"),
                          _uint(reply.get("interval-ms"), "interval-ms"), blocks, fetch_seconds)
    except ValueError as err:  # binascii.Error is one too
        raise QMPError(f"malformed {QUERY} reply: {err}") from err


def command_names(reply: Any) -> set[str]:
    """The command names of a QMP ``query-commands`` reply; QMPError if it is not a list of named objects."""
    if not isinstance(reply, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in reply):
        raise QMPError("malformed query-commands reply")
    return {c["name"] for c in reply}


class DirtyLog:
    """``async with DirtyLog(qmp) as log: pages = await log.fetch()``; stops logging on exit."""

    def __init__(self, qmp: QMPSession, encoding: str = "runs") -> None:
        self.qmp = qmp
        self.encoding = encoding

    async def __aenter__(self) -> DirtyLog:
        commands = command_names(await self.qmp.execute("query-commands"))
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
