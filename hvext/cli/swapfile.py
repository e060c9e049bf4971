"""``hvext swapfile DOMAIN`` and ``hvext swap-reservation``: per-VM swap files and the host's reservation (C6)."""

from __future__ import annotations

import argparse
from typing import Any

from hvext.cli import common
from hvext.errors import HostError, UsageError
from hvext.memory import swap, swapfile
from hvext.units import format_size, parse_size

ACTIONS = ("show", "create", "rebalance", "remove")


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("swapfile", help="show a running domain's swap file (guest RAM on disk): sizes, "
                                             "extents, the host's reservation; --defrag defragments it")
    common.add_domain(p)
    p.add_argument("--defrag", action="store_true",
                   help="defragment the file online (e4defrag, ext4 only) and show its extents before and after")
    common.add_json(p)
    p.set_defaults(func=cmd_swapfile)

    p = commands.add_parser("swap-reservation", help="the host's thick swap reservation file, which gives back "
                                                     "blocks as the VMs' swap files grow (show, create SIZE, "
                                                     "rebalance, remove)")
    p.add_argument("action", nargs="?", choices=ACTIONS, default="show", help="what to do (default show)")
    p.add_argument("size", nargs="?", metavar="SIZE",
                   help="with create: the reservation's size, e.g. 4G (bare numbers are MiB)")
    common.add_json(p)
    p.set_defaults(func=cmd_reservation)


def _size_row(label: str, found: dict[str, Any]) -> list[str]:
    return [label, format_size(found["apparent_bytes"]), format_size(found["allocated_bytes"]),
            str(found["extents"]), str(found["fragments"])]


_COLUMNS = ["file", "apparent", "allocated", "extents", "fragments"]


def _balance_fields(balance: dict[str, Any]) -> dict[str, str]:
    fields = {
        "Reservation total": format_size(balance["total_bytes"]),
        "Reservation holds": format_size(balance["reservation_bytes"]),
        "VM files hold": format_size(balance["vm_sum_bytes"]),
        "Balance": "conserved" if balance["drift_bytes"] == 0 else
                   f"{'+' if balance['drift_bytes'] > 0 else '-'}{format_size(abs(balance['drift_bytes']))} "
                   "(`hvext swap-reservation rebalance` moves it back)",
    }
    if balance["shortfall_bytes"]:
        fields["Shortfall"] = f"{format_size(balance['shortfall_bytes'])} beyond the reservation"
    return fields


def cmd_swapfile(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        domain = host.lookup(args.domain)
        path = swapfile.domain_file(domain)
        data: dict[str, Any] = {"domain": domain.name, "fstype": swapfile.filesystem_type(path)}
        if args.defrag:
            with common.console.status(f"defragmenting {path}..."):
                done = swapfile.defragment(path)
            data.update(done.to_dict(), file=done.after.to_dict())
        else:
            data["file"] = swapfile.info(path).to_dict()
        found = swapfile.mapping_residency(swap.qemu_pid(domain.name), path)
        files = swapfile.domain_files(host)
    data["resident_bytes"], data["dirty_bytes"] = found["rss"], found["dirty"]
    data["reservation"] = None
    if swapfile.reservation_path().exists():
        data["reservation"] = swapfile.status(files).balance.to_dict()

    def text() -> None:
        rows = [_size_row(f"before {data['before']['path']}", data["before"]),
                _size_row("after", data["after"])] if args.defrag else [_size_row(data["file"]["path"], data["file"])]
        common.print_table(f"Swap file of {args.domain} ({data['fstype']})", _COLUMNS, rows)
        fields = {"Resident in host RAM": f"{format_size(data['resident_bytes'])} "
                                          f"({format_size(data['dirty_bytes'])} not written back yet)"}
        common.print_fields(fields)
        if data["reservation"] is None:
            common.console.print("no swap reservation on this host (`hvext swap-reservation create SIZE`)")
        else:
            common.print_fields(_balance_fields(data["reservation"]))

    common.print_result(args.json, data, text)
    return 0


def _print_report(data: dict[str, Any]) -> None:
    rows = [_size_row(data["reservation"]["path"], data["reservation"])]
    rows += [_size_row(f"{name}: {found['path']}", found) for name, found in data["vms"].items()]
    common.print_table("Swap reservation", _COLUMNS, rows)
    fields = _balance_fields(data["balance"])
    if data.get("move"):
        fields["Moved"] = f"punched {format_size(data['move']['punched_bytes'])}, " \
                          f"refilled {format_size(data['move']['refilled_bytes'])}"
    common.print_fields(fields)
    for note in data["notes"]:
        common.console.print(f"note: {common.literal(note)}")


def cmd_reservation(args: argparse.Namespace) -> int:
    if (args.size is not None) != (args.action == "create"):
        raise UsageError("SIZE goes with `create`, and only with it: hvext swap-reservation create 4G")
    if args.action == "create":
        size = parse_size(args.size, default_unit="M")
        made = swapfile.create_reservation(size)
        common.print_result(args.json, made.to_dict(), lambda: f"Swap reservation {common.literal(made.path)} "
                                                               f"created: {format_size(made.allocated)} allocated")
        return 0
    if args.action == "remove":
        swapfile.remove_reservation()
        common.print_result(args.json, {"removed": str(swapfile.reservation_path())},
                            lambda: "Swap reservation removed")
        return 0
    if not swapfile.reservation_path().exists():
        raise HostError(f"no swap reservation on this host ({swapfile.reservation_path()}): "
                        "`hvext swap-reservation create SIZE` makes one")
    with common.open_host(args) as host:
        files = swapfile.domain_files(host)
    report = swapfile.rebalance(files) if args.action == "rebalance" else swapfile.status(files)
    data = report.to_dict()
    common.print_result(args.json, data, lambda: _print_report(data))
    return 0
