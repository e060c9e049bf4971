"""Pools that bind (C3): apply each assigned VM's entitlement to the host, the actor.

:mod:`hvext.memory.memtune` decides; this module reads the figures it needs
(boot RAM, balloon actual, entitlements from the pool tree) and applies the
decision through libvirt: memtune ``hard_limit`` and ``soft_limit`` on the
running domain and in its definition (``virDomainSetMemoryParameters``, which
writes the QEMU process's cgroup), and a smaller balloon target when the pool
limits leave the VM less than its balloon holds. Idempotent: only values that
differ are changed, so ``hvext pool-apply`` and every round of hvextd's loop
can run it. One domain's failure is recorded in its result and never stops
the others.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hvext.errors import DomainNotFound, HvextError
from hvext.host import Domain, Host
from hvext.memory import balloon, demand
from hvext.memory.memtune import UNLIMITED_KIB, BindInput, Binding, Memtune, decide, memtune_changes
from hvext.memory.pools import ResourceTree
from hvext.units import MIB

log = logging.getLogger(__name__)


@dataclass
class Applied:
    """What was (or, in a dry run, would be) done to one assigned domain."""

    domain: str
    state: str  # running, a libvirt state (shut off, ...), missing (undefined), error (unreadable)
    binding: Binding | None = None
    memtune_before: Memtune | None = None
    memtune_changes: dict[str, int] = field(default_factory=dict)
    balloon_target_mib: int | None = None  # the target set (None: unchanged)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain, "state": self.state,
            "binding": self.binding.to_dict() if self.binding else None,
            "memtune_before": vars(self.memtune_before) if self.memtune_before else None,
            "memtune_changes": self.memtune_changes,
            "balloon_target_mib": self.balloon_target_mib, "error": self.error,
        }


def current_memtune(domain: Domain) -> Memtune:
    """The running domain's memtune hard and soft limits (KiB)."""
    params = domain.memory_parameters(live=True)
    return Memtune(params.get("hard_limit", UNLIMITED_KIB), params.get("soft_limit", UNLIMITED_KIB))


def plan(host: Host, tree: ResourceTree, names: Iterable[str] | None = None) -> tuple[list[Applied], dict[str, Domain]]:
    """Decide the binding of every running domain assigned in *tree* (or of *names* among them).

    Blocking (libvirt). Domains that are off, gone or unreadable get an
    :class:`Applied` without a binding saying why.
    """
    assigned = tree.assignments()
    wanted = sorted(assigned if names is None else (n for n in names if n in assigned))
    results: dict[str, Applied] = {}
    running: dict[str, Domain] = {}
    boot: dict[str, int] = {}
    actual: dict[str, int] = {}
    for name in wanted:
        try:
            dom = host.lookup(name)
            if not dom.is_active():
                results[name] = Applied(name, dom.state.value)
                continue
            boot[name] = balloon.boot_memory(dom) // MIB
            actual[name] = demand.demand_bytes(dom) // MIB
            running[name] = dom
            results[name] = Applied(name, "running")
        except DomainNotFound:
            results[name] = Applied(name, "missing")  # assigned, then undefined: nothing to bind
        except HvextError as err:
            results[name] = Applied(name, "error", error=str(err))
    # The tree divides among every running assigned domain, not only those asked about.
    demands = dict(actual)
    for name in assigned:
        if name not in demands and names is not None:
            try:
                dom = host.lookup(name)
                if dom.is_active():
                    demands[name] = demand.demand_bytes(dom) // MIB
            except HvextError:
                continue
    entitled = demand.entitlements(tree, demands)
    limited = demand.limited_entitlements(tree, demands)
    reserved = demand.reserved_entitlements(tree, demands)
    for name in running:
        results[name].binding = decide(BindInput(name, boot[name], actual[name], entitled.get(name, 0),
                                                 limited.get(name, 0), reserved.get(name, 0)))
    return [results[n] for n in wanted], running


async def _shrink_balloon(domain: Domain, target_mib: int) -> int | None:
    """Lower the balloon target to *target_mib* (not below what the guest can spare); the target set, or None."""
    recorded = await asyncio.to_thread(balloon.recorded_target, domain)
    actual = (await balloon.read_balloon(domain))[0]
    current = min(recorded.bytes, actual) if recorded is not None else actual
    target = target_mib * MIB
    available, _source = await balloon.guest_available(domain)
    if available is not None:
        target = max(target, balloon.safe_floor(actual, available))
    if target >= current - MIB:  # already there (or the guest cannot give more): nothing to do
        return None
    done = await balloon.apply_target(domain, target)
    return done.target // MIB


async def apply_one(item: Applied, domain: Domain, *, dry_run: bool) -> Applied:
    """Apply *item*'s binding to *domain*: the balloon first (the guest gives memory back), then memtune.

    A balloon that cannot move (no QMP, a guest that cannot spare it) is
    recorded as the error and the limits are applied all the same.
    """
    binding = item.binding
    assert binding is not None
    try:
        item.memtune_before = await asyncio.to_thread(current_memtune, domain)
        item.memtune_changes = memtune_changes(binding.memtune, item.memtune_before)
        if dry_run:
            item.balloon_target_mib = binding.balloon_target_mib
            return item
        if binding.balloon_target_mib is not None:
            try:
                item.balloon_target_mib = await _shrink_balloon(domain, binding.balloon_target_mib)
            except HvextError as err:  # the hard limit binds all the same
                item.error = f"balloon not moved: {err}"
                log.warning("%s: balloon not moved to its pool limit: %s", domain.name, err)
        if item.memtune_changes:
            persistent = await asyncio.to_thread(domain.is_persistent)
            await asyncio.to_thread(domain.set_memory_parameters, item.memtune_changes, live=True, config=persistent)
            log.info("%s: memtune %s (%s)", domain.name, item.memtune_changes, binding.reason)
    except HvextError as err:
        item.error = str(err)
        log.warning("%s: pool binding not applied: %s", domain.name, err)
    return item


async def apply(host: Host, tree: ResourceTree, names: Iterable[str] | None = None, *,
                dry_run: bool = False) -> list[Applied]:
    """Decide and apply the bindings of the assigned domains (all, or *names*); one failure stops no other."""
    items, running = await asyncio.to_thread(plan, host, tree, names)
    for item in items:
        if item.binding is not None:
            await apply_one(item, running[item.domain], dry_run=dry_run)
    return items


def release(domain: Domain) -> None:
    """Remove the hard and soft limits of a domain leaving its pool (running domain and definition)."""
    unlimited = Memtune().to_params()
    active = domain.is_active()
    if active:
        domain.set_memory_parameters(unlimited, live=True, config=domain.is_persistent())
    elif domain.is_persistent():
        domain.set_memory_parameters(unlimited, live=False, config=True)
