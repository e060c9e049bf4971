"""Nonvolatile store of a volatile PMEM device (C12): generations of changed blocks, switched atomically.

A store is a directory on disk holding the saved contents of one device::

    manifest.json         the pointer: size, block size, current generation and,
                          per block, where its bytes are and their SHA-256
    gen-00000007.dat      the blocks that generation 7 wrote, packed
    store.lock            one saver at a time (flock)

The directory is 0700 and every file 0600: they hold guest memory.

A save writes only blocks whose contents changed since the previous save (it is
told which blocks may have changed by a dirty page list, or it compares SHA-256
hashes of every block against the manifest), packs them into a *new* generation
file, fsyncs it, and then replaces ``manifest.json`` with ``rename`` (fsync of
the file and the directory before and after). Nothing of the previous
generation is overwritten, so a saver killed at any point leaves the previous
manifest and every file it references intact: the previous good copy restores.
Unreferenced generation files (older ones, or one a killed saver left) are
removed after the switch. All-zero blocks are stored as "zero" (no bytes).
When dead bytes in generation files outgrow live ones, a save compacts: the
new generation then holds every live block (still written next to the old).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hvext import durable
from hvext.agent import protocol
from hvext.errors import HvextError, UsageError
from hvext.paths import UnsafePathError, private_dir
from hvext.units import KIB

FORMAT = "hvext-power-store"
VERSION = 1
BLOCK_SIZE = 64 * KIB
MANIFEST = "manifest.json"
LOCK = "store.lock"
ZERO_HASH_CACHE: dict[int, str] = {}

#: test hook: called with ("block", n) after each written block and ("switch", gen) before the rename
Hook = Callable[[str, int], None]


class StoreError(HvextError):
    """A power-loss store failed (I/O, locking)."""


class StoreUsageError(StoreError, UsageError):
    """A store was asked for something its geometry or state does not allow."""


class StoreCorrupt(StoreError):
    """The store's manifest or data do not check out (a hash mismatch, a missing file)."""


@dataclass(frozen=True)
class SaveResult:
    """What one save did: bytes read from the device, bytes written to disk, and time."""

    generation: int
    mode: str  # "hashes" (every candidate block hashed) or "dirty-log" (only listed blocks)
    blocks_total: int
    blocks_checked: int
    blocks_written: int
    bytes_read: int
    bytes_written: int
    seconds: float
    compacted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _zero_hash(block_size: int) -> str:
    if block_size not in ZERO_HASH_CACHE:
        ZERO_HASH_CACHE[block_size] = hashlib.sha256(bytes(block_size)).hexdigest()
    return ZERO_HASH_CACHE[block_size]


def make_store_dir(directory: Path) -> bool:
    """Make *directory* (missing parents with default modes) private to us (0700) with
    :func:`hvext.paths.private_dir`; True when created here. A symlink, a non-directory or a
    directory someone else owns or can write is refused with :class:`StoreUsageError`: it would
    let someone else read guest memory or redirect where it is written."""
    directory = Path(os.path.abspath(directory))
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            private_dir(directory, mode=0o700, exclusive=True)
            return True
        except FileExistsError:
            private_dir(directory, mode=0o700)
            return False
    except UnsafePathError as err:
        raise StoreUsageError(f"{err}; give a directory hvext may make private") from err


