"""``hvext lab up|down|status|fail|revive|partition|heal``: several libvirt hosts on this machine."""

from __future__ import annotations

import argparse
import time

from hvext import lab
from hvext.lab import plan
from hvext.cli import common


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("lab", help="a multi-host lab on this machine (namespaces, each with its own libvirtd)",
                            description="Several libvirt hosts on this machine: network, mount and UTS "
                                        "namespaces joined by a bridge, addresses in 198.18.0.0/15. "
                                        "See docs/lab.md.")
    sub = p.add_subparsers(dest="lab_command", metavar="SUBCOMMAND", parser_class=type(p))
    sub.required = True

    up = sub.add_parser("up", help="create the lab (a no-op when the same lab is up)")
    up.add_argument("--hosts", type=_host_count, default=2, metavar="N",
                    help=f"number of hosts, {lab.MIN_HOSTS} to {lab.MAX_HOSTS} (default 2)")
    up.add_argument("--cluster", action="store_true",
                    help="also an etcd member per host (one cluster over the lab addresses) and an [ha] config "
                         "for each hvextd, so each host holds a lease (docs/lab.md)")
    up.add_argument("--force", action="store_true",
                    help="replace a lab that has another number of hosts (or is, or is not, a cluster lab)")
    common.add_json(up)
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="remove the lab: daemons, domains, namespaces, links, directories")
    common.add_json(down)
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="the lab's hosts, addresses, URIs and whether each libvirtd answers")
    common.add_json(status)
    status.set_defaults(func=cmd_status)

    fail = sub.add_parser("fail", help="one host fails abruptly: every process of it killed, its link cut",
                          description="SIGKILL every process of HOST (its QEMUs, libvirtd, virtlogd, hvextd and "
                                      "anything else in it) and cut its link. With --power-loss its hvextd "
                                      "gets SIGPWR first (it saves protected PMEM) and the kill comes after "
                                      "the battery window.")
    fail.add_argument("host", metavar="HOST", help="host1 to host8")
    fail.add_argument("--power-loss", action="store_true",
                      help="SIGPWR to the host's hvextd, then the kill after --battery seconds")
    fail.add_argument("--battery", type=_battery, default=None, metavar="SECONDS",
                      help=f"the battery window of --power-loss (default {plan.DEFAULT_BATTERY_S:.0f}, "
                           f"0 to {plan.MAX_BATTERY_S:.0f})")
    common.add_json(fail)
    fail.set_defaults(func=cmd_fail)

    revive = sub.add_parser("revive", help="bring a failed host back as an empty host (fresh daemons, link up)")
    revive.add_argument("host", metavar="HOST", help="host1 to host8")
    common.add_json(revive)
    revive.set_defaults(func=cmd_revive)

    partition = sub.add_parser("partition", help="cut one host's link only: its processes keep running",
                               description="A network partition: HOST's bridge port goes down, as a pulled "
                                           "cable, while everything in HOST (QEMUs, libvirtd, hvextd, its etcd "
                                           "member) keeps running. `hvext lab heal HOST` plugs it back in.")
    partition.add_argument("host", metavar="HOST", help="host1 to host8")
    common.add_json(partition)
    partition.set_defaults(func=cmd_partition)

    heal = sub.add_parser("heal", help="undo `lab partition`: the host's link is up again")
    heal.add_argument("host", metavar="HOST", help="host1 to host8")
    common.add_json(heal)
    heal.set_defaults(func=cmd_heal)


def _host_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not lab.MIN_HOSTS <= count <= lab.MAX_HOSTS:
        raise argparse.ArgumentTypeError(f"{count} out of range: use {lab.MIN_HOSTS} to {lab.MAX_HOSTS}")
    return count


