"""``hvext ha ...``: protect domains in the HA cluster (docs/ha.md).

``ha protect DOMAIN [--host NAME]``, ``ha unprotect DOMAIN``, ``ha status [DOMAIN] [--watch [S]] [--json]``. They reach the
cluster through this host's etcd member (``hvext cluster init|join``), with its certificate.

Memory mirroring (C19, this host only, no cluster needed): ``ha mirror DOMAIN [--range GPA:LEN ...] [--interval MS]``,
``ha mirror DOMAIN --stop|--sync``, ``ha mirror-status [DOMAIN]``, ``ha inject-memory-error DOMAIN --gpa ADDR``.
"""

from __future__ import annotations

import argparse
import datetime
from typing import Any

from hvext.cli import common, watch
from hvext.cli.cluster import add_paths, layout_from
from hvext.errors import UsageError
from hvext.ha import cluster, mirror, mirror_policy, protection, replication, shared_store, standby, volatile
from hvext.units import format_size


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
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="also its pmem devices: replicated, crash-consistently and asynchronously, to N other live "
                        "hosts, one of which takes over with the newest copy (C16)")
    p.add_argument("--standby", default=None, metavar="HOST",
                   help="instead, keep a copy of its RAM (a RAM-file domain) on HOST, refreshed from its dirty page "
                        "lists; `ha failover` or a power loss here resumes it there, same processes (C17)")
    p.add_argument("--sync-interval", type=float, default=None, metavar="S",
                   help="with --standby: seconds between refreshes of the copy (default 1)")
    add_paths(p)
    common.add_json(p)
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("unprotect", help="forget a domain's protection (it keeps running where it runs)")
    common.add_domain(p)
    p.add_argument("--standby", action="store_true", help="its standby protection (`protect --standby`)")
    add_paths(p)
    common.add_json(p)
    p.set_defaults(func=cmd_unprotect)

    p = sub.add_parser("status", help="each protected domain: owner, the owner's lease TTL left, since when")
    p.add_argument("domain", metavar="DOMAIN", nargs="?", default=None, help="only this domain")
    watch.add_arguments(p, default=1.0, source="(owners, leases: a failover as it happens)")
    add_paths(p)
    common.add_json(p)
    p.set_defaults(func=cmd_status)
    register_mirror(sub)
    register_volatile(sub)
    register_standby(sub)


def cmd_protect(args: argparse.Namespace) -> int:
    if args.standby is not None:
        return cmd_protect_standby(args)
    if args.sync_interval is not None:
        raise UsageError("--sync-interval is for --standby")
    layout = layout_from(args)
    client = cluster.client_for(layout)
    try:
        with common.open_host(args) as host:
            home = args.host or cluster.default_name()
            if args.shared_store is not None and args.replicas is not None:
                raise UsageError("--via-shared-store and --replicas exclude each other: choose one")
            if args.replicas is not None:
                result = replication.protect(client, host, args.domain, home, args.replicas)
            elif args.shared_store is not None:
                result = shared_store.protect(client, host, args.domain, home, args.shared_store)
            else:
                result = protection.protect(client, host, args.domain, home)
    finally:
        client.close()
    common.print_result(args.json, result, lambda: common.literal(
        f"domain {result['domain']} protected (home {result['home']}); this host's hvextd claims it at its "
        "next lease renewal" + (f"; its pmem is saved to {result['pmem']['dir']} on power loss"
                                if result.get("pmem", {}).get("dir") else
                                f"; its pmem is replicated to {', '.join(result['pmem']['replicas'])}"
                                if result.get("pmem") else "")))
    return 0


def cmd_unprotect(args: argparse.Namespace) -> int:
    if args.standby:
        with common.open_host(args) as host:
            result = standby.unprotect(host, args.domain)
        common.print_result(args.json, result, lambda: common.literal(
            f"domain {result['domain']}: no standby copy on {result['standby']} any more"))
        return 0
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
                          r["home"] or "-", _when(r["since"]), r["state"],
                          replication_text(r["replication"]) if r.get("replication") else r.get("pmem") or "-",
                          failover_text(r.get("failover"))] for r in rows])


