"""C13: PMEM high availability through a shared store (``hvext ha protect DOMAIN --via-shared-store DIR``).

A protected domain's volatile-backed PMEM devices are registered for power-loss saves
(:mod:`hvext.pmem.power`) with their stores in ``DIR/<domain>/<device>``, a directory every host
of the cluster reaches (a shared file system; the lab's hosts share ``/var/lib/hvext``). Then:

* **Battery path** (SIGPWR to the owner's hvextd): hvextd saves the devices as for any power
  loss (guest paused), then :func:`hand_off_after_power_loss` destroys the paused guest (it can
  never run here again: fencing), records the saved generations in ``/hvext/final/<domain>``,
  drops the devices' registrations here (a reboot of this host must not start the guest from
  its registry) and hands the domain to a live host in one etcd transaction (owner key deleted,
  home = the survivor), so the survivor claims it at its next renewal, not after this host's
  lease TTL.
* **Claim** (:func:`restore_from_shared_store`, through :func:`hvext.ha.restore.restore_pmem`):
  the claimer writes each backing file from its store, after checking that the store holds at
  least the final generation (RPO 0); without a final record (the owner died abruptly) it
  restores the last save there is and says so (``complete`` False).
* **After the start** (:func:`after_start`): the devices are registered for power-loss saves on
  the new owner, with the same stores.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

from hvext import paths
from hvext.errors import DomainNotFound, HAError, HvextError, UsageError
from hvext.ha import policy, protection
from hvext.ha.client import FINAL_PREFIX, Client, Protection
from hvext.ha.restore import RestoreReport
from hvext.host import Domain, Host
from hvext.pmem import devices, power, virtio
from hvext.pmem.devices import PmemDevice
from hvext.pmem.store import Store, StoreError, make_store_dir

log = logging.getLogger(__name__)

MODE = "shared-store"
MAX_DEVICES = 64


class SharedStoreError(HAError):
    """A shared-store protection cannot be set up, saved or restored."""


class SharedStoreUsageError(SharedStoreError, UsageError):
    """``--via-shared-store`` was given a directory or domain it cannot use."""


def check_dir(directory: str | os.PathLike[str]) -> Path:
    """DIR of ``--via-shared-store``: absolute, an existing directory (not a link), not in volatile
    memory, owned by this user and private (no group or other access), as power stores are."""
    text = os.fspath(directory)
    if not os.path.isabs(text):
        raise SharedStoreUsageError(f"shared store {text!r:.200} must be an absolute path")
    path = Path(os.path.normpath(text))
    try:
        info = os.lstat(path)
    except OSError as err:
        raise SharedStoreUsageError(f"shared store {path}: {err.strerror}; create it (mode 0700) on the "
                                    "shared file system first") from err
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise SharedStoreUsageError(f"shared store {path} is not a directory (a link is refused too)")
    resolved = path.resolve()
    if resolved.is_relative_to(Path("/dev/shm")) or resolved.is_relative_to(paths.VOLATILE_DIR.resolve()):
        raise SharedStoreUsageError(f"shared store {path} is in volatile memory; give a directory on a "
                                    "file system that survives the host (and that every host reaches)")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise SharedStoreUsageError(f"shared store {path} must be private: owned by this user, mode 0700 "
                                    f"(it is {stat.S_IMODE(info.st_mode):04o}, uid {info.st_uid}); the stores "
                                    "hold guest memory")
    return path


def domain_devices(dom: Domain) -> list[PmemDevice]:
    """The domain's NVDIMM and hvext virtio-pmem devices (the definition's, as the record stores it)."""
    return devices.parse_devices(dom.xml(inactive=True)) + virtio.list_devices(dom)


def _volatile(domain: str, backing: Path) -> bool:
    """*backing* is a file directly in ``VOLATILE_DIR/<domain>`` (where --volatile-backing puts it)."""
    return backing.parent == paths.VOLATILE_DIR / domain and backing.name not in ("", ".", "..") \
        and os.path.normpath(backing) == str(backing)


def protect(client: Client, host: Host, domain: str, home: str, directory: str | os.PathLike[str]) \
        -> dict[str, Any]:
    """``ha protect DOMAIN --via-shared-store DIR``: register the domain's volatile-backed PMEM devices
    for power-loss saves with stores under ``DIR/<domain>/``, then store the protection record with
    ``pmem = {"mode": "shared-store", "dir": DIR, "devices": [...]}``. All or nothing: registrations
    made here are undone when a later step fails."""
    base = check_dir(directory)
    dom = host.lookup(domain)
    found = domain_devices(dom)
    if not found:
        raise SharedStoreUsageError(f"domain {dom.name!r} has no pmem device; `hvext ha protect {dom.name}` "
                                    "without --via-shared-store protects it")
    if len(found) > MAX_DEVICES:
        raise SharedStoreUsageError(f"domain {dom.name!r} has more than {MAX_DEVICES} pmem devices")
    for device in found:
        if not _volatile(dom.name, device.path):
            raise SharedStoreUsageError(
                f"pmem device backed by {device.path} of {dom.name!r} is not volatile-backed (in "
                f"{paths.VOLATILE_DIR / dom.name}); --via-shared-store saves volatile devices: put a "
                "file-backed device's file on the shared file system and protect the domain without it")
    existing = {r.backing: r for r in power.registrations() if r.domain == dom.name}
    store_root = base / dom.name
    made: list[Path] = []
    entries = []
    try:
        for device in found:
            store = store_root / device.path.stem
            reg = existing.get(str(device.path))
            if reg is not None and Path(reg.store) != store:
                raise SharedStoreUsageError(
                    f"{device.path} of {dom.name!r} is already saved on power loss to {reg.store}, not under "
                    f"{base}; `hvext power unprotect {dom.name} {device.path}` first")
            if reg is None:
                make_store_dir(store_root)
                power.protect(dom, device.path, store)
                made.append(device.path)
            entries.append({"alias": device.alias, "model": device.model, "size": device.size,
                            "backing": str(device.path), "store": str(store)})
        pmem = {"mode": MODE, "dir": str(base), "devices": entries}
        result = protection.protect(client, host, dom.name, home, pmem=pmem)
    except BaseException:
        for backing in made:
            power.unprotect(dom.name, backing, remove_store=True, missing_ok=True)
        raise
    return {**result, "pmem": pmem}


def checked_devices(record: Protection) -> tuple[Path, list[dict[str, Any]]]:
    """The record's shared directory and devices, checked: each backing is a file in
    ``VOLATILE_DIR/<domain>``, each store a directory in ``DIR/<domain>``, sizes positive.
    (The record comes from etcd, writable by every cluster member; the restore runs as root.)"""
    pmem = record.pmem or {}
    base, items = pmem.get("dir"), pmem.get("devices")
    if not isinstance(base, str) or not os.path.isabs(base) or os.path.normpath(base) != base:
        raise SharedStoreError(f"protection record of {record.domain!r}: bad shared store {base!r:.200}")
    if not isinstance(items, list) or not 0 < len(items) <= MAX_DEVICES:
        raise SharedStoreError(f"protection record of {record.domain!r}: no device list")
    out = []
    for item in items:
        backing = item.get("backing") if isinstance(item, dict) else None
        store = item.get("store") if isinstance(item, dict) else None
        size = item.get("size") if isinstance(item, dict) else None
        if not isinstance(backing, str) or not _volatile(record.domain, Path(backing)):
            raise SharedStoreError(f"protection record of {record.domain!r}: backing {backing!r:.200} is not "
                                   f"a file in {paths.VOLATILE_DIR / record.domain}")
        if not isinstance(store, str) or os.path.normpath(store) != store \
                or Path(store).parent != Path(base) / record.domain:
            raise SharedStoreError(f"protection record of {record.domain!r}: store {store!r:.200} is not in "
                                   f"{Path(base) / record.domain}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 50:
            raise SharedStoreError(f"protection record of {record.domain!r}: bad size {size!r:.40}")
        out.append({"backing": backing, "store": store, "size": size})
    return Path(base), out


def final_generations(final: dict[str, Any] | None, domain: str) -> dict[str, int] | None:
    """The final record's generation per backing (None: no final record); HAError when malformed."""
    if final is None:
        return None
    gens = final.get("generation")
    if not isinstance(gens, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                             and v >= 0 for k, v in gens.items()):
        raise SharedStoreError(f"final record of {domain!r} has no generation per device: {gens!r:.200}")
    return dict(gens)


