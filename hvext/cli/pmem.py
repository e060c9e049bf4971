"""Persistent-memory device commands: pmem-attach, pmem-detach, pmem-list, pmem-mount."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from hvext import aio
from hvext.agent.client import PmemMount
from hvext.cli import common
from hvext.errors import AgentError, UsageError
from hvext.host import Domain
from hvext.pmem import devices, hints, power, virtio
from hvext.units import format_size, parse_size


def _backing(text: str) -> Path:
    """--backing / BACKING: made absolute at input (links are not followed, see devices.backing_path)."""
    try:
        return devices.backing_path(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("pmem-attach", help="add an NVDIMM backed by a host file")
    common.add_domain(p)
    p.add_argument("--size", required=True, help="usable size, e.g. 256M (multiple of 2 MiB; 16 MiB for DAX)")
    p.add_argument("--type", choices=["nvdimm", "virtio-pmem"], default="nvdimm")
    p.add_argument("--backing", type=_backing,
                   help="backing file, a regular file of root's (default: in hvext's domain state dir)")
    p.add_argument("--label-size", default="0", help="label area, e.g. 128K (default: none)")
    p.add_argument("--live", action="store_true", help="hot-plug into the running guest as well")
    p.add_argument("--volatile-backing", action="store_true",
                   help="back it by host memory (/dev/shm) and save it to --store on power loss (`hvext power`)")
    p.add_argument("--store", type=Path, help="with --volatile-backing: store directory on disk")
    p.set_defaults(func=cmd_attach)

    p = commands.add_parser("pmem-detach", help="remove a persistent-memory device")
    common.add_domain(p)
    p.add_argument("backing", type=_backing, metavar="BACKING",
                   help="backing file of the device (see pmem-list)")
    p.add_argument("--live", action="store_true", help="hot-unplug from the running guest as well")
    p.add_argument("--remove-backing", action="store_true", help="delete a backing file hvext created")
    p.set_defaults(func=cmd_detach)

    p = commands.add_parser("pmem-list", help="persistent-memory devices: host backing and what the guest sees")
    common.add_domain(p)
    common.add_json(p)
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("pmem-hints", help="persistence hints and epochs the guest declared (untrusted, validated)")
    common.add_domain(p)
    common.add_json(p)
    p.set_defaults(func=cmd_hints)

    p = commands.add_parser("pmem-mount", help="make a guest pmem device a DAX-mounted ext4 file system")
    common.add_domain(p)
    p.add_argument("blockdev", metavar="BLOCKDEV", help="guest block device, e.g. pmem0")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="guest directory, e.g. /mnt/pmem0")
    p.add_argument("--format", action="store_true", help="switch to fsdax and create ext4 (destroys its data)")
    common.add_json(p)
    p.set_defaults(func=cmd_mount)


def cmd_attach(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    label = parse_size(args.label_size)
    if args.store and not args.volatile_backing:
        raise UsageError("--store goes with --volatile-backing")
    if args.volatile_backing and args.backing:
        raise UsageError("--volatile-backing picks the backing in /dev/shm; omit --backing")
    with common.open_domain(args) as dom:
        if args.volatile_backing:
            directory = power.volatile_backing_dir(dom)
            args.backing = next(directory / f"{args.type}{i}.img" for i in range(64)
                                if not (directory / f"{args.type}{i}.img").exists())
        if args.type == "virtio-pmem":
            if label:
                raise UsageError("virtio-pmem devices have no label area")
            device = aio.run(virtio.attach(dom, size, backing=args.backing, live=args.live))
        else:
            if virtio.list_devices(dom):
                raise UsageError(f"domain {dom.name!r} has virtio-pmem devices: with Debian 12's libvirt a domain "
                                 "cannot have both NVDIMM and virtio-pmem devices")
            device = devices.attach(dom, size, label_size=label, backing=args.backing, live=args.live)
        if args.volatile_backing:
            protected = power.protect(dom, device.path, args.store)
    where = "to the running guest and the definition" if args.live else "to the definition"
    kind = "NVDIMM" if device.model == "nvdimm" else "virtio-pmem device"
    common.console.print(f"{kind} of {format_size(device.size)} backed by {device.path} added {where} "
                         f"of '{dom.name}'")
    if args.volatile_backing:
        common.console.print(f"saved to {protected['registration']['store']} on power loss (`hvext power loss`)")
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        if any(d.path == args.backing for d in virtio.list_devices(dom)):
            device = virtio.detach(dom, args.backing, live=args.live, remove_backing=args.remove_backing)
        else:
            device = devices.detach(dom, args.backing, live=args.live, remove_backing=args.remove_backing)
        power.unprotect(dom.name, device.path, missing_ok=True)
    common.console.print(f"pmem device backed by {device.path} removed from '{dom.name}'")
    return 0


async def guest_view(domain: Domain) -> dict[str, Any]:
    async with domain.agent() as agent:
        return {"namespaces": await agent.pmem()}


def cmd_list(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        host_devices = devices.list_devices(dom) + virtio.list_devices(dom)
        guest: dict[str, Any] | None = None
        guest_error = None
        if dom.is_active():
            try:
                guest = aio.run(guest_view(dom))
            except AgentError as err:
                guest_error = str(err)
        else:
            guest_error = "domain is not running"
    namespaces = guest.get("namespaces", []) if isinstance(guest, dict) else []

    def text() -> None:
        common.print_table(f"pmem devices of {dom.name}", ["model", "alias", "size", "label", "backing"],
                           [[d.model, d.alias or "-", format_size(d.size), format_size(d.label_size), d.path]
                            for d in host_devices])
        if namespaces:
            common.print_table("seen by the guest", ["namespace", "mode", "size", "device", "mounted", "DAX"],
                               [[n.get("namespace"), n.get("mode"), format_size(n.get("size") or 0),
                                 n.get("blockdev") or n.get("chardev"),
                                 (n.get("mount") or {}).get("mountpoint", "-"),
                                 "yes" if (n.get("mount") or {}).get("dax") else "no"] for n in namespaces])
        elif guest_error:
            common.console.print(f"guest view unavailable: {common.literal(guest_error)}")

    common.print_result(args.json, {"devices": [d.to_dict() for d in host_devices], "guest": namespaces,
                                    "guest_error": guest_error}, text)
    return 0


async def mount(domain: Domain, blockdev: str, mountpoint: str, fmt: bool) -> PmemMount:
    async with domain.agent(timeout=300) as agent:
        return await agent.pmem_mount(blockdev, mountpoint, format=fmt)


def cmd_mount(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        result = aio.run(mount(dom, args.blockdev, args.mountpoint, args.format))
    common.print_result(args.json, dataclasses.asdict(result), lambda: (
        f"/dev/{common.literal(result.blockdev)} mounted on "
        f"{common.literal(result.mountpoint)} in '{dom.name}' "
        f"({'DAX' if result.dax else 'no DAX'})"))
    return 0


def cmd_hints(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        dom.require_running()
        result = aio.run(hints.fetch(dom))

    def text() -> None:
        rows = []
        for device in result.devices.values():
            for kind, ranges in device.ranges.items():
                if ranges:
                    rows.append([device.backing, kind, len(ranges), format_size(sum(n for _, n in ranges))])
        common.print_table(f"persistence hints of {dom.name}", ["device backing", "kind", "ranges", "bytes"], rows)
        epochs = max((d.epochs for d in result.devices.values()), default=0)
        common.console.print(f"epochs marked by the guest: {epochs}")
        for reason in result.rejected[:10]:
            common.console.print(f"rejected: {common.literal(reason)}")

    common.print_result(args.json, result.to_dict(), text)
    return 0
