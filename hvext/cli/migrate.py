"""``hvext migrate DOMAIN DEST_URI``: live migration with a progress bar."""

from __future__ import annotations

import argparse

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hvext import aio
from hvext.cli import common
from hvext.migrate import orchestrate
from hvext.migrate.policy import MIB
from hvext.migrate.policy import Progress as Sample


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("migrate", help="live-migrate a running domain to another libvirt host")
    common.add_domain(p)
    p.add_argument("dest_uri", metavar="DEST_URI", help="destination libvirt URI, e.g. qemu+tcp://HOST/system")
    p.add_argument("--policy", choices=["auto", "plain"], default="auto",
                   help="auto: measure and adapt (default); plain: libvirt's default live migration")
    p.add_argument("--downtime-ms", type=int, default=300, help="maximum downtime target (default 300)")
    p.add_argument("--bandwidth", type=int, metavar="MiB/s", help="cap the migration bandwidth")
    p.add_argument("--timeout", type=common.seconds, metavar="SECONDS",
                   help="abort (the source keeps running) if not done by then")
    p.add_argument("--no-shared-storage", action="store_true",
                   help="refuse unless libvirt itself deems the storage safe to migrate")
    common.add_json(p)
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                       TimeElapsedColumn(), console=common.console, disable=args.json, transient=False)
        with bar:
            task = bar.add_task(f"migrating {dom.name}", total=None, detail="measuring")

            def show(sample: Sample, phase: str) -> None:
                bar.update(task, total=sample.total or None, completed=max(0, sample.total - sample.remaining),
                           detail=f"{phase}, pass {sample.iteration}, {sample.remaining / MIB:.0f} MiB left, "
                                  f"dirty {sample.dirty_rate / MIB:.0f} MiB/s, sending {sample.bps / MIB:.0f} MiB/s, "
                                  f"expected downtime {sample.expected_downtime_ms} ms")
            result = aio.run(orchestrate.migrate(
                dom, args.dest_uri, policy=args.policy, downtime_ms=args.downtime_ms,
                bandwidth_mib=args.bandwidth, shared_storage=not args.no_shared_storage, timeout_s=args.timeout,
                on_progress=show))

    def text() -> None:
        postcopy = result.postcopy_switch or (f"refused ({result.postcopy_switch_error})"
                                              if result.postcopy_switch_error else "not used")
        common.print_fields({"Domain": result.domain, "Destination": result.destination,
                             "Plan": result.plan_reason + (f" (without a measured dirty rate: {result.dirty_rate_error})"
                                                           if result.dirty_rate_error else ""),
                             "Post-copy": postcopy,
                             "Total time": f"{result.total_s:.1f} s", "Downtime": f"{result.downtime_ms} ms",
                             "Data sent": f"{(result.bytes_sent or 0) / MIB:.0f} MiB"})

    common.print_result(args.json, result.to_dict(), text)
    return 0