def restore_from_shared_store(record: Protection, host_name: str, *, uri: str | None = None,
                              final: dict[str, Any] | None = None) -> RestoreReport:
    """Write the domain's backing files from their stores before it starts here (see the module doc).

    Nothing is written when the domain already runs here, or when its home re-adopts it (after its
    own fence) without a final record and still has every backing file (they are newer than the
    stores). Raises HvextError/OSError; :func:`hvext.ha.restore.restore_pmem` makes that a report."""
    started = time.perf_counter()
    base, items = checked_devices(record)
    gens = final_generations(final, record.domain)
    final_host = final.get("host") if final is not None and isinstance(final.get("host"), str) else None

    def report(**fields: Any) -> RestoreReport:
        return RestoreReport(record.domain, host_name, MODE, final_host=final_host,
                             seconds=round(time.perf_counter() - started, 4), **fields)

    with Host(uri) as host:
        try:
            if host.lookup(record.domain).is_active():
                return report(ok=True, performed=False, action="kept (the domain runs on this host)")
        except DomainNotFound:
            pass
        if gens is None and record.home == host_name and all(os.path.isfile(i["backing"]) for i in items):
            return report(ok=True, performed=False,
                          action="kept (its home re-adopted it and has its pmem files, newer than the stores)")
        stores = []
        for item in items:
            try:
                store = Store.open(Path(item["store"]))
            except StoreError as err:
                raise SharedStoreError(f"cannot open the store {item['store']} (is {base} mounted here?): "
                                       f"{err}") from err
            if store.size != item["size"]:
                raise SharedStoreError(f"store {item['store']} holds {store.size} bytes, the device has "
                                       f"{item['size']}")
            wanted = None if gens is None else gens.get(item["backing"])
            if gens is not None and wanted is None:
                raise SharedStoreError(f"the final record of {record.domain!r} (by {final_host}) names no "
                                       f"generation for {item['backing']}")
            if wanted is not None and store.generation < wanted:
                raise SharedStoreError(
                    f"store {item['store']} holds generation {store.generation}, but {final_host} saved "
                    f"generation {wanted} on its battery path: this host does not see the final save yet "
                    "(shared file system not consistent?); not starting with older pmem")
            stores.append((item, store))
        owner = host.qemu_user()
        paths.volatile_dir(record.domain, owner[1])
        restored, generation = [], {}
        for item, store in stores:
            result = store.restore(Path(item["backing"]), owner=owner)
            generation[item["backing"]] = result["generation"]
            restored.append({"backing": item["backing"], "store": item["store"], **result})
    complete = gens is not None
    action = f"restored from {base}" + ("" if complete else " (no final save recorded: the stores' last save)")
    return report(ok=True, performed=True, action=action, generation=generation, complete=complete,
                  devices=restored)


