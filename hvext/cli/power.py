"""``hvext power ...``: volatile PMEM with a nonvolatile store, saved on power loss (C12).

``power protect DOMAIN BACKING [--store DIR]``, ``power unprotect``, ``power list``,
``power loss`` (what SIGPWR to hvextd does) and ``power restore``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hvext.cli import common
from hvext.pmem import hints, power
from hvext.units import format_size


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("power", help="PMEM in volatile memory, saved on power loss (protect, loss, "
                                              "restore, list, unprotect)")
    sub = group.add_subparsers(dest="power_command", metavar="ACTION", parser_class=type(group))
    sub.required = True

    p = sub.add_parser("protect", help="save a pmem device to a store on disk at every power loss")
    common.add_domain(p)
    p.add_argument("backing", type=Path, metavar="BACKING", help="backing file of the device (see pmem-list)")
    p.add_argument("--store", type=Path, help="store directory on disk (default: under hvext's state dir)")
    common.add_json(p)
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("unprotect", help="stop protecting a device")
    common.add_domain(p)
    p.add_argument("backing", type=Path, metavar="BACKING")
    p.add_argument("--remove-store", action="store_true",
                   help="delete its store too (only the files hvext wrote there)")
    p.set_defaults(func=cmd_unprotect)

    p = sub.add_parser("list", help="protected devices, their stores and last saves")
    common.add_json(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("loss", help="power is failing: pause guests, save changed blocks durably")
    _add_domain_filter(p, "save")
    p.add_argument("--budget", type=_budget, default=power.PREPAUSE_BUDGET_S, metavar="SECONDS",
                   help="longest time guests may delay their pause (hints, epoch freeze, flush wait), for "
                        f"all of them together (default {power.PREPAUSE_BUDGET_S:g})")
    common.add_json(p)
    p.set_defaults(func=cmd_loss)

    p = sub.add_parser("restore", help="power is back: restore backing files, resume or start guests")
    _add_domain_filter(p, "restore")
    common.add_json(p)
    p.set_defaults(func=cmd_restore)


def _add_domain_filter(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument("--domain", action="append", metavar="NAME", dest="domains",
                        help=f"only {verb} this domain's devices (repeatable; default: every protected domain)")


def _budget(text: str) -> float:
    try:
        return power.check_budget(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    except power.PowerUsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _print_missing(report: dict[str, Any]) -> None:
    for m in report["missing"]:
        common.console.print(f"{m['domain']} {m['backing']}: domain no longer exists (store kept in "
                             f"{m['store']}; `hvext power unprotect {m['domain']} {m['backing']}` drops it)",
                             markup=False, highlight=False)


def cmd_protect(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        result = power.protect(dom, args.backing, args.store)

    def text() -> None:
        save = result["save"]
        common.console.print(f"{args.backing} of '{dom.name}' protected; store {result['registration']['store']} "
                             f"(first save: {format_size(save['bytes_written'])} in {save['seconds']:.2f} s)")

    common.print_result(args.json, result, text)
    return 0


def cmd_unprotect(args: argparse.Namespace) -> int:
    reg = power.unprotect(args.domain, args.backing, remove_store=args.remove_store)
    assert reg is not None
    common.console.print(f"{args.backing} of '{args.domain}' no longer protected"
                         + ("; store removed" if args.remove_store else f"; store kept in {reg.store}"))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        rows = power.status(host)

    def text() -> None:
        if not rows:
            common.console.print("no protected pmem devices (`hvext pmem-attach --volatile-backing` or "
                                 "`hvext power protect`)")
        for r in rows:
            stats = r["store_stats"]
            common.console.print(f"{r['domain']} ({r['state']}) {r['model']} {format_size(r['size'])} "
                                 f"{r['backing']}{'' if r['backing_exists'] else ' (missing)'}\n"
                                 f"  store {r['store']}: generation {stats.get('generation', '?')}, "
                                 f"{format_size(stats.get('bytes_on_disk', 0))} on disk; dirty log "
                                 f"{'yes' if r['dirty_log'] else 'no'}; pending {r['pending'] or '-'}")

    common.print_result(args.json, rows, text)
    return 0


def cmd_loss(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        report = power.power_loss(host, hints=hints.PROVIDER, domains=args.domains, budget=args.budget)

    def text() -> None:
        for d in report["devices"]:
            if "error" in d:
                common.console.print(f"{d['domain']} {d['backing']}: error: {common.literal(d['error'])}")
            elif "skipped" in d:
                common.console.print(f"{d['domain']} {d['backing']}: skipped ({d['skipped']})")
            else:
                common.console.print(f"{d['domain']} {d['backing']}: {d['blocks_written']} blocks, "
                                     f"{format_size(d['bytes_written'])} written in {d['seconds']:.3f} s "
                                     f"({d['mode']}, {d['blocks_checked']}/{d['blocks_total']} blocks read; "
                                     f"generation {d['generation']})")
        _print_missing(report)
        common.console.print(f"total {format_size(report['bytes_written'])} in {report['seconds']:.2f} s")

    common.print_result(args.json, report, text)
    return 0 if report["ok"] else 1


def cmd_restore(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        report = power.power_restore(host, hints=hints.PROVIDER, domains=args.domains)

    def text() -> None:
        for dom in report["domains"]:
            for dev in dom.get("devices", []):
                common.console.print(f"{dom['domain']}: {dev['backing']}: {dev['action']}")
            common.console.print(f"{dom['domain']}: {dom.get('action', '-')}"
                                 + (f" (error: {common.literal(dom['error'])})" if "error" in dom else ""))
        _print_missing(report)

    common.print_result(args.json, report, text)
    return 0 if report["ok"] else 1
