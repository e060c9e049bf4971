"""``hvext ha ...``: protect domains in the HA cluster (docs/ha.md).

``ha protect DOMAIN [--host NAME]``, ``ha unprotect DOMAIN``, ``ha status [DOMAIN] [--watch [S]] [--json]``. They reach the
cluster through this host's etcd member (``hvext cluster init|join``), with its certificate.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from hvext.cli import common, watch
from hvext.cli.cluster import add_paths, layout_from
from hvext.ha import cluster, protection, shared_store


def register(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("ha", help="protect domains in the HA cluster (protect, unprotect, status)")
    sub = group.add_subparsers(dest="ha_command", metavar="ACTION", parser_class=type(group))
    sub.required = True

    p = sub.add_parser("protect", help="store a running domain's definition in the cluster; this host's hvextd "
                                       "then owns it, and another host restarts it if this one dies")
    common.add_domain(p)
    p.add_argument("--host", default=None, metavar="NAME",
                   help="this host's name in the cluster, as hvextd's [ha] host (default: the short host name)")
    p.add_argument("--via-shared-store", default=None, metavar="DIR", dest="shared_store",
                   help="also its volatile-backed pmem devices: saved on power loss to stores in DIR (a private "
                        "directory on a file system every host reaches), restored by the host that takes over")
    add_paths(p)
    common.add_json(p)
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("unprotect", help="forget a domain's protection (it keeps running where it runs)")
    common.add_domain(p)
    add_paths(p)
    common.add_json(p)
    p.set_defaults(func=cmd_unprotect)

    p = sub.add_parser("status", help="each protected domain: owner, the owner's lease TTL left, since when")
    p.add_argument("domain", metavar="DOMAIN", nargs="?", default=None, help="only this domain")
    watch.add_arguments(p, default=1.0, source="(owners, leases: a failover as it happens)")
    add_paths(p)
    common.add_json(p)
    p.set_defaults(func=cmd_status)


def cmd_protect(args: argparse.Namespace) -> int:
    layout = layout_from(args)
    client = cluster.client_for(layout)
    try:
        with common.open_host(args) as host:
            home = args.host or cluster.default_name()
            if args.shared_store is not None:
                result = shared_store.protect(client, host, args.domain, home, args.shared_store)
            else:
                result = protection.protect(client, host, args.domain, home)
    finally:
        client.close()
    common.print_result(args.json, result, lambda: common.literal(
        f"domain {result['domain']} protected (home {result['home']}); this host's hvextd claims it at its "
        "next lease renewal" + (f"; its pmem is saved to {result['pmem']['dir']} on power loss"
                                if result.get("pmem") else "")))
    return 0


def cmd_unprotect(args: argparse.Namespace) -> int:
    client = cluster.client_for(layout_from(args))
    try:
        result = protection.unprotect(client, args.domain)
    finally:
        client.close()
    common.print_result(args.json, result, lambda: common.literal(
        f"domain {result['domain']} is no longer protected"))
    return 0


def _when(since: float | None) -> str:
    if since is None:
        return "-"
    return datetime.datetime.fromtimestamp(since, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def failover_text(record: Any) -> str:
    """The last failover record (``/hvext/failover/<domain>``, read from etcd: any shape) in one line."""
    if not isinstance(record, dict):
        return "-"
    host = str(record.get("host", "?"))[:64]
    at = record.get("at")
    when = _when(at) if isinstance(at, (int, float)) and not isinstance(at, bool) and 0 <= at < 1e11 else "?"
    if "error" in record:
        return f"{host}: not started: {str(record['error'])[:200]} ({when})"
    what = record.get("restored_generation", record.get("restored_epoch"))
    if isinstance(what, dict):
        what = "generation " + ",".join(str(v)[:20] for v in list(what.values())[:8])
    elif what is not None:
        what = f"epoch {str(what)[:20]}"
    complete = {True: "complete", False: "last save only (no final)"}.get(record.get("complete"), "")
    return " ".join(x for x in [host, what or str(record.get("action", ""))[:80], complete, f"({when})"] if x)


def status_table(rows: list[dict[str, Any]]) -> Any:
    """The protected domains as a table (a line when there are none)."""
    if not rows:
        return "no protected domain"
    return common.table("Protected domains", ["Domain", "Owner", "Lease TTL", "Home", "Protected since", "State",
                                              "PMEM", "Last failover"],
                        [[r["domain"], r["owner"] or "-", "-" if r["lease_ttl"] is None else f"{r['lease_ttl']} s",
                          r["home"] or "-", _when(r["since"]), r["state"], r.get("pmem") or "-",
                          failover_text(r.get("failover"))] for r in rows])


def cmd_status(args: argparse.Namespace) -> int:
    watch.check(args)
    client = cluster.client_for(layout_from(args))
    try:
        if args.watch is not None:  # one JSON object per sample: {"domains": [...]}
            return watch.run(lambda: protection.status(client, args.domain), interval=args.watch, count=args.count,
                             as_json=args.json, to_dict=lambda rows: {"domains": rows}, render=status_table)
        rows = protection.status(client, args.domain)
    finally:
        client.close()
    common.print_result(args.json, rows if args.domain is None else rows[0], lambda: status_table(rows))
    return 0
