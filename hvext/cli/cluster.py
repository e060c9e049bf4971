"""``hvext cluster ...``: this host's membership of the HA cluster (etcd; docs/ha.md).

``cluster init [--name NAME] [--cluster NAME] [--advertise ADDR]``, ``cluster join ENDPOINT --credentials DIR``,
``cluster status [--json]``, ``cluster start``, ``cluster stop``, ``cluster leave`` and
``cluster credentials export DIR`` (what a joining host needs: the cluster's CA).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hvext.cli import common
from hvext.ha import cluster, etcd
from hvext.ha.etcd import Layout


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("cluster", help="this host's membership of the HA cluster (init, join, status, "
                                                "start, stop, leave, credentials)")
    sub = group.add_subparsers(dest="cluster_command", metavar="ACTION", parser_class=type(group))
    sub.required = True

    p = sub.add_parser("init", help="make a one-member cluster on this host and start its etcd (idempotent)")
    _add_member_options(p)
    p.add_argument("--cluster", default="hvext", metavar="NAME", help="the cluster's name (default hvext)")
    common.add_json(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("join", help="add this host to a running cluster and start its etcd member")
    p.add_argument("endpoint", metavar="ENDPOINT", help="a member's client URL, e.g. https://192.0.2.1:2379")
    p.add_argument("--credentials", type=Path, required=True, metavar="DIR",
                   help="the directory `hvext cluster credentials export DIR` wrote on a member")
    _add_member_options(p)
    common.add_json(p)
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("status", help="members, leader, each host's lease and the VMs it owns")
    add_paths(p)
    common.add_json(p)
    p.set_defaults(func=cmd_status)

    for name, text, func in (("start", "start this host's etcd member unless it runs", cmd_start),
                             ("stop", "stop this host's etcd member (it stays a member)", cmd_stop),
                             ("leave", "remove this host from the cluster, stop its member, delete its data",
                              cmd_leave)):
        p = sub.add_parser(name, help=text)
        add_paths(p)
        common.add_json(p)
        p.set_defaults(func=func)

    p = sub.add_parser("credentials", help="the cluster's credentials (export)")
    csub = p.add_subparsers(dest="credentials_command", metavar="ACTION", parser_class=type(group))
    csub.required = True
    e = csub.add_parser("export", help="write the cluster's CA (certificate and KEY) into a new directory, "
                                       "for `cluster join --credentials` on another host")
    e.add_argument("directory", type=Path, metavar="DIR", help="a directory that does not exist yet")
    add_paths(e)
    e.set_defaults(func=cmd_export)


def _add_member_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=None, metavar="NAME", help="this member's name (default: the short host name)")
    p.add_argument("--advertise", default="127.0.0.1", metavar="ADDR",
                   help="the address other members and clients reach this host at (default 127.0.0.1: a "
                        "cluster of this host only)")
    p.add_argument("--client-port", type=common.count(1, 65535), default=etcd.CLIENT_PORT, metavar="PORT",
                   help=f"etcd's client port (default {etcd.CLIENT_PORT})")
    p.add_argument("--peer-port", type=common.count(1, 65535), default=etcd.PEER_PORT, metavar="PORT",
                   help=f"etcd's peer port (default {etcd.PEER_PORT})")
    add_paths(p)


def add_paths(p: argparse.ArgumentParser) -> None:
    """Where the member's files go (hidden: tests run members in temporary directories)."""
    p.add_argument("--state-dir", type=Path, default=Layout.state_dir, help=argparse.SUPPRESS)
    p.add_argument("--run-dir", type=Path, default=Layout.run_dir, help=argparse.SUPPRESS)
    p.add_argument("--log-dir", type=Path, default=Layout.log_dir, help=argparse.SUPPRESS)


def layout_from(args: argparse.Namespace) -> Layout:
    return Layout(args.state_dir.absolute(), args.run_dir.absolute(), args.log_dir.absolute())


def _out(args: argparse.Namespace, result: dict[str, Any], text: str) -> int:
    """*result* as JSON with ``--json``, else *text* as it is (plain print: paths are not rich markup)."""
    common.print_result(getattr(args, "json", False), result, lambda: print(text))
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    result = cluster.init(layout_from(args), args.name or cluster.default_name(), args.cluster, args.advertise,
                          args.client_port, args.peer_port)
    if result["already"]:
        text = (f"already initialised: member {result['member']} of cluster {result['cluster']} "
                f"({result['client_url']}); nothing changed")
    else:
        text = (f"cluster {result['cluster']} initialised: member {result['member']} at {result['client_url']} "
                f"(etcd PID {result['pid']})")
    return _out(args, result, text)


def cmd_join(args: argparse.Namespace) -> int:
    result = cluster.join(layout_from(args), args.endpoint, args.credentials, args.name or cluster.default_name(),
                          args.advertise, args.client_port, args.peer_port)
    return _out(args, result, f"joined cluster {result['cluster']} as member {result['member']} "
                              f"({result['members']} members; etcd PID {result['pid']})")


def cmd_start(args: argparse.Namespace) -> int:
    result = cluster.start(layout_from(args))
    word = "already running" if result["already"] else "started"
    return _out(args, result, f"etcd member {result['member']}: {word} (PID {result['pid']})")


def cmd_stop(args: argparse.Namespace) -> int:
    result = cluster.stop(layout_from(args))
    text = f"etcd member {result['member']}: " + ("was not running" if result["pid"] is None
                                                 else f"stopped (PID {result['pid']})")
    return _out(args, result, text)


def cmd_leave(args: argparse.Namespace) -> int:
    result = cluster.leave(layout_from(args))
    return _out(args, result, f"member {result['member']} left cluster {result['left']}; its data is removed")


def cmd_export(args: argparse.Namespace) -> int:
    files = cluster.export_credentials(layout_from(args), args.directory)
    print(f"wrote {', '.join(files)}: the cluster's CA KEY; copy the directory to the joining host over an "
          "authenticated channel (scp), then delete it")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = cluster.status(layout_from(args))
    if args.json:
        common.print_json(status)
        return 0
    common.print_fields({"Cluster": status["cluster"], "This member": status["this_member"],
                         "Leader": status["leader"], "etcd": status["version"]})
    common.print_table("Members", ["Name", "ID", "Peer URL", "Client URL", "Leader"],
                       [[m["name"] or "(not started)", m["id"], " ".join(m["peer_urls"]), " ".join(m["client_urls"]),
                         "yes" if m["leader"] else ""] for m in status["members"]])
    common.print_table("Hosts", ["Host", "Lease", "TTL", "Owns"],
                       [[h["name"], h["lease"], f"{h['ttl']}/{h['granted_ttl']} s", " ".join(h["owns"]) or "-"]
                        for h in status["hosts"]])
    return 0
