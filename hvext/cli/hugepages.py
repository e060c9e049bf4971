"""``hvext hugepages DOMAIN``: large-page candidates of a running guest, their decaying access scores,
what is mapped large, and (``--apply --budget N``) mapping the hottest large (C5)."""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from hvext import aio
from hvext.cli import common, dirty, watch
from hvext.errors import UsageError
from hvext.memory import balloon, hugepages, swap
from hvext.memory.hugepage_policy import DEFAULT_HALF_LIFE, DEFAULT_MIN_SCORE, Params, Scores, choose
from hvext.units import format_size

DEFAULT_SECONDS = 1.0
DEFAULT_INTERVALS = 3
DEFAULT_TOP = 20
SOURCE = "dirty-log"  # pages written per interval (DAMON is not usable here: hugepages.damon_status)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("hugepages", help="rank the 2 MiB regions of a running guest's RAM by a decaying "
                                              "access score and show which are mapped large; --apply maps "
                                              "the hottest large (needs the patched QEMU, root)")
    common.add_domain(p)
    p.add_argument("--seconds", type=common.seconds, metavar="SECONDS",
                   help=f"length of one counting interval (default {DEFAULT_SECONDS:g})")
    p.add_argument("--intervals", type=common.count(1, 3600), default=DEFAULT_INTERVALS, metavar="N",
                   help=f"intervals counted before the result (default {DEFAULT_INTERVALS}; not with --watch)")
    watch.add_arguments(p, default=DEFAULT_SECONDS, source="with the scores after each interval")
    p.add_argument("--top", type=common.count(1, 1 << 20), default=DEFAULT_TOP, metavar="N",
                   help=f"candidates shown (default {DEFAULT_TOP})")
    p.add_argument("--half-life", type=common.seconds, default=DEFAULT_HALF_LIFE, metavar="INTERVALS",
                   help=f"a score halves every INTERVALS without writes (default {DEFAULT_HALF_LIFE:g})")
    p.add_argument("--apply", action="store_true",
                   help="after counting (with --watch: after each interval), MADV_COLLAPSE the hottest "
                        "candidates not mapped large yet")
    p.add_argument("--budget", type=common.count(0, 1 << 20), metavar="N",
                   help="with --apply: at most N regions are collapsed in this run (all intervals together)")
    common.add_json(p)
    p.set_defaults(func=cmd_hugepages)


def _table(data: dict[str, Any]) -> Table:
    table = Table(title=f"Large-page candidates of {data['domain']} after {data['interval']} interval(s)",
                  title_justify="left")
    for column in ("region", "guest offset", "score", "written (last)", "large"):
        table.add_column(column)
    for c in data["candidates"]:
        table.add_row(str(c["region"]), f"{c['offset']:#x}", f"{c['score']:.1f}", str(c["written"]),
                      "yes" if c["large"] else "")
    return table


def _summary(data: dict[str, Any]) -> str:
    return (f"{data['large_regions']}/{data['regions']} regions mapped large "
            f"(AnonHugePages {format_size(data['anon_huge_bytes'])}); {data['written_pages']} pages written "
            f"in the last interval; counted from {data['source']} (writes only)")


def _applied(applied: dict[str, Any]) -> str:
    failed = [f"{r['region']} ({r['error']})" for r in applied["results"] if r["error"]]
    return (f"collapsed {len(applied['collapsed'])} of {len(applied['collapse'])} chosen "
            f"(budget left {applied['budget']}, {len(applied['collapsed_in_run'])} made large in this run); "
            f"failed: {', '.join(failed) or 'none'}")


def _view(data: dict[str, Any]) -> Group:
    lines = [Text(_summary(data))]
    if data["applied"] is not None:
        lines.append(Text(_applied(data["applied"])))
    return Group(*lines, _table(data))


def cmd_hugepages(args: argparse.Namespace) -> int:
    watch.check(args)
    if args.watch is not None and args.seconds is not None:
        raise UsageError("--watch SECONDS sets the interval; drop --seconds")
    if args.budget is not None and not args.apply:
        raise UsageError("--budget needs --apply")
    if args.apply and args.budget is None:
        raise UsageError("--apply needs --budget N (the most regions to collapse)")
    params = Params(half_life=args.half_life, min_score=DEFAULT_MIN_SCORE)
    with common.open_domain(args) as dom:
        dom.require_running()
        ram = hugepages.GuestRAM(dom.name, swap.qemu_pid(dom.name), balloon.boot_memory(dom))
        scores = Scores(params)
        stack = contextlib.AsyncExitStack()
        log = aio.run(dirty.start_log(stack, dom))
        try:
            collapsed: set[int] = set()  # regions this run made large: they count against the budget

            def step() -> hugepages.Snapshot:
                counts = hugepages.region_counts(aio.run(log.fetch()), ram.ram_bytes)
                scores.update(counts)
                snap = ram.snapshot(scores, counts, SOURCE)
                if args.apply and args.watch is not None:
                    apply(snap)
                return snap

            def apply(snap: hugepages.Snapshot) -> None:
                snap.applied = ram.collapse(choose(scores, snap.large, args.budget - len(collapsed)))
                collapsed.update(snap.applied["collapsed"])
                snap.applied["collapsed_in_run"] = sorted(collapsed)
                snap.large = ram.large()
                snap.anon_huge_bytes = hugepages.anon_huge_bytes(ram.pid, ram.start)

            if args.watch is not None:
                return watch.run(step, interval=args.watch, count=args.count, as_json=args.json,
                                 to_dict=lambda s: s.to_dict(args.top),
                                 render=lambda s: _view(s.to_dict(args.top)), first_after_interval=True)
            seconds = args.seconds or DEFAULT_SECONDS
            last = None
            with common.console.status(f"counting writes for {args.intervals} x {seconds:g} s..."):
                for _ in range(args.intervals):
                    time.sleep(seconds)
                    last = step()
            assert last is not None
            if args.apply:
                with common.console.status("collapsing..."):
                    apply(last)
        finally:
            aio.run(stack.aclose())
    data = last.to_dict(args.top)

    def text() -> None:
        common.console.print(_view(data))

    common.print_result(args.json, data, text)
    return 0
