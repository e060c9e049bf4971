"""Dirty-page commands: domdirtyrate (like virsh domdirtyrate-calc)."""

from __future__ import annotations

import argparse

from hvext import aio
from hvext.cli import common
from hvext.dirty import rate


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("domdirtyrate", help="measure the rate at which the guest dirties memory")
    common.add_domain(p)
    p.add_argument("--seconds", type=int, default=1, help="measuring time, 1 to 60 (default 1)")
    p.add_argument("--mode", choices=rate.MODES, default="page-sampling")
    p.add_argument("--sample-pages", type=int, default=512, help="pages sampled per GiB (page-sampling)")
    common.add_json(p)
    p.set_defaults(func=cmd_domdirtyrate)


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
