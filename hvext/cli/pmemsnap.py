"""PMEM snapshot commands on an NVM region (C14): pmem-snapshot, pmem-snapshots, pmem-restore,
pmem-snapshot-delete, pmem-purge."""

from __future__ import annotations

import argparse
from pathlib import Path

from hvext.cli import common
from hvext.pmem import guestsnap
from hvext.pmem.region import STRATEGIES
from hvext.units import format_size, parse_size


def _device(p: argparse.ArgumentParser) -> None:
    common.add_domain(p)
    p.add_argument("device", metavar="DEVICE", help="backing path or alias of the pmem device (see pmem-list)")


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("pmem-snapshot", help="snapshot a guest pmem device into its NVM region")
    _device(p)
    p.add_argument("name", metavar="NAME", help="snapshot name")
    p.add_argument("--strategy", choices=STRATEGIES, default="virtblocks", help="purge strategy (first use)")
    p.add_argument("--block-size", default="64K", help="region block size (first use; default 64K)")
    p.add_argument("--nvm-dir", type=Path, help="NVM tier directory (first use; e.g. on /dev/shm or a pmem mount)")
    p.add_argument("--mass-dir", type=Path, help="mass-storage tier directory (first use)")
    common.add_json(p)
    p.set_defaults(func=cmd_snapshot)

    p = commands.add_parser("pmem-snapshots", help="snapshots of a pmem device and its region's tiers")
    _device(p)
    common.add_json(p)
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("pmem-restore", help="write a snapshot back into a pmem device (guest paused or off)")
    _device(p)
    p.add_argument("name", metavar="NAME")
    common.add_json(p)
    p.set_defaults(func=cmd_restore)

    p = commands.add_parser("pmem-snapshot-delete", help="delete a pmem snapshot")
    _device(p)
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_delete)

    p = commands.add_parser("pmem-purge", help="move blocks only snapshots hold from NVM to mass storage")
    _device(p)
    common.add_json(p)
    p.set_defaults(func=cmd_purge)


def cmd_snapshot(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        result = guestsnap.snapshot(dom, args.device, args.name, strategy=args.strategy,
                                    block_size=parse_size(args.block_size), nvm_dir=args.nvm_dir,
                                    mass_dir=args.mass_dir)

    def text() -> None:
        common.console.print(f"snapshot {args.name!r} of {result['backing']}: {format_size(result['bytes_written'])} "
                             f"changed since the previous one, {result['seconds']:.2f} s "
                             f"(guest paused {result['guest_paused_seconds']:.2f} s)")

    common.print_result(args.json, result, text)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        result = guestsnap.listing(dom, args.device)

    def text() -> None:
        stats = result["stats"]
        common.console.print(f"{result['backing']}: snapshots {', '.join(result['snapshots']) or '-'}; "
                             f"NVM {stats['nvm_blocks']} blocks, mass {stats['mass_blocks']} blocks "
                             f"of {format_size(stats['block_size'])} ({stats['strategy']})")

    common.print_result(args.json, result, text)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        result = guestsnap.restore(dom, args.device, args.name)

    def text() -> None:
        common.console.print(f"{result['backing']} restored to snapshot {args.name!r} "
                             f"({format_size(result['bytes_written'])} rewritten, {result['seconds']:.2f} s)")

    common.print_result(args.json, result, text)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        freed = guestsnap.delete(dom, args.device, args.name)
    common.console.print(f"snapshot {args.name!r} deleted ({freed['nvm_blocks_freed']} NVM and "
                         f"{freed['mass_blocks_freed']} mass-storage blocks freed)")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        result = guestsnap.purge(dom, args.device)

    def text() -> None:
        common.console.print(f"purged {result['blocks_moved']} blocks to mass storage ({result['strategy']}, "
                             f"{result['entries_rewritten']} entries rewritten, {result['seconds']:.3f} s); "
                             f"NVM now holds {result['stats']['nvm_blocks']} blocks")

    common.print_result(args.json, result, text)
    return 0