def _create_private(path: Path) -> int:
    """A new file, 0600 whatever the umask, never through a symlink (write-only fd)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _gen_name(gen: int) -> str:
    return f"gen-{gen:08d}.dat"


#: Names of the files hvext writes in a store (what ``remove`` deletes; nothing else is touched).
OWN_FILES = re.compile(rf"(manifest\.json|store\.lock|gen-\d{{8}}\.dat|{durable.temp_pattern(MANIFEST)}"
                       r"|\.manifest\.json\.tmp-\d+)")  # the last: an older hvext's temporary manifest


class Store:
    """One device's store directory; :meth:`create` or :meth:`open` it."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.manifest = manifest

    # -- geometry ---------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.manifest["size"])

    @property
    def block_size(self) -> int:
        return int(self.manifest["block_size"])

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def nblocks(self) -> int:
        return -(-self.size // self.block_size)

    # -- opening ----------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, size: int, block_size: int = BLOCK_SIZE) -> Store:
        """A new, empty store (every block zero) in *directory*: created 0700, or an existing empty one.

        A directory that is not empty is refused: its files are not hvext's, and removing the
        store later must not touch them."""
        directory = Path(directory)
        if size <= 0:
            raise StoreUsageError(f"store size must be positive, not {size}")
        if block_size < 4096 or block_size & (block_size - 1) or block_size > 16 << 20:
            raise StoreUsageError(f"block size {block_size} must be a power of two from 4 KiB to 16 MiB")
        if (directory / MANIFEST).exists():
            raise StoreUsageError(f"{directory} already holds a store")
        try:
            created = make_store_dir(directory)
            if not created and any(directory.iterdir()):
                raise StoreUsageError(f"{directory} is not empty and holds no store; give a new or empty "
                                      "directory for the store")
            durable.fsync_dir(directory.parent)
            nblocks = -(-size // block_size)
            manifest = {"format": FORMAT, "version": VERSION, "size": size, "block_size": block_size,
                        "generation": 0, "saved_at": None, "locations": [[0, 0]] * nblocks,
                        "hashes": [_zero_hash(block_size)] * nblocks}
            durable.atomic_write(directory / MANIFEST, json.dumps(manifest, separators=(",", ":")).encode())
        except OSError as err:
            raise StoreError(f"cannot create the store in {directory}: {err}") from err
        return cls(directory, manifest)

    @classmethod
    def open(cls, directory: Path) -> Store:
        directory = Path(directory)
        try:
            raw = (directory / MANIFEST).read_bytes()
        except FileNotFoundError as err:
            raise StoreUsageError(f"{directory} holds no power-loss store (no {MANIFEST})") from err
        except OSError as err:
            raise StoreError(f"cannot read {directory / MANIFEST}: {err}") from err
        try:
            manifest = protocol.loads(raw, StoreCorrupt, "the file")  # too deep, not JSON, huge numbers
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise ValueError(f"format {manifest.get('format')!r} version {manifest.get('version')!r}")
            nblocks = -(-int(manifest["size"]) // int(manifest["block_size"]))
            if len(manifest["locations"]) != nblocks or len(manifest["hashes"]) != nblocks:
                raise ValueError("block tables do not match the size")
        except (StoreCorrupt, ValueError, KeyError, TypeError, AttributeError) as err:
            raise StoreCorrupt(f"{directory / MANIFEST} is not a valid store manifest: {err}") from err
        return cls(directory, manifest)

    @classmethod
    def open_or_create(cls, directory: Path, size: int) -> Store:
        if (Path(directory) / MANIFEST).exists():
            store = cls.open(directory)
            if store.size != size:
                raise StoreUsageError(f"store {directory} holds {store.size} bytes, the device has {size}")
            return store
        return cls.create(directory, size)

    @staticmethod
    def remove(directory: Path) -> list[str]:
        """Delete the files hvext wrote in the store *directory* (not others), then the directory if it
        is left empty. Returns the names removed."""
        directory = Path(directory)
        try:
            names = [n for n in os.listdir(directory) if OWN_FILES.fullmatch(n)]
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StoreError(f"cannot remove the store in {directory}: {err}") from err
        for name in names:
            try:
                os.unlink(directory / name)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise StoreError(f"cannot remove {directory / name}: {err}") from err
        try:
            directory.rmdir()
        except OSError:
            pass  # someone else's files are left there
        return names

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = durable.lock_file(self.directory / LOCK, wait=0)
        except BlockingIOError as err:
            raise StoreError(f"store {self.directory} is being saved by another process") from err
        except OSError as err:
            raise StoreError(f"cannot lock store {self.directory}: {err}") from err
        try:
            # another process may have switched generations since we read the manifest
            self.manifest = Store.open(self.directory).manifest
            yield
        finally:
            os.close(fd)

    # -- reading ----------------------------------------------------------
    def read_block(self, block: int, handles: dict[int, Any] | None = None) -> bytes:
        """The saved bytes of *block* (checked against its hash)."""
        gen, slot = self.manifest["locations"][block]
        length = min(self.block_size, self.size - block * self.block_size)
        if gen == 0:
            return bytes(length)
        own = handles is None
        handles = {} if handles is None else handles
        try:
            if gen not in handles:
                handles[gen] = open(self.directory / _gen_name(gen), "rb")  # noqa: SIM115 (cached, closed by caller)
            handle = handles[gen]
            handle.seek(slot * self.block_size)
            data = handle.read(self.block_size)[:length]
        except OSError as err:
            raise StoreCorrupt(f"store {self.directory}: block {block} (generation {gen}) unreadable: {err}") \
                from err
        finally:
            if own:
                for h in handles.values():
                    h.close()
        if len(data) != length or hashlib.sha256(data.ljust(self.block_size, b"\0")).hexdigest() \
                != self.manifest["hashes"][block]:
            raise StoreCorrupt(f"store {self.directory}: block {block} of generation {gen} fails its SHA-256")
        return data

    def restore(self, target: Path, *, owner: tuple[int, int] | None = None) -> dict[str, Any]:
        """Write the saved contents to *target* (replaced via a temp file, fsync, rename and fsync of the
        directory; sparse for zeros)."""
        started = time.perf_counter()
        target = Path(target)
        written = 0
        handles: dict[int, Any] = {}
        # a new file of a random name (O_EXCL, no link followed: the backing's directory may be
        # sticky world-writable), chowned and chmodded on its descriptor, then renamed over the target
        try:
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.restore-")
        except OSError as err:
            raise StoreError(f"cannot restore {target} from {self.directory}: {err}") from err
        tmp = Path(tmp_name)
        try:
            with open(fd, "wb") as out:
                out.truncate(self.size)
                for block in range(self.nblocks):
                    if self.manifest["locations"][block][0] == 0:
                        continue
                    data = self.read_block(block, handles)
                    out.seek(block * self.block_size)
                    out.write(data)
                    written += len(data)
                out.flush()
                os.fsync(out.fileno())
                if owner is not None:
                    os.fchown(out.fileno(), *owner)
                os.fchmod(out.fileno(), 0o660)
            os.replace(tmp, target)
            durable.fsync_dir(target.parent)  # the rename itself survives a crash, as a save's switch does
        except OSError as err:
            raise StoreError(f"cannot restore {target} from {self.directory}: {err}") from err
        finally:
            for h in handles.values():
                h.close()
            tmp.unlink(missing_ok=True)
        return {"generation": self.generation, "bytes_written": written, "size": self.size,
                "seconds": round(time.perf_counter() - started, 4)}

    def differs(self, source: Path | io.BufferedIOBase) -> list[int]:
        """Blocks of *source* (a path, or a file the caller opened safely) whose hash is not the saved
        one (empty: the file equals the store)."""
        changed = []
        with open(source, "rb") if isinstance(source, (str, os.PathLike)) else source as handle:
            for block in range(self.nblocks):
                data = handle.read(self.block_size)
                if hashlib.sha256(data.ljust(self.block_size, b"\0")).hexdigest() != self.manifest["hashes"][block]:
                    changed.append(block)
        return changed

    # -- saving -----------------------------------------------------------
    def blocks_of_ranges(self, ranges: Iterable[tuple[int, int]]) -> set[int]:
        """Block numbers that byte ranges (offset, length) touch, clipped to the device."""
        blocks: set[int] = set()
        for offset, length in ranges:
            if length <= 0:
                continue
            first = max(0, offset) // self.block_size
            last = min(self.size, offset + length) - 1
            if last >= max(0, offset):
                blocks.update(range(first, last // self.block_size + 1))
        return blocks

    def save(self, source: Path | io.BufferedIOBase, blocks: Iterable[int] | None = None, *,
             mode: str | None = None, hook: Hook | None = None) -> SaveResult:
        """Save *source* (the device's backing file, or that file opened safely by the caller): only
        *blocks* when given (a dirty list), else every block; either way only blocks whose SHA-256
        changed are written, to a new generation."""
        started = time.perf_counter()
        opened = isinstance(source, (str, os.PathLike))
        with self._locked():
            try:
                st = os.stat(source) if opened else os.fstat(source.fileno())
            except OSError as err:
                raise StoreError(f"cannot read the device backing {source}: {err}") from err
            if st.st_size != self.size:
                raise StoreUsageError(f"{source} has {st.st_size} bytes, store {self.directory} holds {self.size}")
            candidates = sorted(b for b in (range(self.nblocks) if blocks is None else set(blocks))
                                if 0 <= b < self.nblocks)
            gen = self.generation + 1
            gen_path = self.directory / _gen_name(gen)
            locations = [list(loc) for loc in self.manifest["locations"]]
            hashes = list(self.manifest["hashes"])
            zero = _zero_hash(self.block_size)
            read = written = slots = 0
            changed = False
            try:
                with open(source, "rb") if opened else source as src, \
                        open(_create_private(gen_path), "wb") as out:
                    for block in candidates:
                        src.seek(block * self.block_size)
                        data = src.read(self.block_size)
                        read += len(data)
                        digest = hashlib.sha256(data.ljust(self.block_size, b"\0")).hexdigest()
                        if digest == hashes[block]:
                            continue
                        changed = True
                        hashes[block] = digest
                        if digest == zero:
                            locations[block] = [0, 0]
                            continue
                        out.write(data.ljust(self.block_size, b"\0"))
                        locations[block] = [gen, slots]
                        slots += 1
                        written += len(data)
                        if hook:
                            hook("block", block)
                    out.flush()
                    os.fsync(out.fileno())
                compacted = False
                if changed and self._dead_ratio(locations, gen_path) > 1.0:
                    written += self._compact_into(out_path=gen_path, locations=locations, gen=gen, slots=slots)
                    compacted = True
                if not slots and not compacted:
                    gen_path.unlink()
                if changed:
                    manifest = dict(self.manifest, generation=gen, saved_at=time.time(), locations=locations,
                                    hashes=hashes)
                    data_json = json.dumps(manifest, separators=(",", ":")).encode()
                    if hook:
                        hook("switch", gen)
                    durable.fsync_dir(self.directory)
                    durable.atomic_write(self.directory / MANIFEST, data_json)
                    self.manifest = manifest
            except OSError as err:
                raise StoreError(f"saving {source} to {self.directory} failed (the previous generation "
                                 f"{self.generation} is intact): {err}") from err
            self._collect_garbage()
        return SaveResult(self.generation, mode or ("hashes" if blocks is None else "dirty-log"), self.nblocks,
                          len(candidates), slots, read, written, round(time.perf_counter() - started, 4),
                          compacted)

    def _dead_ratio(self, locations: list[list[int]], new_path: Path) -> float:
        """Dead bytes over live bytes in generation files, were *locations* current."""
        live: dict[int, int] = {}
        for gen, _ in locations:
            if gen:
                live[gen] = live.get(gen, 0) + 1
        total = sum((self.directory / _gen_name(g)).stat().st_size for g in live
                    if (self.directory / _gen_name(g)).exists())
        live_bytes = sum(live.values()) * self.block_size
        return (total - live_bytes) / max(live_bytes, 1) if live_bytes else 0.0

    def _compact_into(self, *, out_path: Path, locations: list[list[int]], gen: int, slots: int) -> int:
        """Append every live block held by older generations to *out_path* (the new generation)."""
        handles: dict[int, Any] = {}
        copied = 0
        try:
            with open(out_path, "ab") as out:
                for block, (g, slot) in enumerate(locations):
                    if g == 0 or g == gen:
                        continue
                    data = self.read_block(block, handles).ljust(self.block_size, b"\0")
                    out.write(data)
                    locations[block] = [gen, slots]
                    slots += 1
                    copied += len(data)
                out.flush()
                os.fsync(out.fileno())
        finally:
            for h in handles.values():
                h.close()
        return copied

    def _collect_garbage(self) -> None:
        """Remove generation files and temp files the current manifest does not reference."""
        live = {_gen_name(g) for g, _ in self.manifest["locations"] if g}
        removed = False
        for path in self.directory.iterdir():
            if (path.name.startswith("gen-") and path.name not in live) or path.name.startswith(f".{MANIFEST}.tmp"):
                path.unlink(missing_ok=True)
                removed = True
        if removed:
            durable.fsync_dir(self.directory)

    def stats(self) -> dict[str, Any]:
        files = sorted(p.name for p in self.directory.glob("gen-*.dat"))
        return {"directory": str(self.directory), "size": self.size, "block_size": self.block_size,
                "generation": self.generation, "saved_at": self.manifest.get("saved_at"),
                "nonzero_blocks": sum(1 for g, _ in self.manifest["locations"] if g), "files": files,
                "bytes_on_disk": sum((self.directory / f).stat().st_size for f in files)}
