"""`hvext nvm-ram`: a VM's RAM on the NVM tier (virtio-mem, hvext.memory.nvmram; C8)."""

from __future__ import annotations

import argparse
from pathlib import Path

from hvext.cli import common
from hvext.errors import UsageError
from hvext.memory import nvmram
from hvext.pmem import devices
from hvext.units import format_size, parse_size


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("nvm-ram", help="RAM on the NVM tier (virtio-mem): show, add, resize")
    common.add_domain(p)
    p.add_argument("--attach", metavar="SIZE",
                   help="add a device of at most SIZE (multiple of 2 MiB) to the definition (next start); "
                        "needs --nvm-dir")
    p.add_argument("--nvm-dir", type=Path, help="the NVM tier: a directory (e.g. on a pmem mount or /dev/shm)")
    p.add_argument("--size", help="ask the running guest to plug SIZE of NVM RAM (0: give it all back)")
    p.add_argument("--wait", type=common.seconds, metavar="SECONDS",
                   help="with --size: wait until the guest has plugged it (fails if it has not by then)")
    common.add_json(p)
    p.set_defaults(func=cmd_nvm_ram)


def cmd_nvm_ram(args: argparse.Namespace) -> int:
    if args.attach and args.size:
        raise UsageError("--attach adds the device to the definition and --size resizes a running one: one at a time")
    if args.attach and not args.nvm_dir:
        raise UsageError("--attach needs --nvm-dir (the NVM tier's directory)")
    if args.nvm_dir and not args.attach:
        raise UsageError("--nvm-dir goes with --attach (the device records its backing)")
    if args.wait and not args.size:
        raise UsageError("--wait goes with --size")
    attach = parse_size(args.attach) if args.attach else None
    size = parse_size(args.size) if args.size is not None else None
    with common.open_domain(args) as dom:
        if attach is not None:
            device = nvmram.attach(dom, args.nvm_dir, attach)
        elif size is not None:
            device = nvmram.resize(dom, size)
            if args.wait:
                device = nvmram.wait_settled(dom, args.wait)
                if device.current != device.requested:
                    raise UsageError(f"the guest of {dom.name!r} has plugged {format_size(device.current or 0)} of "
                                     f"the {format_size(device.requested)} requested after {args.wait:g} s "
                                     "(docs/memory.md: what the guest must do)")
        else:
            device = nvmram.status(dom)
        data = device.to_dict() | {"domain": dom.name, "active": dom.is_active(),
                                   "allocated": devices.allocated(device.path) if device.path else None}

    def text() -> None:
        if attach is not None:
            common.console.print(f"NVM RAM of up to {format_size(device.size)} backed by "
                                 f"{common.literal(device.path)} added to the definition of "
                                 f"'{common.literal(dom.name)}' (from its next start)")
            return
        common.print_fields({
            "domain": dom.name, "backing": device.path or "libvirt's RAM (not on the NVM tier)",
            "size": format_size(device.size), "requested": format_size(device.requested),
            "current": format_size(device.current) if device.current is not None else None,
            "on the tier": format_size(data["allocated"]) if data["allocated"] is not None else None,
        })

    common.print_result(args.json, data, text)
    return 0
