"""Resource pool commands (C3): pool-create, pool-set, pool-remove, pool-list, pool-assign, pool-unassign, pool-apply.

The tree lives in hvext's pool store (``/var/lib/hvext/pools.sqlite``,
``$HVEXT_POOLS_DB`` overrides); the first command initialises it with the
host's memory as the root's capacity. Sizes are MiB when bare (``512``) or
carry a unit (``2G``, ``1.5GiB``). See docs/pools.md for the rules.

Every command that changes what VMs are entitled to (create, set, remove,
assign) then applies the bindings of the assigned running domains (memtune
limits, balloon: hvext.memory.bind); pool-unassign removes the domain's
limits. When libvirt is unreachable the tree change stands and a warning
says to run ``hvext pool-apply`` later.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from rich.tree import Tree

from hvext import aio
from hvext.cli import common
from hvext.errors import HvextError, LibvirtUnavailable, UsageError
from hvext.host import Host
from hvext.memory import bind, demand
from hvext.memory.demand import DomainFigures
from hvext.memory.pools import (
    DEFAULT_SHARES,
    ROOT,
    PoolNotEmptyError,
    ResourceTree,
    normalize_path,
)
from hvext.units import parse_size_mib

SHARE_LEVELS = {"low": 500, "normal": 1000, "high": 2000}  # vSphere's names for shares


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("pool-create", help="create a resource pool (or a VM leaf) in the pool tree")
    p.add_argument("path", metavar="PATH", help="pool path, e.g. /prod/web (its parent must exist)")
    _add_values(p, create=True)
    p.set_defaults(func=cmd_create)

    p = commands.add_parser("pool-set", help="change a pool's reservation, limit, shares or expandability")
    p.add_argument("path", metavar="PATH", help="pool path ('/' with --capacity only)")
    _add_values(p, create=False)
    p.add_argument("--capacity", help="with PATH '/': the host memory the tree divides")
    p.set_defaults(func=cmd_set)

    p = commands.add_parser("pool-remove", help="remove a pool (--recursive: with everything below it)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--recursive", action="store_true", help="remove its children too")
    p.set_defaults(func=cmd_remove)

    p = commands.add_parser("pool-list", help="the pool tree: settings, effective reservation, entitlement, usage")
    p.add_argument("path", metavar="PATH", nargs="?", default=ROOT, help="subtree to show (default '/')")
    common.add_json(p)
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("pool-assign", help="make a leaf pool the node of a domain (VMs are leaves)")
    common.add_domain(p)
    p.add_argument("path", metavar="PATH", help="a leaf pool, e.g. /prod/web/vm1")
    p.add_argument("--create", action="store_true", help="create the leaf first (default settings)")
    p.set_defaults(func=cmd_assign)

    p = commands.add_parser("pool-unassign", help="detach a domain from its leaf (the leaf stays)")
    common.add_domain(p)
    p.set_defaults(func=cmd_unassign)

    p = commands.add_parser("pool-apply", help="apply the assigned VMs' entitlements to the host "
                                               "(memtune hard/soft limits, balloon)")
    p.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    common.add_json(p)
    p.set_defaults(func=cmd_apply)


def _add_values(p: argparse.ArgumentParser, *, create: bool) -> None:
    p.add_argument("--reservation", metavar="SIZE", help="guaranteed memory, e.g. 2G (default 0)" if create
                   else "guaranteed memory, e.g. 2G")
    p.add_argument("--limit", metavar="SIZE", help="memory it may never exceed, or 'none' (default: none)")
    p.add_argument("--shares", metavar="N", help="weight against its siblings: a positive integer or "
                                                 f"low/normal/high (default {DEFAULT_SHARES})")
    if create:
        p.add_argument("--expandable", action="store_true",
                       help="may borrow reservation from its parent for its children")
    else:
        p.add_argument("--expandable", action=argparse.BooleanOptionalAction, default=None,
                       help="may (or, with --no-expandable, may not) borrow reservation from its parent")


# -- values ---------------------------------------------------------------


def _size(text: str, what: str) -> int:
    try:
        return parse_size_mib(text)
    except UsageError as err:
        raise UsageError(f"--{what}: {err}") from err


def _limit(text: str) -> int | None:
    return None if text.strip().lower() in ("none", "unlimited") else _size(text, "limit")


def _shares(text: str) -> int:
    if text.lower() in SHARE_LEVELS:
        return SHARE_LEVELS[text.lower()]
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--shares: {text!r} is not a positive integer or low/normal/high") from None
    if value <= 0:
        raise UsageError(f"--shares: must be positive, got {value}")
    return value


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if args.reservation is not None:
        changes["reservation_mib"] = _size(args.reservation, "reservation")
    if args.limit is not None:
        changes["limit_mib"] = _limit(args.limit)
    if args.shares is not None:
        changes["shares"] = _shares(args.shares)
    if args.expandable is not None:
        changes["expandable"] = args.expandable
    return changes


# -- the store ------------------------------------------------------------


def host_capacity_mib(args: argparse.Namespace) -> int:
    """The memory of the host the tree divides: libvirt's when a URI is given, else /proc/meminfo."""
    if args.uri:
        with common.open_host(args) as host:
            return demand.host_capacity_mib(host)
    return demand.host_capacity_mib(None)


