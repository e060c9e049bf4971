"""Snapshots of a guest's PMEM device in an NVM region (C14 guest integration).

Each device gets an :class:`hvext.pmem.region.NVMRegion` whose running point
mirrors the device as of the last snapshot or restore. ``snapshot`` pauses the
guest, copies into the running point only the region blocks whose bytes differ
from the device (a byte compare: the region's NVM tier is local and fast), then
takes the snapshot; ``restore`` writes a snapshot's blocks that differ back into
the backing file (guest paused or off); ``purge`` moves blocks only snapshots
hold to mass storage.

Where a device's region lives is recorded in
``STATE_DIR/pmem-regions/<domain>/<backing stem>/region.json`` (NVM and mass
directories; by default both on disk under that directory; ``--nvm-dir`` can
put the NVM tier on /dev/shm or a pmem mount).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hvext import durable, paths
from hvext.agent import protocol
from hvext.errors import DomainStateError, HvextError, UsageError
from hvext.host import Domain, RunState
from hvext.pmem import devices, hints, virtio
from hvext.pmem.devices import PmemDevice
from hvext.pmem.region import NVMRegion, RegionNotFound
from hvext.units import KIB, MIB

CHUNK = 4 * MIB  # bytes compared per step (a multiple of every allowed block size)
DEFAULT_BLOCK_SIZE = 64 * KIB
#: Longest ``region.json`` read (it holds three paths; anything longer is damaged).
MAX_CONFIG = MIB


class GuestSnapshotError(HvextError):
    """A guest PMEM snapshot, restore or purge failed."""


def resolve_device(domain: Domain, spec: str) -> PmemDevice:
    """The device named by its backing path, its alias (nvdimm0, hvext-vpmem0) or its backing file's stem."""
    xml = domain.xml()
    inactive = domain.xml(inactive=True) if domain.is_persistent() else xml
    found = {d.path: d for d in devices.parse_devices(inactive) + devices.parse_devices(xml)}
    found.update({d.path: d for d in virtio.list_devices(domain)})
    for device in found.values():
        if spec in (str(device.path), device.alias, device.path.stem, device.path.name):
            return device
    raise UsageError(f"domain {domain.name!r} has no pmem device {spec!r} (give its backing path or alias; "
                     f"`hvext pmem-list {domain.name}` shows them)")


def config_path(domain: Domain, device: PmemDevice) -> Path:
    return paths.STATE_DIR / "pmem-regions" / domain.name / device.path.stem / "region.json"


def _read_config(config: Path) -> dict[str, str]:
    """The record *config* (``backing``, ``nvm_dir``, ``mass_dir``: strings), read within bounds; a
    damaged or unreadable one is a :class:`GuestSnapshotError` naming it."""
    try:
        with open(config, "rb") as handle:
            raw = handle.read(MAX_CONFIG + 1)
    except OSError as err:
        raise GuestSnapshotError(f"cannot read {config}: {err}") from err
    if len(raw) > MAX_CONFIG:
        raise GuestSnapshotError(f"{config} is damaged: longer than {MAX_CONFIG} bytes")
    try:
        where = protocol.loads(raw, GuestSnapshotError, "the file")  # too deep, huge numbers, not JSON
    except GuestSnapshotError as err:
        raise GuestSnapshotError(f"{config} is damaged: {err}") from err
    if not isinstance(where, dict) or not all(isinstance(where.get(k), str) for k in ("backing", "nvm_dir",
                                                                                       "mass_dir")):
        raise GuestSnapshotError(f"{config} is damaged: not an object of backing, nvm_dir and mass_dir paths")
    return where


def open_region(domain: Domain, device: PmemDevice, *, create: bool = False, strategy: str = "virtblocks",
                block_size: int = DEFAULT_BLOCK_SIZE, nvm_dir: Path | None = None,
                mass_dir: Path | None = None) -> NVMRegion:
    """The device's region; with *create*, made on first use (the options only apply then)."""
    config = config_path(domain, device)
    if config.exists():
        where = _read_config(config)
        if where["backing"] != str(device.path):
            raise GuestSnapshotError(f"{config} belongs to backing {where['backing']}, not {device.path}")
        return NVMRegion.open(where["nvm_dir"], where["mass_dir"])
    if not create:
        raise RegionNotFound(f"{device.path} of {domain.name!r} has no snapshots yet (`hvext pmem-snapshot`)")
    nvm = Path(nvm_dir) if nvm_dir else config.parent / "nvm"
    mass = Path(mass_dir) if mass_dir else config.parent / "mass"
    region = NVMRegion.create(nvm, mass, device.size, block_size=block_size, strategy=strategy)
    config.parent.mkdir(parents=True, exist_ok=True)
    durable.atomic_write(config, json.dumps({"backing": str(device.path), "nvm_dir": str(nvm),
                                     "mass_dir": str(mass)}).encode())
    return region


