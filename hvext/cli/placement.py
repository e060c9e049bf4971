"""``hvext pmem-placement DOMAIN``: the hot ranges of a running guest's file-backed PMEM, what is resident in
host DRAM, the DRAM budget, and (``--apply``) keeping the hot ranges resident and the cold ones on their tier
(C15, second half; hvext.pmem.placement)."""

from __future__ import annotations

import argparse
from typing import Any

from hvext import aio
from hvext.cli import common
from hvext.errors import UnsupportedError, UsageError
from hvext.memory import swap
from hvext.memory.host import meminfo
from hvext.pmem import hints, placement
from hvext.pmem.placement_policy import Params
from hvext.units import format_size, parse_size

#: Without --budget: a quarter of the host's RAM may hold hot PMEM pages.
DEFAULT_BUDGET_FRACTION = 0.25


def _size(text: str) -> int:
    try:
        return parse_size(text, default_unit="M")
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("pmem-placement", help="hot PMEM ranges the guest declared, their residency in host "
                                                   "DRAM and the budget; --apply keeps them resident and "
                                                   "gives cold ranges back to their tier (root)")
    common.add_domain(p)
    p.add_argument("--budget", type=_size, metavar="SIZE",
                   help="DRAM this domain's hot ranges may hold, e.g. 512M (default: a quarter of host RAM)")
    p.add_argument("--apply", action="store_true",
                   help="MADV_WILLNEED the kept ranges and release the cold ones (process_madvise on QEMU)")
    p.add_argument("--cold", choices=sorted(placement.COLD_ADVICE), default="cold",
                   help="with --apply: how cold ranges are released: MADV_COLD (first to go under pressure, "
                        "the default) or MADV_PAGEOUT (now)")
    common.add_json(p)
    p.set_defaults(func=cmd_placement)


def check_support() -> None:
    """UnsupportedError when the host kernel's process_madvise refuses an advice placement uses."""
    missing = {name: why for name, why in placement.madvise_support().items() if why}
    if missing:
        raise UnsupportedError("this host kernel cannot do placement: " +
                               "; ".join(f"{name}: {why}" for name, why in missing.items()))


def _text(data: dict[str, Any]) -> None:
    common.console.print(f"{data['domain']}: DRAM budget {format_size(data['share_bytes'])}"
                         f"{', applied' if data['applied'] else ' (not applied: --apply)'}")
    rows = []
    for d in data["devices"]:
        now = d.get("after", d["before"])
        rows.append([common.literal(d["backing"]), format_size(d["size"]), format_size(d["hot_bytes"]),
                     format_size(d["keep_bytes"]), format_size(d["unplaced_bytes"]),
                     format_size(d["before"]["hot_resident_bytes"]), format_size(now["hot_resident_bytes"]),
                     format_size(d["before"]["cold_resident_bytes"]), format_size(now["cold_resident_bytes"]),
                     format_size(now["mapped_rss_bytes"])])
    common.print_table("placement per device (resident: host page cache)",
                       ["backing", "size", "hot", "kept", "over budget", "hot resident", "after",
                        "cold resident", "after", "QEMU Rss"], rows)
    for d in data["devices"]:
        advice = d.get("advice")
        if advice and (advice["willneed_error"] or advice["release_error"] or advice["refused_bytes"]):
            common.console.print(f"{common.literal(d['backing'])}: willneed {advice['willneed_error'] or 'ok'}, "
                                 f"{advice['cold_advice']} {advice['release_error'] or 'ok'}, "
                                 f"refused {format_size(advice['refused_bytes'])}")
    for backing, why in data["skipped"].items():
        common.console.print(f"skipped {common.literal(backing)}: {common.literal(why)}")
    for reason in data["rejected_hints"][:10]:
        common.console.print(f"rejected hint: {common.literal(reason)}")


def cmd_placement(args: argparse.Namespace) -> int:
    if args.cold != "cold" and not args.apply:
        raise UsageError("--cold goes with --apply")
    budget = args.budget if args.budget is not None else int(meminfo("MemTotal") * DEFAULT_BUDGET_FRACTION)
    if args.apply:
        check_support()
    with common.open_domain(args) as dom:
        dom.require_running()
        pid = swap.qemu_pid(dom.name)
        validated = aio.run(hints.fetch(dom))
        found = placement.devices_of(pid, validated, placement.others_backings(dom.host, dom.name))
        report, _ = placement.place(dom.name, pid, found, budget, None, Params(), cold=args.cold, act=args.apply)
    report["rejected_hints"] = validated.rejected
    common.print_result(args.json, report, lambda: _text(report))
    return 0
