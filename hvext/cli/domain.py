"""Domain lifecycle: list, define, start, shutdown, destroy, undefine, suspend, resume, managedsave,
managedsave-remove, dominfo, console-log."""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path
from typing import Any

from hvext import aio
from hvext.cli import common
from hvext.errors import DomainNotFound, UsageError
from hvext.host import Domain, DomainSpec
from hvext.memory import ramfile
from hvext.pmem import power
from hvext.units import format_size, parse_size_mib

SPEC_KEYS = {"name", "memory", "current_memory", "vcpus", "free_page_reporting", "swap_file"}


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("list", help="list domains")
    p.add_argument("--all", action="store_true", help="include inactive domains")
    common.add_json(p)
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("define", help="define a domain on the hvext guest image")
    p.add_argument("domain", metavar="NAME", nargs="?", help="domain name (or `name` in --spec)")
    p.add_argument("--spec", type=Path, help="TOML file with name, memory, current_memory, vcpus")
    p.add_argument("--memory", help="maximum memory, e.g. 512M, 2G (default 512M)")
    p.add_argument("--current-memory", help="initial balloon target (default: --memory)")
    p.add_argument("--vcpus", type=common.count(1, 64), help="virtual CPUs (default 1)")
    p.add_argument("--free-page-reporting", action="store_true", default=None,
                   help="let the guest report free pages to the host through the balloon")
    p.add_argument("--swap-file", action="store_true", default=None,
                   help="keep guest RAM in a thin file on disk (libvirt's memory_backing_dir), so that what the "
                        "host reclaims from it goes to that file, not to host swap (`hvext swapfile`)")
    p.add_argument("--ram-file", action="store_true",
                   help="keep guest RAM in a file under /dev/shm/hvext that the host can read and keep "
                        "(`managedsave --to-ram`; no memory devices)")
    p.set_defaults(func=cmd_define)

    p = commands.add_parser("start", help="start a defined domain")
    common.add_domain(p)
    p.add_argument("--wait-agent", type=common.seconds, nargs="?", const=60.0, metavar="SECONDS",
                   help="wait until the hvext agent answers (default 60 s)")
    p.set_defaults(func=cmd_start)

    p = commands.add_parser("shutdown", help="power a domain off gracefully (ACPI power button)")
    common.add_domain(p)
    p.add_argument("--wait", type=common.seconds, nargs="?", const=60.0, metavar="SECONDS",
                   help="wait until it is off (default 60 s)")
    p.set_defaults(func=cmd_shutdown)

    p = commands.add_parser("suspend", help="pause a running domain's vCPUs (it stays in memory)")
    common.add_domain(p)
    p.set_defaults(func=cmd_suspend)

    p = commands.add_parser("resume", help="let a paused domain's vCPUs run again")
    common.add_domain(p)
    p.set_defaults(func=cmd_resume)

    p = commands.add_parser("managedsave", help="save a running domain's state and stop it; `start` resumes it")
    common.add_domain(p)
    p.add_argument("--to-ram", action="store_true",
                   help="save only the device state; guest RAM stays in host memory (RAM-file domains)")
    common.add_json(p)
    p.set_defaults(func=cmd_managedsave)

    p = commands.add_parser("managedsave-remove", help="discard a domain's saved state (the next start boots)")
    common.add_domain(p)
    p.set_defaults(func=cmd_managedsave_remove)

    p = commands.add_parser("destroy", help="force a domain off immediately")
    common.add_domain(p)
    p.set_defaults(func=cmd_destroy)

    p = commands.add_parser("undefine", help="remove a domain's definition (and hvext's overlay disk)")
    common.add_domain(p)
    p.add_argument("--keep-state", action="store_true", help="keep hvext's overlay disk and state dir")
    p.add_argument("--remove-power-store", action="store_true",
                   help="also delete the power-loss stores of its protected pmem devices (kept by default)")
    p.set_defaults(func=cmd_undefine)

    p = commands.add_parser("dominfo", help="show a domain's basic information")
    common.add_domain(p)
    common.add_json(p)
    p.set_defaults(func=cmd_dominfo)

    p = commands.add_parser("console-log", help="print the guest's serial console log")
    common.add_domain(p)
    p.add_argument("--lines", type=common.count(0, 10**9), metavar="N", help="only the last N lines")
    p.set_defaults(func=cmd_console_log)


