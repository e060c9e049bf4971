"""Memory commands: dommemstat, setmem (balloon), memclass (guest usage classes)."""

from __future__ import annotations

import argparse
import time

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hvext import aio
from hvext.cli import common, watch
from hvext.errors import UsageError
from hvext.host import Domain
from hvext.memory import balloon, classes, stats
from hvext.units import MIB, format_size, parse_size


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("dommemstat", help="balloon actual and target, balloon statistics (QMP) and "
                                               "guest meminfo (agent) side by side")
    common.add_domain(p)
    common.add_json(p)
    p.set_defaults(func=cmd_dommemstat)

    p = commands.add_parser("setmem", help="set the balloon target (like virsh setmem); --wait follows it")
    common.add_domain(p)
    p.add_argument("size", metavar="SIZE", help="new target, e.g. 512M, 2G, 1.5GiB (at least 64 MiB, at most "
                                                "the domain's memory)")
    p.add_argument("--wait", type=common.seconds, nargs="?", const=balloon.DEFAULT_TIMEOUT_S,
                   metavar="SECONDS", help="follow the balloon until it reaches the target or the guest stops "
                                           f"(at most SECONDS, default {balloon.DEFAULT_TIMEOUT_S:.0f})")
    p.add_argument("--stall", type=common.seconds, default=balloon.DEFAULT_STALL_S, metavar="SECONDS",
                   help="with --wait: the guest has stopped when the balloon did not move closer for this long "
                        f"(default {balloon.DEFAULT_STALL_S:.0f})")
    p.add_argument("--force", action="store_true",
                   help="shrink below what the guest can spare without running out of memory")
    common.add_json(p)
    p.set_defaults(func=cmd_setmem)

    p = commands.add_parser("memclass", help="guest memory usage classes (free, page cache, anon, slab, ...) "
                                             "from the agent, checked")
    common.add_domain(p)
    watch.add_arguments(p, default=2.0, source="from the agent's periodic sampler")
    common.add_json(p)
    p.set_defaults(func=cmd_memclass)


def _fmt(value: int | None, unit: str) -> str:
    if value is None:
        return "-"
    return format_size(value) if unit == "bytes" else str(value)


def cmd_dommemstat(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        dom.require_running()
        result = aio.run(stats.collect(dom))

    def text() -> None:
        common.print_table(f"Memory of {dom.name}", ["", "QMP balloon", "guest agent"],
                           [[r["name"], _fmt(r["qmp"], r["unit"]), _fmt(r["agent"], r["unit"])]
                            for r in result.rows()])
        if result.qmp_error:
            common.console.print(f"QMP: {common.literal(result.qmp_error)}")
        if result.agent_error:
            common.console.print(f"agent: {common.literal(result.agent_error)}")

    common.print_result(args.json, result.to_dict(), text)
    return 0


# -- setmem ---------------------------------------------------------------


def cmd_setmem(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    with common.open_domain(args) as dom:
        if args.wait is not None and not dom.is_active():
            raise UsageError(f"--wait: domain {dom.name!r} is not running, there is no balloon to follow "
                             "(without --wait, setmem changes the memory it starts with)")
        done = balloon.set_target(dom, size, force=args.force)
        if args.wait is None or not done.live:
            common.print_result(args.json, done.to_dict(), lambda: (
                f"Balloon target of '{dom.name}' set to {format_size(done.target)} "
                f"(actual {format_size(done.previous_actual or 0)}); --wait follows it" if done.live else
                f"Domain '{dom.name}' is not running: it will start with "
                f"{format_size(done.target)} (currentMemory of its definition)"))
            return 0
        result = _follow(dom, done, args)
    # JSON also when the balloon stalled (then the error follows); the text only when it got there
    common.print_result(args.json, result.to_dict(), lambda: (
        f"Balloon of '{dom.name}' reached {format_size(result.actual)} in "
        f"{result.elapsed_s:.1f} s (from {format_size(result.start)})" if result.reached else None))
    if not result.reached:
        raise balloon.BalloonStalled(result)
    return 0


def _follow(dom: Domain, done: balloon.SetResult, args: argparse.Namespace) -> balloon.BalloonResult:
    """Follow the balloon, with a progress bar on a terminal."""
    start = done.previous_actual if done.previous_actual is not None else done.target
    span = max(abs(start - done.target), 1)
    show = common.console.is_terminal and not args.json
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[actual]}"),
                  TimeElapsedColumn(), console=common.console, transient=True, disable=not show) as bar:
        task = bar.add_task(f"balloon of {dom.name} -> {format_size(done.target)}", total=span,
                            actual=format_size(start))

        def progress(actual: int) -> None:
            moved = min(span, max(0, (start - actual) if done.target < start else (actual - start)))
            bar.update(task, completed=moved, actual=format_size(actual))

        return aio.run(balloon.follow(dom, done.target, timeout=args.wait, stall_after=args.stall,
                                      progress=progress, start=start))


# -- memclass -------------------------------------------------------------


def classes_table(report: classes.MemClasses) -> Table:
    when = time.strftime("%H:%M:%S", time.localtime(report.sampled_at)) if report.sampled_at else "?"
    table = Table(title=f"Memory classes of {report.domain}", title_justify="left")
    for column, justify in (("class", "left"), ("pages", "right"), ("MiB", "right"), ("% of total", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in report.rows():
        table.add_row(row["label"], str(row["pages"]), f"{row['bytes'] / MIB:.1f}", f"{row['percent']:.1f}")
    table.add_section()
    table.add_row("total", str(report.total), f"{report.mib(report.total):.1f}", "100.0")
    pmem = [(classes.PMEM_FIELDS[k], v) for k, v in report.pmem.items() if v]
    for label, pages in pmem:
        table.add_row(f"PMEM: {label} (outside MemTotal)", str(pages), f"{report.mib(pages):.1f}", "")
    status = {"ok": "[green]ok[/]", "incomplete": "[yellow]incomplete[/]",
              "implausible": "[red]implausible[/]"}[report.status]
    notes = [f"sampled {when}", f"status {status} (|unaccounted| <= {classes.TOLERANCE * 100:.0f}% of MemTotal)"]
    notes.append(f"anon active/inactive split: {report.anon_split or '?'}"
                 + (f" (kpageflags {report.kpageflags})" if report.kpageflags else ""))
    if report.ballooned:
        notes.append(f"{format_size(report.ballooned * report.page_size)} in the balloon")
    table.caption = "; ".join(notes) + "".join(f"\n! {common.literal(p)}" for p in report.problems)
    table.caption_justify = "left"
    return table


def cmd_memclass(args: argparse.Namespace) -> int:
    watch.check(args)
    with common.open_domain(args) as dom:
        dom.require_running()
        if args.watch is None:
            report = aio.run(classes.fetch(dom))
            common.print_result(args.json, report.to_dict(), lambda: classes_table(report))
            return 0
        return _watch(dom, args)


def _watch(dom: Domain, args: argparse.Namespace) -> int:
    """Poll the agent's periodic sampler every --watch seconds (JSON: one object per line)."""
    interval: float = args.watch
    return watch.run(lambda: aio.run(classes.fetch(dom, interval=interval, cached=True, max_age=interval * 1.5)),
                     interval=interval, count=args.count, as_json=args.json,
                     to_dict=classes.MemClasses.to_dict, render=classes_table)
