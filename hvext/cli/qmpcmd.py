"""``hvext qmp DOMAIN COMMAND [JSON]``: run one QMP command (like virsh qemu-monitor-command)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from hvext import aio
from hvext.cli import common
from hvext.errors import UsageError
from hvext.host import Domain


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("qmp", help="run a QMP command on the domain's QEMU and print the result as JSON")
    common.add_domain(p)
    p.add_argument("qmp_command", metavar="COMMAND", help="e.g. query-status")
    p.add_argument("arguments", metavar="JSON", nargs="?", help="arguments as a JSON object")
    p.set_defaults(func=cmd_qmp)


async def execute(domain: Domain, command: str, arguments: dict[str, Any] | None) -> Any:
    async with domain.qmp() as session:
        return await session.execute(command, arguments)


def cmd_qmp(args: argparse.Namespace) -> int:
    arguments = None
    if args.arguments:
        try:
            arguments = json.loads(args.arguments)
        except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than Python's stack
            raise UsageError(f"arguments are not valid JSON: {err}") from err
        if not isinstance(arguments, dict):
            raise UsageError("arguments must be a JSON object, e.g. '{\"calc-time\": 1}'")
    with common.open_domain(args) as dom:
        common.print_json(aio.run(execute(dom, args.qmp_command, arguments)))
    return 0