def cmd_list(args: argparse.Namespace) -> int:
    rows = []
    with common.open_host(args) as host:
        for d in host.domains(include_inactive=args.all):
            try:
                rows.append({"id": d.id(), "name": d.name, "state": ramfile.state(d), "hvext": d.facts().hvext_managed})
            except DomainNotFound:
                continue  # undefined while we were listing
    common.print_result(args.json, rows, lambda: common.print_table(
        None, ["Id", "Name", "State", "hvext"],
        [[r["id"] if r["id"] is not None else "-", r["name"], r["state"], "yes" if r["hvext"] else "no"]
         for r in rows]))
    return 0


def spec_from_args(args: argparse.Namespace) -> DomainSpec:
    """Merge a --spec file and flags (flags win) into a validated DomainSpec."""
    values: dict[str, Any] = {}
    if args.spec:
        try:
            values = tomllib.loads(args.spec.read_text())
        except OSError as err:
            raise UsageError(f"cannot read spec file {args.spec}: {err.strerror}") from err
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"spec file {args.spec} is not valid TOML: {err}") from err
        unknown = set(values) - SPEC_KEYS
        if unknown:
            raise UsageError(f"spec file {args.spec}: unknown keys {sorted(unknown)}; known: {sorted(SPEC_KEYS)}")
    for key in ("memory", "current_memory", "vcpus", "free_page_reporting", "swap_file"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if args.domain:
        values["name"] = args.domain
    if not values.get("name"):
        raise UsageError("a domain name is required (argument NAME or `name` in --spec)")
    vcpus = values.get("vcpus", 1)
    if not isinstance(vcpus, int) or isinstance(vcpus, bool):
        raise UsageError(f"vcpus must be an integer, not {vcpus!r}")
    current = values.get("current_memory")
    return DomainSpec(
        name=str(values["name"]),
        memory_mib=parse_size_mib(str(values.get("memory", "512M"))),
        current_memory_mib=parse_size_mib(str(current)) if current is not None else None,
        vcpus=vcpus,
        free_page_reporting=_flag(values, "free_page_reporting"),
        swap_file=_flag(values, "swap_file"),
    ).validate()


def _flag(values: dict[str, Any], key: str) -> bool:
    """A boolean spec key; a string such as "false" in a spec file is refused, not read as true."""
    value = values.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{key} must be true or false, not {value!r}")
    return value


def cmd_define(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    if args.ram_file and spec.swap_file:
        raise UsageError("--ram-file and --swap-file exclude each other: guest RAM is in one file")
    with common.open_host(args) as host:
        dom = host.define(spec)
        if args.ram_file:
            try:
                ramfile.convert(dom)
            except BaseException:
                dom.undefine()  # nothing half done: no domain without the RAM file it was asked for
                raise
    common.console.print(f"Domain '{spec.name}' defined ({spec.memory_mib} MiB, {spec.vcpus} vCPU"
                         + (", RAM in a swap file)" if spec.swap_file else
                            ", RAM in a RAM file)" if args.ram_file else ")"))
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        started = time.monotonic()
        how = ramfile.start(dom)
        common.console.print(f"Domain '{dom.name}' started" + (" (resumed from RAM)" if how != "booted" else ""))
        if args.wait_agent:
            with common.console.status("waiting for the hvext agent..."):
                info = aio.run(dom.wait_agent(args.wait_agent))
            common.console.print(f"agent {common.literal(info.agent_version)} ready after "
                                 f"{time.monotonic() - started:.1f} s (guest kernel {common.literal(info.kernel)})")
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        if args.wait:
            with common.console.status(f"waiting for '{dom.name}' to power off..."):
                dom.shutdown(wait=args.wait)
            common.console.print(f"Domain '{dom.name}' is shut off")
            _release(dom)
        else:
            dom.shutdown()
            common.console.print(f"Domain '{dom.name}' is being shutdown")
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        dom.destroy()
        common.console.print(f"Domain '{dom.name}' destroyed")
        _release(dom)
    return 0


def _release(dom: Domain) -> None:
    """A RAM-file domain that stopped gives its RAM file's memory back to the host."""
    if ramfile.release(dom):
        common.console.print(f"RAM file of '{dom.name}' emptied")


def cmd_suspend(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        dom.suspend()
        common.console.print(f"Domain '{dom.name}' suspended")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        dom.resume()
        common.console.print(f"Domain '{dom.name}' resumed")
    return 0


def cmd_managedsave(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        if args.to_ram:
            result = ramfile.save_to_ram(dom)
            data = {"name": dom.name, "to_ram": True, **result.to_dict()}
        else:
            dom.require_running()
            started = time.monotonic()
            dom.managed_save()
            data = {"name": dom.name, "to_ram": False, "seconds": time.monotonic() - started}
            _release(dom)  # the image holds all of its RAM
    common.print_result(args.json, data, lambda: common.console.print(
        f"Domain '{dom.name}' state saved "
        + (f"to RAM: {format_size(data['state_bytes'])} of device state written, "
           f"{format_size(data['ram_bytes'])} of guest RAM kept in {data['ram_file']['path']}"
           if args.to_ram else "by libvirt") + f" ({data['seconds']:.2f} s)"))
    return 0


def cmd_managedsave_remove(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        if ramfile.discard(dom):
            common.console.print(f"Removed the saved-to-RAM state of '{dom.name}'")
        elif dom.has_managed_save():
            dom.remove_managed_save()
            common.console.print(f"Removed managedsave image for domain '{dom.name}'")
        else:
            common.console.print(f"Domain '{dom.name}' has no managed save image; removal skipped")
    return 0


def cmd_undefine(args: argparse.Namespace) -> int:
    power.check_registry_access()  # before anything changes: undefine must not leave registrations behind
    with common.open_domain(args) as dom:
        uuid = dom.info()["uuid"]
        dom.undefine(remove_state=not args.keep_state)
        common.console.print(f"Domain '{dom.name}' has been undefined")
    # its power-loss registrations go too: a save would otherwise report them forever
    for reg in power.unregister_domain(dom.name, uuid, remove_store=args.remove_power_store):
        common.console.print(f"{reg.backing} no longer protected; store "
                             + ("removed" if args.remove_power_store else f"kept in {reg.store}"))
    return 0


def cmd_dominfo(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        info = dom.info()
        info["state"] = ramfile.state(dom) if info["state"] == "shut off" else info["state"]
        ram = ramfile.of(dom)
        info["ram_file"] = ram.to_dict() if ram else None
        info["managed_save"] = info["state"] == ramfile.SAVED_STATE or dom.has_managed_save()
        if ram:
            info["ram_file"]["usage"] = ramfile.usage(dom).to_dict()
    common.print_result(args.json, info, lambda: common.print_fields({
        "Id": info["id"], "Name": info["name"], "UUID": info["uuid"], "State": info["state"],
        "CPU(s)": info["vcpus"], "CPU time": f"{info['cpu_time_s']:.1f}s",
        "Max memory": f"{info['max_memory_kib']} KiB", "Used memory": f"{info['used_memory_kib']} KiB",
        "Persistent": "yes" if info["persistent"] else "no",
        "hvext managed": "yes" if info["hvext_managed"] else "no",
        "Agent channel": "yes" if info["agent_channel"] else "no",
        "Console log": info["console_log"],
        "Managed save": "yes" if info["managed_save"] else "no",
        "RAM file": (f"{info['ram_file']['path']} (block {info['ram_file']['block_id']}, "
                     f"{format_size(info['ram_file']['usage']['file'])} held)") if info["ram_file"] else "no",
    }))
    return 0


def cmd_console_log(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        path = dom.facts().console_log
        if path is None:
            raise UsageError(f"domain {dom.name!r} has no console log file (it was not defined by hvext)")
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise UsageError(f"no console log yet at {path}: the domain has not been started") from None
    lines = text.splitlines()
    if args.lines is not None:
        lines = lines[-args.lines:] if args.lines > 0 else []
    print("\n".join(common.literal(line, markup=False, keep="\t") for line in lines))  # the guest wrote it
    return 0