def _battery(text: str) -> float:
    try:
        return plan.check_battery(float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    except lab.LabUsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _loaded() -> lab.Lab:
    the_lab = lab.Lab.load()
    if the_lab is None:
        raise lab.LabUsageError("no lab is up; `hvext lab up --hosts N` creates one")
    return the_lab


def _hosts_table(the_lab: lab.Lab) -> None:
    common.print_table(None, ["host", "address", "hostname", "netns"],
                       [[h.name, h.address, h.hostname, h.netns] for h in the_lab.hosts])
    _print_uris(the_lab.hosts)


def _print_uris(hosts: list[lab.LabHost]) -> None:
    """One URI a line, never wrapped or cut, so it can be copied."""
    common.console.print("libvirt URIs:")
    for h in hosts:
        common.console.print(f"  {h.name}  {h.uri_unix}", soft_wrap=True)
        common.console.print(f"  {h.name}  {h.uri_tls}", soft_wrap=True)


def cmd_up(args: argparse.Namespace) -> int:
    the_lab = lab.Lab.up(args.hosts, force=args.force, cluster=args.cluster)

    def text() -> None:
        if the_lab.created:
            if the_lab.replaced:
                common.console.print(f"lab up: removed the recorded lab first: {the_lab.replaced}")
            kind = " (an etcd member each, one cluster)" if the_lab.state.cluster else ""
            common.console.print(f"lab up: created {len(the_lab.hosts)} hosts{kind} in {the_lab.seconds:.1f} s")
        else:
            common.console.print(f"lab up: {len(the_lab.hosts)} hosts already up, nothing to do")
        _hosts_table(the_lab)

    common.print_result(args.json, {"created": the_lab.created, "replaced": the_lab.replaced,
                                    "cluster": the_lab.state.cluster,
                                    "seconds": round(the_lab.seconds, 3), "hosts": _host_dicts(the_lab)}, text)
    return 0


def _host_dicts(the_lab: lab.Lab) -> list[dict[str, str]]:
    return [{"name": h.name, "address": h.address, "netns": h.netns, "hostname": h.hostname,
             "uuid": h.uuid, "uri_unix": h.uri_unix, "uri_tls": h.uri_tls} for h in the_lab.hosts]


def cmd_down(args: argparse.Namespace) -> int:
    started = time.monotonic()
    removed = lab.down()
    seconds = time.monotonic() - started

    def text() -> None:
        if removed:
            common.console.print(f"lab down: removed {len(removed)} items in {seconds:.1f} s")
            for item in removed:
                common.console.print(f"  {item}")
        else:
            common.console.print("lab down: no lab was up, nothing to do")

    common.print_result(args.json, {"removed": removed, "seconds": round(seconds, 3)}, text)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    the_lab = lab.Lab.load()
    if the_lab is None:
        common.print_result(args.json, {"up": False, "hosts": []},
                            lambda: "no lab is up; `hvext lab up --hosts N` creates one")
        return 0
    statuses = the_lab.status()

    def text() -> None:
        rows = []
        for s in statuses:
            answers = [kind for kind, probe in (("unix", s.unix), ("tls", s.tls)) if probe.ok]
            rows.append([s.host.name, s.host.phase, s.host.address, "up" if s.link_up else "cut",
                         s.daemons.get("libvirtd") or "dead", s.daemons.get("hvextd") or "dead",
                         ", ".join(answers) or "no", s.unix.domains if s.unix.ok else "-"])
        headers = ["host", "state", "address", "link", "libvirtd", "hvextd", "answers", "domains"]
        if the_lab.state.cluster:
            headers.append("etcd")
            for row, s in zip(rows, statuses):
                e = s.etcd or {}
                row.append("dead" if e.get("pid") is None else
                           f"{e['pid']} {'healthy' if e.get('healthy') else 'unhealthy'}"
                           f"{', leader' if e.get('leader') else ''}")
        common.print_table(f"hvext lab: {len(statuses)} hosts, {the_lab.state.phase}", headers, rows)
        for s in statuses:
            for kind, probe in (("unix", s.unix), ("tls", s.tls)):
                if not probe.ok:
                    common.console.print(f"{s.host.name} {kind}: {probe.error}", soft_wrap=True)
            if s.etcd is not None and s.etcd.get("error"):
                common.console.print(f"{s.host.name} etcd: {s.etcd['error']}", soft_wrap=True)
        _print_uris(the_lab.hosts)

    common.print_result(args.json, {"up": True, "phase": the_lab.state.phase, "cluster": the_lab.state.cluster,
                                    "state_file": str(lab.state_file()),
                                    "hosts": [s.to_dict() for s in statuses]}, text)
    return 0


def cmd_fail(args: argparse.Namespace) -> int:
    if args.battery is not None and not args.power_loss:
        raise lab.LabUsageError("--battery is the window of --power-loss; add --power-loss")
    battery = plan.DEFAULT_BATTERY_S if args.battery is None else args.battery
    report = _loaded().fail(args.host, power_loss=args.power_loss, battery=battery)

    def text() -> None:
        if report.power_loss:
            common.console.print(f"lab fail: {report.host}'s hvextd got SIGPWR; battery window "
                                 f"{report.battery_seconds:.1f} s")
        common.console.print(f"lab fail: {report.host} killed ({len(report.killed)} processes), link cut; "
                             f"{report.seconds:.1f} s")
        for item in report.killed:
            common.console.print(f"  {item}")

    common.print_result(args.json, report.to_dict(), text)
    return 0


def cmd_revive(args: argparse.Namespace) -> int:
    started = time.monotonic()
    host = _loaded().revive(args.host)
    seconds = time.monotonic() - started

    def text() -> None:
        common.console.print(f"lab revive: {host.name} is up again (empty) in {seconds:.1f} s")
        _print_uris([host])

    common.print_result(args.json, {"host": host.name, "phase": host.phase, "seconds": round(seconds, 3),
                                    "uri_unix": host.uri_unix, "uri_tls": host.uri_tls,
                                    "processes": {d: r.pid for d, r in host.processes.items()}}, text)
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    the_lab = _loaded()
    was_up = the_lab.partition(args.host)
    name = the_lab.host(args.host).name

    def text() -> None:
        common.console.print(f"lab partition: {name}'s link is cut" + ("" if was_up else " (it already was)")
                             + "; its processes keep running")

    common.print_result(args.json, {"host": name, "link_was_up": was_up}, text)
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    the_lab = _loaded()
    was_cut = the_lab.heal(args.host)
    name = the_lab.host(args.host).name

    def text() -> None:
        common.console.print(f"lab heal: {name}'s link is up" + ("" if was_cut else " (it was not cut)"))

    common.print_result(args.json, {"host": name, "link_was_cut": was_cut}, text)
    return 0