@contextmanager
def paused(domain: Domain, *, require_stopped: bool = False) -> Iterator[tuple[float, dict[str, Any]]]:
    """Keep the guest from writing: suspend a running guest for the block, resume it after.
    With *require_stopped*, a running guest is refused (the caller changes what it sees)."""
    state = domain.state if domain.is_active() else RunState.SHUTOFF
    if state is RunState.RUNNING and require_stopped:
        raise DomainStateError(f"domain {domain.name!r} is running: pause it (`virsh suspend`) or shut it "
                               "down before restoring its pmem")
    suspended = state is RunState.RUNNING
    if suspended:  # stop hinting applications at an epoch first: the copy is then crash consistent
        epoch = hints.before_pause(domain)
        try:
            domain.suspend()
        except BaseException:
            hints.after_resume(domain)  # the pause did not happen: the frozen applications go on
            raise
    else:
        epoch = {"epoch_consistent": state is RunState.SHUTOFF, "hints": "guest not running: nothing to freeze"}
    started = time.perf_counter()
    try:
        yield started, epoch
    finally:
        if suspended:
            try:
                domain.resume()
            finally:
                hints.after_resume(domain)  # a guest frozen at an epoch is always thawed


def _changed_blocks(a: bytes, b: bytes, block_size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) runs within a chunk where *a* and *b* differ, at block granularity."""
    run_start = None
    for off in range(0, len(a), block_size):
        differs = a[off:off + block_size] != b[off:off + block_size]
        if differs and run_start is None:
            run_start = off
        elif not differs and run_start is not None:
            yield run_start, off - run_start
            run_start = None
    if run_start is not None:
        yield run_start, len(a) - run_start


def snapshot(domain: Domain, spec: str, name: str, **create: Any) -> dict[str, Any]:
    """Copy the device's changed blocks into its region's running point (guest paused), then snapshot it."""
    device = resolve_device(domain, spec)
    if not device.path.is_file():
        raise GuestSnapshotError(f"backing {device.path} does not exist")
    started = time.perf_counter()
    written = 0
    with open_region(domain, device, create=True, **create) as region:
        if name in region.snapshots():
            raise UsageError(f"snapshot {name!r} of {device.path} already exists")
        with paused(domain) as (paused_at, epoch), os.fdopen(devices.open_backing(device.path, os.O_RDONLY), "rb") as src:
            keep = hints.take_prepared(device.path) or [(0, device.size)]  # volatile ranges are not kept
            for offset in range(0, device.size, CHUNK):
                length = min(CHUNK, device.size - offset)
                current = src.read(length)
                for rel, n in _changed_blocks(current, region.read(offset, length), region.block_size):
                    for block in range(offset + rel, offset + rel + n, region.block_size):
                        if hints.overlaps(block, region.block_size, keep):
                            region.write(block, current[block - offset:block - offset + region.block_size])
                            written += region.block_size
            region.snapshot(name)
            guest_paused = time.perf_counter() - paused_at
        stats = region.stats()
    return {"snapshot": name, "backing": str(device.path), "bytes_written": written,
            "blocks_written": written // stats["block_size"], "bytes_read": device.size,
            "seconds": round(time.perf_counter() - started, 4), "guest_paused_seconds": round(guest_paused, 4),
            "epoch": epoch, "stats": stats}


def restore(domain: Domain, spec: str, name: str) -> dict[str, Any]:
    """Write snapshot *name* back into the device's backing file (guest paused or off)."""
    device = resolve_device(domain, spec)
    started = time.perf_counter()
    written = 0
    with open_region(domain, device) as region:
        if name not in region.snapshots():
            raise UsageError(f"{device.path} has no snapshot {name!r}; it has: {', '.join(region.snapshots()) or 'none'}")
        with paused(domain, require_stopped=True), os.fdopen(devices.open_backing(device.path, os.O_RDWR), "r+b") as dst:
            for offset in range(0, device.size, CHUNK):
                length = min(CHUNK, device.size - offset)
                wanted = region.read_snapshot(name, offset, length)
                dst.seek(offset)
                current = dst.read(length)
                for rel, n in _changed_blocks(wanted, current, region.block_size):
                    os.pwrite(dst.fileno(), wanted[rel:rel + n], offset + rel)
                    written += n
                for rel, n in _changed_blocks(wanted, region.read(offset, length), region.block_size):
                    region.write(offset + rel, wanted[rel:rel + n])  # running point = the device again
            dst.flush()
            os.fsync(dst.fileno())
    return {"snapshot": name, "backing": str(device.path), "bytes_written": written,
            "seconds": round(time.perf_counter() - started, 4)}


def purge(domain: Domain, spec: str) -> dict[str, Any]:
    device = resolve_device(domain, spec)
    with open_region(domain, device) as region:
        result = region.purge()
        result["stats"] = region.stats()
    return result


def delete(domain: Domain, spec: str, name: str) -> dict[str, Any]:
    device = resolve_device(domain, spec)
    with open_region(domain, device) as region:
        if name not in region.snapshots():
            raise UsageError(f"{device.path} has no snapshot {name!r}")
        return region.delete_snapshot(name)


def listing(domain: Domain, spec: str) -> dict[str, Any]:
    device = resolve_device(domain, spec)
    with open_region(domain, device) as region:
        return {"backing": str(device.path), "snapshots": region.snapshots(), "stats": region.stats()}
