"""hvextd's placement loop: keep hot PMEM ranges in host DRAM, cold ones on their tier (C15, second half).

Every ``interval_s`` it asks each running hvext VM with pmem devices for its hints (validated:
hvext.pmem.hints), splits ``budget_mib`` of host DRAM among the VMs max-min fairly by what their hot
ranges want, and applies each VM's plan (hvext.pmem.placement: ``MADV_WILLNEED`` on kept ranges, the
``cold`` advice on the rest). The policy's state (what each VM kept, for the hysteresis) lives for the
life of the loop. A VM whose hints or placement fail is logged and skipped this round: it never stops
the others. Config: the ``[placement]`` section (hvext/daemon/config.py); off unless ``enabled = true``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hvext.errors import DomainNotFound, HvextError, UsageError
from hvext.host import Domain, Host
from hvext.memory import swap
from hvext.pmem import devices, hints, placement, virtio
from hvext.pmem.placement_policy import Params, VMState, split_budget
from hvext.units import MIB

log = logging.getLogger("hvextd.placement")

HINTS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PlacementConfig:
    """The ``[placement]`` section (keys documented in hvext/daemon/config.py)."""

    KEYS: ClassVar[tuple[str, ...]] = ("enabled", "interval_s", "budget_mib", "cold", "linger_rounds", "domains")
    enabled: bool = False
    interval_s: float = 30.0
    budget_mib: int = 1024
    cold: str = "cold"
    linger_rounds: int = 2
    domains: tuple[str, ...] = field(default=())

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> PlacementConfig:
        domains = table.get("domains", [])
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise UsageError(f'domains: must be a list of domain names, e.g. ["web1"], not {domains!r:.80}')
        return cls(**{k: tuple(v) if k == "domains" else v for k, v in table.items()}).validate()

    def validate(self) -> PlacementConfig:
        """This config, or UsageError naming the first bad value."""
        def integer(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if not isinstance(self.enabled, bool):
            raise UsageError(f"enabled: must be true or false, not {self.enabled!r:.80}")
        if not (isinstance(self.interval_s, (int, float)) and not isinstance(self.interval_s, bool)
                and math.isfinite(self.interval_s) and 1 <= self.interval_s <= 86400):
            raise UsageError(f"interval_s: must be a number of seconds from 1 to 86400, not {self.interval_s!r:.80}")
        if not (integer(self.budget_mib) and 0 <= self.budget_mib <= 1 << 30):
            raise UsageError(f"budget_mib: must be an integer from 0 to {1 << 30}, not {self.budget_mib!r:.80}")
        if self.cold not in placement.COLD_ADVICE:
            raise UsageError(f"cold: must be \"cold\" (MADV_COLD) or \"pageout\" (MADV_PAGEOUT), "
                             f"not {self.cold!r:.80}")
        if not (integer(self.linger_rounds) and 0 <= self.linger_rounds <= 1000):
            raise UsageError(f"linger_rounds: must be an integer from 0 to 1000, not {self.linger_rounds!r:.80}")
        return self


def _candidates(host: Host, config: PlacementConfig) -> list[tuple[Domain, int, set[str]]]:
    """Running hvext VMs with pmem devices to place: (domain, QEMU pid, backings of the *other* running
    VMs -- whether placed or not, their pages are theirs)."""
    backings: dict[str, list[str]] = {}
    chosen: list[Domain] = []
    for domain in host.domains(include_inactive=False):
        try:
            backings[domain.name] = [str(d.path) for d in devices.list_devices(domain) + virtio.list_devices(domain)]
            if backings[domain.name] and (not config.domains or domain.name in config.domains) \
                    and domain.facts().hvext_managed:
                chosen.append(domain)
        except DomainNotFound:
            continue  # gone since the listing: maps nothing any more
        except HvextError as err:  # its backings are unknown: any of them might be one a VM here has
            log.warning("no placement this round: the devices of %s cannot be read: %s", domain.name, err)
            return []
    found = []
    for domain in chosen:
        others = {b for other, paths in backings.items() if other != domain.name for b in paths}
        try:
            found.append((domain, swap.qemu_pid(domain.name), others))
        except HvextError as err:
            log.warning("skipping %s this round: %s", domain.name, err)
    return found


async def one_round(host: Host, config: PlacementConfig, states: dict[str, VMState]) -> list[dict[str, Any]]:
    """Hints of every candidate VM, the budget split, each VM's plan applied; returns the reports."""
    params = Params(config.linger_rounds)
    gathered: list[tuple[Domain, int, list[placement.Device]]] = []
    for domain, pid, others in await asyncio.to_thread(_candidates, host, config):
        try:
            validated = await hints.fetch(domain, timeout=HINTS_TIMEOUT_S)
            found = await asyncio.to_thread(placement.devices_of, pid, validated, others)
        except HvextError as err:
            log.warning("no placement for %s this round: %s", domain.name, err)
            continue
        gathered.append((domain, pid, found))
    names = {domain.name for domain, _, _ in gathered}
    for gone in set(states) - names:
        del states[gone]
    shares = split_budget({d.name: placement.domain_demand(found, states.get(d.name), params)
                           for d, _, found in gathered}, config.budget_mib * MIB)
    reports = []
    for domain, pid, found in gathered:
        try:
            report, states[domain.name] = await asyncio.to_thread(
                placement.place, domain.name, pid, found, shares[domain.name], states.get(domain.name), params,
                cold=config.cold, act=True)
        except HvextError as err:
            log.warning("placement of %s failed: %s", domain.name, err)
            continue
        for device in report["devices"]:
            after = device["after"]
            log.info("placement of %s %s: keep %d MiB of %d MiB hot (share %d MiB), hot resident %d MiB, "
                     "cold resident %d MiB", domain.name, device["backing"], device["keep_bytes"] // MIB,
                     device["hot_bytes"] // MIB, shares[domain.name] // MIB, after["hot_resident_bytes"] // MIB,
                     after["cold_resident_bytes"] // MIB)
        reports.append(report)
    return reports


async def run(host: Host, config: PlacementConfig, stopping: asyncio.Event) -> None:
    """Rounds every interval until *stopping* is set; a failing round is logged, never fatal."""
    states: dict[str, VMState] = {}
    missing = {name: why for name, why in placement.madvise_support().items() if why}
    if missing:
        log.error("placement is off: this host kernel's process_madvise refuses %s", ", ".join(sorted(missing)))
        return
    while not stopping.is_set():
        try:
            await one_round(host, config, states)
        except HvextError as err:
            log.error("placement round failed: %s", err)
        except Exception:
            log.exception("placement round failed unexpectedly; the next one runs in %s s", config.interval_s)
        try:
            await asyncio.wait_for(stopping.wait(), config.interval_s)
        except asyncio.TimeoutError:
            pass
