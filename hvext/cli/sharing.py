"""``hvext sharing DOMAIN [DOMAIN...] [--apply [--wait SECONDS]]``: what KSM would free, and letting it (C4)."""

from __future__ import annotations

import argparse

from hvext.cli import common
from hvext.errors import UsageError
from hvext.memory import sharing
from hvext.memory.sharing_policy import DEFAULT_TLB_VALUE_PAGES, PAGE_SIZE, REGION_PAGES
from hvext.units import format_size


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("sharing", help="estimate the memory KSM would free in running guests (pages shared "
                                            "within and across them, zero pages, large pages to break); "
                                            "--apply turns KSM on")
    p.add_argument("domains", nargs="+", metavar="DOMAIN", help="running domains, scanned together")
    p.add_argument("--tlb-value", type=common.count(0, REGION_PAGES), default=DEFAULT_TLB_VALUE_PAGES,
                   metavar="PAGES", help="break a large page only when sharing frees more than this many of its "
                                         f"4 KiB pages (default {DEFAULT_TLB_VALUE_PAGES})")
    p.add_argument("--apply", action="store_true",
                   help="turn KSM on (/sys/kernel/mm/ksm/run=1, left on; the previous value is reported)")
    p.add_argument("--wait", type=common.seconds, metavar="SECONDS",
                   help="with --apply: wait for KSM to settle and report what it freed (ksm_saved_bytes)")
    common.add_json(p)
    p.set_defaults(func=cmd_sharing)


def cmd_sharing(args: argparse.Namespace) -> int:
    if args.wait is not None and not args.apply:
        raise UsageError("--wait needs --apply")
    if len(set(args.domains)) != len(args.domains):
        raise UsageError("a domain is named twice")
    with common.open_host(args) as host:
        domains = [host.lookup(name) for name in args.domains]
        with common.console.status("scanning guest RAM..."):
            report = sharing.scan(domains, tlb_value_pages=args.tlb_value)
        if args.apply:
            with common.console.status("KSM merging..." if args.wait else "turning KSM on..."):
                report.applied = sharing.apply(report, wait=args.wait)
    data = report.to_dict()

    def text() -> None:
        rows = [[v["vm"], format_size(v["resident_pages"] * PAGE_SIZE), format_size(v["zero_pages"] * PAGE_SIZE),
                 format_size(v["shareable_within"] * PAGE_SIZE), format_size(v["shareable_with_others"] * PAGE_SIZE),
                 f"{v['large_regions']}/{v['regions']}"] for v in data["vms"]]
        common.print_table("Page sharing", ["domain", "resident", "zero", "shareable within",
                                            "shareable with others", "large regions"], rows)
        fields = {
            "KSM would free": format_size(data["estimated_savings_bytes"]) + " (KSM splits large pages it merges in)",
            "Without breaking large pages": format_size(data["estimated_savings_without_breaking_bytes"]),
            "Policy": f"{format_size(data['estimated_savings_policy_bytes'])}, breaking "
                      f"{len(data['large_pages_to_break'])} large pages, keeping {data['large_pages_kept']} "
                      f"(TLB value {data['tlb_value_pages']} pages)",
        }
        if report.applied is not None:
            fields["KSM run"] = f"{data['ksm_run_previous']} -> 1 (restore: echo {data['ksm_run_previous']} > " \
                                f"{sharing.KSM_DIR}/run)"
            if "ksm_saved_bytes" in data:
                fields["KSM freed"] = f"{format_size(data['ksm_saved_bytes'])}" + \
                    ("" if data["ksm_settled"] else " (not settled yet)")
        common.print_fields(fields)
        for note in data["notes"]:
            common.console.print(f"note: {common.literal(note)}")

    common.print_result(args.json, data, text)
    return 0