def after_start(record: Protection, host_name: str, uri: str | None, client: Client) -> None:
    """The domain runs here now: register its devices for power-loss saves on this host, to the same
    stores (a registration left by an earlier owner in a shared registry is taken over: no pending
    restore, no dirty log of another QEMU)."""
    _, items = checked_devices(record)
    with Host(uri) as host:
        dom = host.lookup(record.domain)
        with power.registry() as regs:
            taken = {r.backing for r in regs if r.domain == record.domain}
            for reg in regs:
                if reg.domain == record.domain:
                    reg.pending, reg.dirty_log, reg.uuid = None, None, dom.uuid()
        for item in items:
            if item["backing"] not in taken:
                power.protect(dom, Path(item["backing"]), Path(item["store"]))
    log.info("protected domain %s: its pmem devices are saved to %s on power loss here", record.domain,
             ", ".join(i["store"] for i in items))


def hand_off_after_power_loss(client: Client, host_name: str, uri: str | None, report: dict[str, Any],
                              owned: list[str]) -> dict[str, str]:
    """After a power-loss save on the owner: for each shared-store domain this host owns whose every
    device was saved, destroy the (paused) guest, record ``/hvext/final/<domain>``, drop the devices'
    registrations here and hand the domain to the live host the rendezvous hash prefers. One domain's
    failure does not stop the others. Domain -> what happened (also logged)."""
    records, _ = client.protected()
    live = sorted(set(client.hosts()) - {host_name})
    outcomes: dict[str, str] = {}
    for name in owned:
        record = records.get(name)
        if record is None or (record.pmem or {}).get("mode") != MODE:
            continue
        try:
            outcomes[name] = _hand_off(client, host_name, uri, report, record, live)
            log.warning("power loss: protected domain %s: %s", name, outcomes[name])
        except HvextError as err:
            outcomes[name] = f"error: {err}"
            log.error("power loss: protected domain %s not handed off: %s; another host claims it after this "
                      "host's lease ends, from the stores' last complete save", name, err)
    return outcomes


def _hand_off(client: Client, host_name: str, uri: str | None, report: dict[str, Any], record: Protection,
              live: list[str]) -> str:
    _, items = checked_devices(record)
    saved = {e.get("backing"): e for e in report.get("devices", []) if e.get("domain") == record.domain}
    generation = {}
    for item in items:
        entry = saved.get(item["backing"])
        if entry is None or "error" in entry or not isinstance(entry.get("generation"), int) \
                or not entry.get("paused"):
            why = "not saved" if entry is None else entry.get("error") or "not paused while saved"
            raise SharedStoreError(f"device {item['backing']} was not saved on this power loss ({why})")
        generation[item["backing"]] = entry["generation"]
    with Host(uri) as host:  # paused since the save; now it can never run here again
        try:
            dom = host.lookup(record.domain)
            if dom.is_active():
                dom.destroy()
        except DomainNotFound:
            pass
    client.put_record(FINAL_PREFIX, record.domain, {"host": host_name, "generation": generation,
                                                    "at": round(time.time(), 3)})
    for item in items:
        power.unprotect(record.domain, Path(item["backing"]), missing_ok=True)
    target = policy.preferred_host(record.domain, live)
    if target is None:  # released: the first host to claim it restores the final save (this one too,
        client.release(record.domain, host_name)  # after its no-claims time, if its power holds)
        return "saved, stopped and released; no other live host: the first host to claim it restores it"
    if not client.hand_off(record, host_name, target):
        return f"saved and stopped; the hand-off to {target} did not apply (ownership or record changed)"
    return f"saved (generation {generation}), stopped and handed off to {target}"
