"""Memory commands: dommemstat."""

from __future__ import annotations

import argparse

from hvext import aio
from hvext.cli import common
from hvext.memory import stats
from hvext.units import format_size


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("dommemstat", help="balloon statistics (QMP) and guest meminfo (agent) side by side")
    common.add_domain(p)
    common.add_json(p)
    p.set_defaults(func=cmd_dommemstat)


def _fmt(value: int | None, unit: str) -> str:
    if value is None:
        return "-"
    return format_size(value) if unit == "bytes" else str(value)


def cmd_dommemstat(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        dom.require_running()
        result = aio.run(stats.collect(dom))
    if args.json:
        common.print_json(result.to_dict())
        return 0
    common.print_table(f"Memory of {dom.name}", ["", "QMP balloon", "guest agent"],
                       [[r["name"], _fmt(r["qmp"], r["unit"]), _fmt(r["agent"], r["unit"])] for r in result.rows()])
    if result.qmp_error:
        common.console.print(f"QMP: {result.qmp_error}")
    if result.agent_error:
        common.console.print(f"agent: {result.agent_error}")
    return 0