def open_tree(args: argparse.Namespace) -> contextlib.AbstractContextManager[ResourceTree]:
    """The stored tree (created with the host's memory as capacity on first use)."""
    return demand.open_tree(host_capacity_mib(args))


def _describe(node: Any) -> str:
    limit = "none" if node.limit_mib is None else f"{node.limit_mib} MiB"
    return (f"reservation {node.reservation_mib} MiB, limit {limit}, shares {node.shares}, "
            f"{'expandable' if node.expandable else 'not expandable'}")


# -- commands -------------------------------------------------------------


def cmd_create(args: argparse.Namespace) -> int:
    changes = _changes(args)
    changes.setdefault("expandable", False)
    with open_tree(args) as tree:
        node = tree.create(args.path, **changes)
        common.console.print(f"Pool {node.path} created ({_describe(node)})")
        _bind(args, tree)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    changes = _changes(args)
    with open_tree(args) as tree:
        if args.capacity is not None:
            if args.path != ROOT or changes:
                raise UsageError("--capacity applies to the root '/' alone (use: hvext pool-set / --capacity SIZE)")
            node = tree.set_capacity(_size(args.capacity, "capacity"))
            common.console.print(f"Host capacity set to {node.reservation_mib} MiB")
            _bind(args, tree)
            return 0
        if not changes:
            raise UsageError("pool-set: give at least one of --reservation, --limit, --shares, "
                             "--expandable/--no-expandable")
        node = tree.modify(args.path, **changes)
        common.console.print(f"Pool {node.path} now has {_describe(node)}")
        _bind(args, tree)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    with open_tree(args) as tree:
        try:
            tree.remove(args.path, recursive=args.recursive)
        except PoolNotEmptyError as err:
            raise PoolNotEmptyError(str(err).replace("pass recursive=True", "pass --recursive")) from err
        common.console.print(f"Pool {args.path} removed" + (" with its subtree" if args.recursive else ""))
        _bind(args, tree)
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    with common.open_host(args) as host:
        domain = host.lookup(args.domain).name  # must exist (a UUID gives its name)
    with open_tree(args) as tree:
        if args.create and not tree.exists(args.path):
            node = tree.create(args.path, domain=domain)
        else:
            if not tree.exists(args.path):
                raise UsageError(f"no pool {args.path!r}: create it first (`hvext pool-create {args.path}`) "
                                 "or pass --create")
            node = tree.assign(domain, args.path)
        common.console.print(f"Domain '{domain}' assigned to {node.path}")
        _bind(args, tree)
    return 0


def cmd_unassign(args: argparse.Namespace) -> int:
    with open_tree(args) as tree:
        path = tree.unassign(args.domain)
        common.console.print(f"Domain '{args.domain}' unassigned from {path}")
        _release(args, args.domain)
        _bind(args, tree)
    return 0


# -- binding --------------------------------------------------------------


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _release(args: argparse.Namespace, domain: str) -> None:
    """Remove the memory limits of a domain that left its pool; warn when libvirt fails."""
    try:
        with common.open_host(args) as host:
            bind.release(host.lookup(domain))
    except HvextError as err:
        _warn(f"the memory limits of {domain!r} were not removed: {err}")


def _bind(args: argparse.Namespace, tree: ResourceTree) -> list[bind.Applied]:
    """Apply the bindings after a tree change; warn (the change stands) when libvirt or a domain fails."""
    if not tree.assignments():
        return []
    try:
        with common.open_host(args) as host:
            done = aio.run(bind.apply(host, tree))
    except HvextError as err:
        _warn(f"pool bindings not applied ({err}); `hvext pool-apply` applies them")
        return []
    for item in done:
        if item.error:
            _warn(f"{item.domain}: binding not applied: {item.error}")
    return done


