"""``hvext reclaim DOMAIN SIZE [--method auto|balloon|swap]``: one-off reclaim, with the decision explained."""

from __future__ import annotations

import argparse

from hvext import aio
from hvext.cli import common
from hvext.memory import reclaim
from hvext.memory.policy import METHODS
from hvext.units import format_size, parse_size


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("reclaim", help="take memory from a VM by ballooning, host swapping, or both")
    common.add_domain(p)
    p.add_argument("size", metavar="SIZE", help="how much to take, e.g. 256M")
    p.add_argument("--method", choices=METHODS, default="auto", help="auto (the policy decides), balloon or swap")
    common.add_json(p)
    p.set_defaults(func=cmd_reclaim)


def cmd_reclaim(args: argparse.Namespace) -> int:
    amount = parse_size(args.size)
    with common.open_domain(args) as dom:
        with common.console.status(f"reclaiming {format_size(amount)} from {dom.name}..."):
            report = aio.run(reclaim.reclaim(dom, amount, args.method))

    def text() -> None:
        common.print_fields({
            "Domain": report.domain, "Method": report.method, "Why": report.decision["reason"],
            "Balloon": f"{format_size(report.balloon_actual_before)} -> {format_size(report.balloon_actual_after)}",
            "QEMU RSS": f"{format_size(report.rss_before)} -> {format_size(report.rss_after)} "
                        f"({format_size(report.returned)} returned)",
            "Host available": f"{format_size(report.host_available_before)} -> "
                              f"{format_size(report.host_available_after)}",
            "Time": f"{report.seconds:.1f} s",
        })
        for note in report.notes:
            common.console.print(f"note: {common.literal(note)}")

    common.print_result(args.json, report.to_dict(), text)
    return 0
