"""Dirty-page commands: domdirtyrate (like virsh domdirtyrate-calc) and dirtylog (page lists, --watch)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from hvext import aio
from hvext.cli import common, watch
from hvext.dirty import rate
from hvext.dirty.pages import DirtyLog, DirtyPages
from hvext.errors import UsageError
from hvext.host import Domain
from hvext.units import MIB

DEFAULT_INTERVAL_S = 1.0
HISTORY = 60  # samples the --watch display plots
SPARKS = "▁▂▃▄▅▆▇█"


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("domdirtyrate", help="measure the rate at which the guest dirties memory")
    common.add_domain(p)
    p.add_argument("--seconds", type=int, default=1, help="measuring time, 1 to 60 (default 1)")
    p.add_argument("--mode", choices=rate.MODES, default="page-sampling")
    p.add_argument("--sample-pages", type=int, default=512, help="pages sampled per GiB (page-sampling)")
    common.add_json(p)
    p.set_defaults(func=cmd_domdirtyrate)

    p = commands.add_parser("dirtylog", help="pages the guest dirtied over an interval, or every interval with "
                                             "--watch (needs the patched QEMU)")
    common.add_domain(p)
    p.add_argument("--seconds", type=common.seconds, metavar="SECONDS",
                   help=f"interval (default {DEFAULT_INTERVAL_S:g})")
    watch.add_arguments(p, default=DEFAULT_INTERVAL_S, source="with the pages dirtied in the last interval")
    common.add_json(p)
    p.set_defaults(func=cmd_dirtylog)


def cmd_domdirtyrate(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        with common.console.status(f"measuring for {args.seconds} s ({args.mode})..."):
            result = aio.run(rate.measure(dom, args.seconds, args.mode, args.sample_pages))
    common.print_result(args.json, result.to_dict(), lambda: common.print_fields({
        "Domain": dom.name, "Mode": result.mode, "Calc time": f"{result.seconds:.0f} s",
        "Dirty rate": f"{result.rate_mib_s} MiB/s"}))
    return 0


async def dirty_pages_over(domain: Domain, seconds: float) -> DirtyPages:
    """Start a dirty log, let *seconds* pass, and return the pages dirtied in between."""
    async with domain.qmp() as qmp, DirtyLog(qmp) as log:
        await log.fetch()  # the first interval starts at log start; begin a clean one
        await asyncio.sleep(seconds)
        return await log.fetch()


def blocks_table(pages: DirtyPages) -> Table:
    """Dirty pages per RAM block (blocks under 1 MiB only when dirty), with a per-GiB histogram."""
    table = Table(title_justify="left")
    for column in ("RAM block", "MiB", "dirty pages", "dirty pages per GiB"):
        table.add_column(column)
    for block in pages.blocks.values():
        if block.length < MIB and not block.dirty:
            continue
        histogram = " ".join(str(c) for c in pages.histogram(block.id))
        table.add_row(block.id, str(block.length // MIB), str(block.dirty), histogram)
    return table


def summary(pages: DirtyPages) -> str:
    return (f"{pages.dirty} pages ({pages.dirty * pages.page_size / MIB:.1f} MiB) dirtied in "
            f"{pages.interval_ms} ms; fetching the list took {pages.fetch_seconds * 1000:.1f} ms")


def cmd_dirtylog(args: argparse.Namespace) -> int:
    watch.check(args)
    if args.watch is not None and args.seconds is not None:
        raise UsageError("--watch SECONDS sets the interval of each sample; drop --seconds")
    with common.open_domain(args) as dom:
        if args.watch is not None:
            return _watch(dom, args.watch, args)
        seconds = args.seconds or DEFAULT_INTERVAL_S
        with common.console.status(f"logging dirty pages for {seconds:g} s..."):
            pages = aio.run(dirty_pages_over(dom, seconds))

    def text() -> None:
        common.console.print(summary(pages))
        common.console.print(blocks_table(pages))

    common.print_result(args.json, pages.to_dict(), text)
    return 0


# -- dirtylog --watch -----------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One interval of ``dirtylog --watch``: its pages and the dirty counts of the intervals up to it."""

    domain: str
    number: int
    at: float
    pages: DirtyPages
    history: tuple[int, ...]

    @property
    def mib_per_s(self) -> float:
        return self.pages.dirty * self.pages.page_size / MIB / max(self.pages.interval_ms / 1000, 1e-3)

    def to_dict(self) -> dict[str, Any]:
        return self.pages.to_dict() | {"domain": self.domain, "sample": self.number, "time": self.at,
                                       "mib_per_s": round(self.mib_per_s, 3)}


def sparkline(values: tuple[int, ...]) -> str:
    """Values as bar characters scaled to the largest (all-zero: the lowest bar)."""
    top = max(values, default=0)
    if top <= 0:
        return SPARKS[0] * len(values)
    return "".join(SPARKS[max(1, round(v / top * (len(SPARKS) - 1)))] if v > 0 else SPARKS[0] for v in values)


def watch_view(sample: Sample) -> Group:
    """The live display: this interval, the dirty-page history, and the table of RAM blocks."""
    when = time.strftime("%H:%M:%S", time.localtime(sample.at))
    peak = max(sample.history, default=0)
    return Group(Text(f"Dirty pages of {sample.domain}, sample {sample.number} at {when}: "
                      f"{summary(sample.pages)}; {sample.mib_per_s:.1f} MiB/s"),
                 Text.assemble(f"last {len(sample.history)} intervals (peak {peak} pages): ",
                               (sparkline(sample.history), "cyan")),
                 blocks_table(sample.pages))


async def start_log(stack: contextlib.AsyncExitStack, domain: Domain) -> DirtyLog:
    """Open QMP and a dirty log on *stack* (closed by the caller) and begin a clean interval."""
    try:
        qmp = await stack.enter_async_context(domain.qmp())
        log = await stack.enter_async_context(DirtyLog(qmp))
        await log.fetch()
        return log
    except BaseException:
        await stack.aclose()
        raise


def _watch(dom: Domain, interval: float, args: argparse.Namespace) -> int:
    """One dirty log kept open across samples: each fetch returns the pages dirtied since the previous one."""
    stack = contextlib.AsyncExitStack()
    log = aio.run(start_log(stack, dom))
    try:
        history: deque[int] = deque(maxlen=HISTORY)
        numbers = itertools.count(1)

        def sample() -> Sample:
            pages = aio.run(log.fetch())
            history.append(pages.dirty)
            return Sample(dom.name, next(numbers), time.time(), pages, tuple(history))

        return watch.run(sample, interval=interval, count=args.count, as_json=args.json, to_dict=Sample.to_dict,
                         render=watch_view, first_after_interval=True)
    finally:
        aio.run(stack.aclose())