def cmd_apply(args: argparse.Namespace) -> int:
    with open_tree(args) as tree, common.open_host(args) as host:
        done = aio.run(bind.apply(host, tree, dry_run=args.dry_run))

    def text() -> None:
        if not done:
            common.console.print("No domain is assigned to a pool")
        for item in done:
            name = common.literal(item.domain)
            if item.binding is None:
                common.console.print(f"{name}: {item.state}" + (f" ({common.literal(item.error)})" if item.error else "")
                                     + ", nothing applied")
                continue
            want = item.binding.memtune
            verb = "would set" if args.dry_run else "set"
            changes = ", ".join(f"{k} {v >> 10} MiB" for k, v in item.memtune_changes.items()) or "memtune unchanged"
            line = (f"{name}: hard_limit {want.hard_limit_kib >> 10} MiB, soft_limit {want.soft_limit_kib >> 10} MiB"
                    f" ({common.literal(item.binding.reason)}); {verb if item.memtune_changes else ''} {changes}")
            if item.balloon_target_mib is not None:
                line += f"; balloon target {verb} {item.balloon_target_mib} MiB"
            if item.error:
                line += f"; [red]failed[/]: {common.literal(item.error)}"
            common.console.print(line)

    common.print_result(args.json, {"dry_run": args.dry_run, "domains": [d.to_dict() for d in done]}, text)
    failed = [d for d in done if d.error]
    for item in failed:
        print(f"error: {item.domain}: binding not applied: {item.error}", file=sys.stderr)
    return 1 if failed else 0


# -- pool-list ------------------------------------------------------------


def domain_figures(args: argparse.Namespace, domains: list[str]) -> tuple[dict[str, DomainFigures], str | None]:
    """Current figures of the assigned domains from libvirt; (figures, why none) when it is unreachable."""
    if not domains:
        return {}, None
    try:
        host = Host(args.uri)
    except LibvirtUnavailable as err:
        return {}, str(err)
    try:
        return demand.domain_figures(host, domains), None
    finally:
        host.close()


def list_data(tree: ResourceTree, args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The tree as nested data with demand, entitlement and usage per node."""
    figures, libvirt_error = domain_figures(args, sorted(tree.assignments()))
    return demand.usage_tree(tree, figures), libvirt_error


def _find(data: dict[str, Any], path: str) -> dict[str, Any]:
    if data["path"] == path:
        return data
    for child in data["children"]:
        if path == child["path"] or path.startswith(child["path"] + "/"):
            return _find(child, path)
    raise UsageError(f"no pool {path!r}")


def _label(node: dict[str, Any]) -> str:
    """One node: its settings, then demand, entitlement and usage (all MiB)."""
    def mib(value: int | None) -> str:
        return "-" if value is None else str(value)

    if node["path"] == ROOT:
        head = f"[bold]/[/] capacity {mib(node['reservation_mib'])}"
        parts = [f"reserved {sum(c['effective_reservation_mib'] for c in node['children'])}"]
    else:
        head = f"[bold]{node['name']}[/]" + (" [dim](expandable)[/]" if node["expandable"] else "")
        if node.get("domain"):
            head += f" [cyan]vm {node['domain']}[/] ({node.get('domain_state', '?')})"
        parts = [f"res {mib(node['reservation_mib'])}", f"limit {mib(node['limit_mib'])}",
                 f"shares {node['shares']}", f"eff.res {mib(node['effective_reservation_mib'])}"]
    parts += [f"demand {mib(node['demand_mib'])}", f"entitled {mib(node.get('entitlement_mib'))}",
              f"used {mib(node['usage_mib'])}"]
    return f"{head}  " + " · ".join(parts)


def cmd_list(args: argparse.Namespace) -> int:
    with open_tree(args) as tree:
        data, libvirt_error = list_data(tree, args)
    subtree = _find(data, normalize_path(args.path))

    def grow(branch: Tree, node: dict[str, Any]) -> None:
        for child in node["children"]:
            grow(branch.add(_label(child)), child)

    def text() -> None:
        view = Tree(_label(subtree))
        grow(view, subtree)
        common.console.print(view)
        common.console.print("[dim]MiB; res: reservation, eff.res: effective reservation; demand: balloon actual of "
                             "running assigned VMs; entitled: their share of the host by reservation, limit and "
                             "shares; used: RSS of their QEMU processes[/]")
        if libvirt_error:
            common.console.print(f"libvirt unavailable, no demand or usage: {common.literal(libvirt_error)}")

    common.print_result(args.json, {"tree": subtree, "libvirt_error": libvirt_error}, text)
    return 0