def replication_text(rep: dict[str, Any]) -> str:
    """A replicated domain's PMEM column: last local epoch, then each replica's ack and lag (C16)."""
    parts = [f"replicas: epoch {rep.get('epoch_local') if rep.get('epoch_local') is not None else '-'} here"]
    for row in rep.get("replicas", []):
        lag = "" if not row["lag_epochs"] else (
            f", {row['lag_epochs']} behind, {row['lag_bytes']} B" +
            (f", {row['lag_seconds']} s" if row.get("lag_seconds") is not None else ""))
        parts.append(f"{row['host']} {row['acked_epoch']} ({row['state']}{lag})")
    if rep.get("final"):
        parts.append(f"final epoch {rep['final'].get('epoch')} on battery")
    return "; ".join(parts)


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


# -- memory mirroring (C19) ------------------------------------------------------------------------------


def _gpa(text: str) -> int:
    """argparse type of --gpa: a guest physical address, decimal or 0x hex."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address: {text[:40]!r} (decimal or 0x hex)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not an address: {text[:40]!r} is negative")
    return value


def _range(text: str) -> tuple[int, int]:
    try:
        return mirror_policy.parse_range(text)
    except UsageError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def register_mirror(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mirror", help="keep a backup copy of a running domain's RAM (or --range parts of it) in "
                                      "sync from its dirty page lists; hvextd syncs it every --interval (C19)")
    common.add_domain(p)
    p.add_argument("--range", dest="ranges", action="append", type=_range, default=[], metavar="GPA:LEN",
                   help="mirror only this guest-physical range (repeatable), e.g. 0x100000:64M; default: all RAM")
    p.add_argument("--interval", type=int, default=1000, metavar="MS",
                   help="milliseconds between syncs (default 1000)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--stop", action="store_true", help="stop mirroring: the copy is removed")
    what.add_argument("--sync", action="store_true", help="sync once now (as hvextd's loop does)")
    common.add_json(p)
    p.set_defaults(func=cmd_mirror)

    p = sub.add_parser("mirror-status", help="each mirrored domain: last sync, pages copied, lag")
    p.add_argument("domain", metavar="DOMAIN", nargs="?", default=None, help="only this domain")
    common.add_json(p)
    p.set_defaults(func=cmd_mirror_status)

    p = sub.add_parser("inject-memory-error", help="simulate an uncorrectable memory error in one page of a mirrored "
                                                   "domain: the page is destroyed, hvext pauses the guest, repairs "
                                                   "the page from the mirror and resumes it")
    common.add_domain(p)
    p.add_argument("--gpa", type=_gpa, required=True, metavar="ADDR", help="guest physical address (0x hex or decimal)")
    p.add_argument("--readable", action="store_true",
                   help="the page fails but can still be read (a predicted failure): a final sync copies it first")
    p.add_argument("--resume-stale", action="store_true",
                   help="resume the guest also when the mirror's copy misses the writes of the last interval")
    common.add_json(p)
    p.set_defaults(func=cmd_inject)


def mirror_table(rows: list[dict[str, Any]]) -> Any:
    if not rows:
        return "no mirrored domain"
    return common.table("Mirrored domains", ["Domain", "State", "Covers", "Interval", "Last sync", "Lag", "Syncs",
                                             "Last pages", "Pages copied", "Last repair"],
                        [[r["domain"], r["state"] + (f": {r['error']}" if r.get("error") else ""),
                          format_size(r["covered_bytes"]) + (f" ({', '.join(r['ranges'])})" if r["ranges"] else ""),
                          f"{r['interval_ms']} ms", _when(r["last_sync_at"]),
                          "-" if r["lag_seconds"] is None else f"{r['lag_seconds']:.1f} s",
                          f"{r['syncs']} ({r['full_syncs']} full)", r["last_pages"], r["pages_copied"],
                          repair_text(r.get("last_repair"))] for r in rows])


def repair_text(report: dict[str, Any] | None) -> str:
    if not report:
        return "-"
    return f"{report['gpa']}: {'exact' if report['exact'] else 'STALE'}, {'resumed' if report['resumed'] else 'paused'}"


def cmd_mirror(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        if args.stop or args.sync:
            if args.ranges:
                raise UsageError("--range is for starting a mirror, not with --stop or --sync")
            result = mirror.stop(host, args.domain) if args.stop else mirror.sync(host, args.domain)
        else:
            result = mirror.start(host, args.domain, args.ranges, args.interval)
    if args.stop:
        common.print_result(args.json, result, lambda: common.literal(
            f"domain {result['domain']} is no longer mirrored ({result['syncs']} syncs, "
            f"{result['pages_copied']} pages copied)"))
    else:
        common.print_result(args.json, result, lambda: common.literal(
            f"domain {result['domain']} mirrored: {format_size(result['covered_bytes'])} in {result['target']}; "
            f"{result['last_pages']} pages copied ({result['last_reason']}) in {result['last_seconds']:.3f} s" +
            ("" if args.sync else f"; hvextd syncs it every {result['interval_ms']} ms")))
    return 0


def cmd_mirror_status(args: argparse.Namespace) -> int:
    if args.domain is None:
        rows = mirror.status()
    else:
        with common.open_host(args) as host:
            rows = mirror.status(host, args.domain)
    common.print_result(args.json, rows if args.domain is None else rows[0], lambda: mirror_table(rows))
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        report = mirror.inject_memory_error(host, args.domain, args.gpa, readable=args.readable,
                                            resume_stale=args.resume_stale)
    common.print_result(args.json, report, lambda: common.literal(
        f"{report['gpa']} (page {report['page']}) of {report['domain']}: {report['action']}; "
        f"guest {'resumed' if report['resumed'] else 'left paused'} after {report['paused_ms']:.1f} ms "
        f"({'; '.join(report['events'])})"))
    return 0


# -- C18: baselines and recovery of dirty data ----------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError("seconds from 0 to 86400")
    return value


def register_volatile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="copy a running RAM-file domain's RAM to a directory every host reaches and "
                                        "keep the list of pages dirtied since (hvextd), for `ha recover`")
    common.add_domain(p)
    p.add_argument("--dir", required=False, default=None, metavar="DIR",
                   help="a private directory (0700) on a file system every host of the cluster reaches")
    p.add_argument("--host", default=None, metavar="NAME",
                   help="this host's name in the cluster, as hvextd's [ha] host (default: the short host name)")
    p.add_argument("--refresh", type=_seconds, default=None, metavar="S",
                   help=f"seconds between hvextd's dirty-list refreshes (default {volatile.REFRESH_S:g})")
    p.add_argument("--every", type=_seconds, default=None, metavar="S",
                   help="hvextd takes a new baseline every S seconds (default 0: only this one)")
    p.add_argument("--stop", action="store_true", help="stop keeping the dirty pages (the baseline file stays)")
    common.add_json(p)
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("recover", help="run a domain here from its baseline plus the pages its source host lists "
                                       "as dirtied since (pulled from the source's hvextd)")
    common.add_domain(p)
    p.add_argument("--dir", required=True, metavar="DIR", help="the directory `ha baseline` wrote to")
    p.add_argument("--peer", default=None, metavar="HOST:PORT",
                   help="the source's hvextd peer address (default: the one the source registered in the cluster)")
    p.add_argument("--paused", action="store_true", help="leave the guest paused once its state is loaded")
    add_paths(p)
    common.add_json(p)
    p.set_defaults(func=cmd_recover)


def cmd_baseline(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        if args.stop:
            if args.dir or args.refresh is not None or args.every is not None:
                raise UsageError("--stop takes no --dir, --refresh or --every")
            if not volatile.forget(host, args.domain):
                raise UsageError(f"domain {args.domain!r} has no baseline on this host")
            result = {"domain": args.domain, "stopped": True}
        else:
            if args.dir is None:
                raise UsageError("--dir DIR is required (a private directory every host reaches)")
            result = volatile.take_baseline(host, args.domain, args.dir, args.host or cluster.default_name(),
                                            refresh_s=args.refresh, baseline_s=args.every)
    if args.stop:
        common.print_result(args.json, result, lambda: common.literal(
            f"domain {result['domain']}: dirty pages since its baseline no longer kept"))
    else:
        common.print_result(args.json, result, lambda: common.literal(
            f"baseline {result['epoch']} of {result['domain']}: {format_size(result['ram_bytes'])} in {result['file']} "
            f"({format_size(result['bytes_written'])} written, {result['seconds']:.2f} s); hvextd adds the dirty pages "
            f"every {result['refresh_s']:g} s"))
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    layout = layout_from(args)
    with common.open_host(args) as host:
        address = args.peer
        if address is None:
            meta = volatile.read_meta(args.dir, args.domain)
            client = cluster.client_for(layout)
            try:
                address = volatile.peer_address_of(client, meta["source_host"])
            finally:
                client.close()
        result = volatile.recover(host, args.domain, args.dir, layout.credentials(), address, paused=args.paused)
    common.print_result(args.json, result, lambda: common.literal(
        f"domain {result['domain']} runs here from baseline {result['epoch']} plus {result['dirty_pages']} dirty "
        f"pages pulled from {result['source_host']} ({format_size(result['wire_bytes'])} on the wire for "
        f"{format_size(result['dirty_bytes'])} dirty: {result['ratio']:.3f}x; device state "
        f"{format_size(result['state_bytes'])}) in {result['seconds']:.2f} s"))
    return 0


# -- C17: a standby copy of a domain's RAM ---------------------------------------------------------------


def cmd_protect_standby(args: argparse.Namespace) -> int:
    if args.shared_store is not None or args.replicas is not None:
        raise UsageError("--standby excludes --via-shared-store and --replicas")
    layout = layout_from(args)
    client = cluster.client_for(layout)
    try:
        address = volatile.peer_address_of(client, args.standby)
    finally:
        client.close()
    with common.open_host(args) as host:
        result = standby.protect(host, args.domain, args.standby, address, layout.credentials(),
                                 standby.DEFAULT_INTERVAL_S if args.sync_interval is None else args.sync_interval)
    common.print_result(args.json, result, lambda: common.literal(
        f"domain {result['domain']}: a copy of its RAM on {result['standby']} ({format_size(result['bytes_sent'])} "
        f"sent in {result['last_seconds']:.2f} s); hvextd refreshes it every {result['interval_s']:g} s"))
    return 0


def register_standby(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("failover", help="hand a domain protected with --standby over to its standby now: paused here, "
                                        "resumed there with the same RAM and processes")
    common.add_domain(p)
    common.add_json(p)
    p.set_defaults(func=cmd_failover)
    p = sub.add_parser("standby-status", help="each domain protected with --standby on this host: its copy's lag")
    p.add_argument("domain", metavar="DOMAIN", nargs="?", default=None, help="only this domain")
    common.add_json(p)
    p.set_defaults(func=cmd_standby_status)


def cmd_failover(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        report = standby.failover(host, args.domain)
    common.print_result(args.json, report, lambda: common.literal(
        f"domain {report['domain']} runs on {report['standby']}: down {report['downtime_s'] * 1000:.0f} ms, "
        f"{format_size(report['bytes_at_failover'])} sent at failover for {format_size(report['ram_bytes'])} of RAM"))
    return 0


def cmd_standby_status(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        rows = [r.status() for r in standby.records(host.host_id) if args.domain in (None, r.domain)]
    if args.domain is not None and not rows:
        raise UsageError(f"domain {args.domain!r} has no standby protection on this host")
    common.print_result(args.json, rows if args.domain is None else rows[0], lambda: common.literal("\n".join(
        f"{r['domain']}: {r['state']} on {r['standby']}" + (f" ({r['error']})" if r['error'] else "") +
        f", {r['syncs']} refreshes, lag {r['lag_seconds']} s" for r in rows) or "no standby protection here"))
    return 0
