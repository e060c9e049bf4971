"""Dirty-page commands: domdirtyrate (like virsh domdirtyrate-calc) and dirtylog (page lists)."""

from __future__ import annotations

import argparse
import asyncio

from hvext import aio
from hvext.cli import common
from hvext.dirty import rate
from hvext.dirty.pages import DirtyLog, DirtyPages
from hvext.host import Domain


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("domdirtyrate", help="measure the rate at which the guest dirties memory")
    common.add_domain(p)
    p.add_argument("--seconds", type=int, default=1, help="measuring time, 1 to 60 (default 1)")
    p.add_argument("--mode", choices=rate.MODES, default="page-sampling")
    p.add_argument("--sample-pages", type=int, default=512, help="pages sampled per GiB (page-sampling)")
    common.add_json(p)
    p.set_defaults(func=cmd_domdirtyrate)

    p = commands.add_parser("dirtylog", help="pages the guest dirtied over an interval (needs the patched QEMU)")
    common.add_domain(p)
    p.add_argument("--seconds", type=common.seconds, default=1.0, help="interval (default 1)")
    common.add_json(p)
    p.set_defaults(func=cmd_dirtylog)


def cmd_domdirtyrate(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        with common.console.status(f"measuring for {args.seconds} s ({args.mode})..."):
            result = aio.run(rate.measure(dom, args.seconds, args.mode, args.sample_pages))
    if args.json:
        common.print_json(result.to_dict())
    else:
        common.print_fields({"Domain": dom.name, "Mode": result.mode, "Calc time": f"{result.seconds:.0f} s",
                             "Dirty rate": f"{result.rate_mib_s} MiB/s"})
    return 0


async def dirty_pages_over(domain: Domain, seconds: float) -> DirtyPages:
    """Start a dirty log, let *seconds* pass, and return the pages dirtied in between."""
    async with domain.qmp() as qmp, DirtyLog(qmp) as log:
        await log.fetch()  # the first interval starts at log start; begin a clean one
        await asyncio.sleep(seconds)
        return await log.fetch()


def cmd_dirtylog(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        with common.console.status(f"logging dirty pages for {args.seconds:g} s..."):
            pages = aio.run(dirty_pages_over(dom, args.seconds))
    if args.json:
        common.print_json(pages.to_dict())
        return 0
    common.console.print(f"{pages.dirty} pages ({pages.dirty * pages.page_size / 2**20:.1f} MiB) dirtied in "
                         f"{pages.interval_ms} ms; fetching the list took {pages.fetch_seconds * 1000:.1f} ms")
    rows = []
    for block in pages.blocks.values():
        if block.length < 2**20 and not block.dirty:
            continue
        histogram = " ".join(str(c) for c in pages.histogram(block.id))
        rows.append([block.id, block.length // 2**20, block.dirty, histogram])
    common.print_table(None, ["RAM block", "MiB", "dirty pages", "dirty pages per GiB"], rows)
    return 0
