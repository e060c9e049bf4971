"""The two purge strategies: L1 tables, block bookkeeping and purge over the metadata database."""

from __future__ import annotations

import sqlite3
from typing import NamedTuple

from hvext.pmem.region.errors import RegionCorrupt
from hvext.pmem.region.slab import MASS, NVM, TIER_NAMES, Slab

STRATEGIES = ("virtblocks", "pointer-elimination")


# ---------------------------------------------------- metadata schema

COMMON_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE snap(id INTEGER PRIMARY KEY AUTOINCREMENT,
                  name TEXT NOT NULL UNIQUE,
                  created REAL NOT NULL);
"""


class _Entry(NamedTuple):
    """A running-point L1 entry: what it points at, its NVM slot, its refs."""

    ref: int
    slot: int
    refs: int


class Strategy:
    """L1 tables, block bookkeeping and purge for one strategy.

    Snapshot id 0 is the running point.  Every method runs inside the
    caller's transaction.
    """

    name = ""
    schema = ""

    def __init__(self, db: sqlite3.Connection, nvm: Slab, mass: Slab, nblocks: int) -> None:
        self.db = db
        self.nvm = nvm
        self.mass = mass
        self.slabs = (nvm, mass)
        self.nblocks = nblocks

    @staticmethod
    def used_slots(db: sqlite3.Connection) -> tuple[list[int], list[int]]:
        raise NotImplementedError

    def running(self, first: int, last: int) -> dict[int, _Entry]:
        raise NotImplementedError

    def locate(self, snap: int, first: int, last: int) -> dict[int, tuple[int, int]]:
        """Block number -> (tier, slot) for blocks first..last of *snap*."""
        raise NotImplementedError

    def write_block(self, blkno: int, data: bytes | memoryview, old: _Entry | None) -> None:
        raise NotImplementedError

    def snapshot(self, snap: int) -> None:
        raise NotImplementedError

    def delete(self, snap: int) -> dict[str, int]:
        raise NotImplementedError

    def purge(self) -> dict[str, int]:
        raise NotImplementedError

    def nonactive_nvm_blocks(self) -> int:
        raise NotImplementedError

    def check(self) -> list[str]:
        raise NotImplementedError

    def _check_slabs(self, seen: dict[int, set[int]]) -> list[str]:
        problems = []
        for slab in self.slabs:
            actual = slab.in_use()
            if actual != seen[slab.tier]:
                problems.append(
                    f"{TIER_NAMES[slab.tier]} allocator out of step with metadata: "
                    f"{len(actual)} slots in use, {len(seen[slab.tier])} referenced"
                )
        return problems


class _Virtblocks(Strategy):
    """L1 entry -> virtblock entry (tier, slot) -> data."""

    name = "virtblocks"
    schema = """
    CREATE TABLE vb(id INTEGER PRIMARY KEY,
                    tier INTEGER NOT NULL,
                    slot INTEGER NOT NULL,
                    refs INTEGER NOT NULL,      -- L1 entries pointing here
                    active INTEGER NOT NULL);   -- the running point points here
    -- Exactly the purge candidates: purge never looks at snapshots.
    CREATE INDEX vb_nonactive_nvm ON vb(slot) WHERE tier = 0 AND active = 0;
    CREATE TABLE l1(snap INTEGER NOT NULL, blkno INTEGER NOT NULL, vb INTEGER NOT NULL,
                    PRIMARY KEY (snap, blkno)) WITHOUT ROWID;
    """

    @staticmethod
    def used_slots(db: sqlite3.Connection) -> tuple[list[int], list[int]]:
        tiers: tuple[list[int], list[int]] = ([], [])
        for tier, slot in db.execute("SELECT tier, slot FROM vb"):
            tiers[tier].append(slot)
        return tiers

    def running(self, first: int, last: int) -> dict[int, _Entry]:
        rows = self.db.execute(
            "SELECT l1.blkno, vb.id, vb.slot, vb.refs FROM l1 JOIN vb ON vb.id = l1.vb"
            " WHERE l1.snap = 0 AND l1.blkno BETWEEN ? AND ?",
            (first, last),
        )
        return {b: _Entry(vid, slot, refs) for b, vid, slot, refs in rows}

    def locate(self, snap: int, first: int, last: int) -> dict[int, tuple[int, int]]:
        rows = self.db.execute(
            "SELECT l1.blkno, vb.tier, vb.slot FROM l1 JOIN vb ON vb.id = l1.vb"
            " WHERE l1.snap = ? AND l1.blkno BETWEEN ? AND ?",
            (snap, first, last),
        )
        return {b: (tier, slot) for b, tier, slot in rows}

    def write_block(self, blkno: int, data: bytes | memoryview, old: _Entry | None) -> None:
        slot = self.nvm.alloc()
        self.nvm.write(slot, data)
        db = self.db
        if old is not None and old.refs == 1:
            # Only the running point holds it: repoint its virtblock entry.
            db.execute("UPDATE vb SET slot = ? WHERE id = ?", (slot, old.ref))
            self.nvm.release(old.slot)
            return
        vid = db.execute(
            "INSERT INTO vb(tier, slot, refs, active) VALUES (0, ?, 1, 1)", (slot,)
        ).lastrowid
        if old is None:
            db.execute("INSERT INTO l1(snap, blkno, vb) VALUES (0, ?, ?)", (blkno, vid))
        else:  # copy-on-write: snapshots keep the old block, now non-active
            db.execute("UPDATE l1 SET vb = ? WHERE snap = 0 AND blkno = ?", (vid, blkno))
            db.execute("UPDATE vb SET refs = refs - 1, active = 0 WHERE id = ?", (old.ref,))

    def snapshot(self, snap: int) -> None:
        self.db.execute("INSERT INTO l1(snap, blkno, vb) SELECT ?, blkno, vb FROM l1 WHERE snap = 0", (snap,))
        self.db.execute("UPDATE vb SET refs = refs + 1 WHERE id IN (SELECT vb FROM l1 WHERE snap = 0)")

    def delete(self, snap: int) -> dict[str, int]:
        db = self.db
        db.execute("UPDATE vb SET refs = refs - 1 WHERE id IN (SELECT vb FROM l1 WHERE snap = ?)", (snap,))
        dead = db.execute(
            "SELECT vb.id, vb.tier, vb.slot FROM l1 JOIN vb ON vb.id = l1.vb"
            " WHERE l1.snap = ? AND vb.refs = 0",
            (snap,),
        ).fetchall()
        freed = [0, 0]
        for _vid, tier, slot in dead:
            self.slabs[tier].release(slot)
            freed[tier] += 1
        db.executemany("DELETE FROM vb WHERE id = ?", [(vid,) for vid, _t, _s in dead])
        db.execute("DELETE FROM l1 WHERE snap = ?", (snap,))
        return {"nvm_blocks_freed": freed[NVM], "mass_blocks_freed": freed[MASS]}

    def purge(self) -> dict[str, int]:
        rows = self.db.execute("SELECT id, slot FROM vb WHERE tier = 0 AND active = 0").fetchall()
        updates = []
        for vid, slot in rows:
            dest = self.mass.alloc()
            self.mass.write(dest, self.nvm.read(slot))
            self.nvm.release(slot)
            updates.append((dest, vid))
        self.db.executemany("UPDATE vb SET tier = 1, slot = ? WHERE id = ?", updates)
        n = len(updates)
        return {"blocks_moved": n, "entries_rewritten": n, "entries_scanned": n, "nvm_blocks_freed": n}

    def nonactive_nvm_blocks(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM vb WHERE tier = 0 AND active = 0").fetchone()[0]

    def check(self) -> list[str]:
        db = self.db
        problems: list[str] = []
        counts = dict(db.execute("SELECT vb, COUNT(*) FROM l1 GROUP BY vb"))
        running = {v for (v,) in db.execute("SELECT vb FROM l1 WHERE snap = 0")}
        seen: dict[int, set[int]] = {NVM: set(), MASS: set()}
        ids = set()
        for vid, tier, slot, refs, active in db.execute("SELECT id, tier, slot, refs, active FROM vb"):
            ids.add(vid)
            if tier not in seen:
                problems.append(f"virtblock {vid}: bad tier {tier}")
                continue
            if slot in seen[tier]:
                problems.append(f"virtblock {vid}: {TIER_NAMES[tier]} slot {slot} shared")
            seen[tier].add(slot)
            if refs != counts.get(vid, 0) or refs <= 0:
                problems.append(f"virtblock {vid}: refs {refs}, {counts.get(vid, 0)} L1 entries")
            if bool(active) != (vid in running):
                problems.append(f"virtblock {vid}: active={active} but running point disagrees")
            if active and tier != NVM:
                problems.append(f"virtblock {vid}: active but on mass storage")
        for vid in set(counts) - ids:
            problems.append(f"L1 entries point at missing virtblock {vid}")
        return problems + self._check_slabs(seen)


class _PointerElimination(Strategy):
    """L1 entry -> (tier, slot): NVM block until purge rewrites it to mass."""

    name = "pointer-elimination"
    schema = """
    CREATE TABLE nblk(slot INTEGER PRIMARY KEY,
                      refs INTEGER NOT NULL,       -- L1 entries pointing here
                      active INTEGER NOT NULL);    -- the running point points here
    CREATE TABLE mblk(slot INTEGER PRIMARY KEY, refs INTEGER NOT NULL);
    CREATE TABLE l1(snap INTEGER NOT NULL, blkno INTEGER NOT NULL,
                    tier INTEGER NOT NULL, ptr INTEGER NOT NULL,
                    PRIMARY KEY (snap, blkno)) WITHOUT ROWID;
    """

    @staticmethod
    def used_slots(db: sqlite3.Connection) -> tuple[list[int], list[int]]:
        return (
            [s for (s,) in db.execute("SELECT slot FROM nblk")],
            [s for (s,) in db.execute("SELECT slot FROM mblk")],
        )

    def running(self, first: int, last: int) -> dict[int, _Entry]:
        rows = self.db.execute(
            "SELECT l1.blkno, l1.ptr, n.refs FROM l1 JOIN nblk AS n ON n.slot = l1.ptr"
            " WHERE l1.snap = 0 AND l1.blkno BETWEEN ? AND ?",
            (first, last),
        )
        return {b: _Entry(ptr, ptr, refs) for b, ptr, refs in rows}

    def locate(self, snap: int, first: int, last: int) -> dict[int, tuple[int, int]]:
        rows = self.db.execute(
            "SELECT blkno, tier, ptr FROM l1 WHERE snap = ? AND blkno BETWEEN ? AND ?",
            (snap, first, last),
        )
        return {b: (tier, ptr) for b, tier, ptr in rows}

    def write_block(self, blkno: int, data: bytes | memoryview, old: _Entry | None) -> None:
        slot = self.nvm.alloc()
        self.nvm.write(slot, data)
        db = self.db
        db.execute("INSERT INTO nblk(slot, refs, active) VALUES (?, 1, 1)", (slot,))
        if old is None:
            db.execute("INSERT INTO l1(snap, blkno, tier, ptr) VALUES (0, ?, 0, ?)", (blkno, slot))
            return
        db.execute("UPDATE l1 SET ptr = ? WHERE snap = 0 AND blkno = ?", (slot, blkno))
        if old.refs == 1:  # only the running point held it
            db.execute("DELETE FROM nblk WHERE slot = ?", (old.slot,))
            self.nvm.release(old.slot)
        else:  # copy-on-write: snapshots keep the old block, now non-active
            db.execute("UPDATE nblk SET refs = refs - 1, active = 0 WHERE slot = ?", (old.slot,))

    def snapshot(self, snap: int) -> None:
        self.db.execute(
            "INSERT INTO l1(snap, blkno, tier, ptr) SELECT ?, blkno, tier, ptr FROM l1 WHERE snap = 0",
            (snap,),
        )
        self.db.execute("UPDATE nblk SET refs = refs + 1 WHERE slot IN (SELECT ptr FROM l1 WHERE snap = 0)")

    def delete(self, snap: int) -> dict[str, int]:
        db = self.db
        freed = {}
        for tier, table in ((NVM, "nblk"), (MASS, "mblk")):
            db.execute(
                f"UPDATE {table} SET refs = refs - 1"
                f" WHERE slot IN (SELECT ptr FROM l1 WHERE snap = ? AND tier = {tier})",
                (snap,),
            )
            dead = [
                s
                for (s,) in db.execute(
                    f"SELECT b.slot FROM l1 JOIN {table} AS b ON b.slot = l1.ptr"
                    f" WHERE l1.snap = ? AND l1.tier = {tier} AND b.refs = 0",
                    (snap,),
                )
            ]
            for slot in dead:
                self.slabs[tier].release(slot)
            db.executemany(f"DELETE FROM {table} WHERE slot = ?", [(s,) for s in dead])
            freed[tier] = len(dead)
        db.execute("DELETE FROM l1 WHERE snap = ?", (snap,))
        return {"nvm_blocks_freed": freed[NVM], "mass_blocks_freed": freed[MASS]}

    def purge(self) -> dict[str, int]:
        db, nvm, mass = self.db, self.nvm, self.mass
        copies: dict[int, int] = {}  # NVM slot -> its copy's mass slot
        remaining: dict[int, int] = {}  # NVM slot -> references not yet eliminated
        mass_refs: dict[int, int] = {}
        freed: list[int] = []
        scanned = rewritten = 0
        for (sid,) in db.execute("SELECT id FROM snap ORDER BY id").fetchall():
            rows = db.execute(
                "SELECT l1.blkno, l1.ptr, n.refs, n.active FROM l1 JOIN nblk AS n ON n.slot = l1.ptr"
                " WHERE l1.snap = ? AND l1.tier = 0",
                (sid,),
            ).fetchall()
            updates = []
            for blkno, ptr, refs, active in rows:
                scanned += 1
                if active:
                    continue
                dest = copies.get(ptr)
                if dest is None:
                    dest = mass.alloc()
                    mass.write(dest, nvm.read(ptr))
                    copies[ptr] = dest
                    remaining[ptr] = refs
                    mass_refs[dest] = 0
                # Eliminate the pointer: the entry now locates the mass copy.
                updates.append((dest, sid, blkno))
                mass_refs[dest] += 1
                remaining[ptr] -= 1
                if remaining[ptr] == 0:
                    freed.append(ptr)
                    nvm.release(ptr)
            db.executemany("UPDATE l1 SET tier = 1, ptr = ? WHERE snap = ? AND blkno = ?", updates)
            rewritten += len(updates)
        stuck = [slot for slot, n in remaining.items() if n]
        if stuck:
            raise RegionCorrupt(f"non-active NVM blocks {stuck[:5]} have references outside snapshots")
        db.executemany("DELETE FROM nblk WHERE slot = ?", [(s,) for s in freed])
        db.executemany("INSERT INTO mblk(slot, refs) VALUES (?, ?)", list(mass_refs.items()))
        return {
            "blocks_moved": len(copies),
            "entries_rewritten": rewritten,
            "entries_scanned": scanned,
            "nvm_blocks_freed": len(freed),
        }

    def nonactive_nvm_blocks(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM nblk WHERE active = 0").fetchone()[0]

    def check(self) -> list[str]:
        db = self.db
        problems: list[str] = []
        counts: dict[tuple[int, int], int] = {}
        running: set[int] = set()
        for snap, tier, ptr in db.execute("SELECT snap, tier, ptr FROM l1"):
            counts[(tier, ptr)] = counts.get((tier, ptr), 0) + 1
            if snap == 0:
                if tier != NVM:
                    problems.append(f"running point entry locates mass slot {ptr}")
                running.add(ptr)
        seen: dict[int, set[int]] = {NVM: set(), MASS: set()}
        for slot, refs, active in db.execute("SELECT slot, refs, active FROM nblk"):
            seen[NVM].add(slot)
            if refs != counts.get((NVM, slot), 0) or refs <= 0:
                problems.append(f"NVM block {slot}: refs {refs}, {counts.get((NVM, slot), 0)} L1 entries")
            if bool(active) != (slot in running):
                problems.append(f"NVM block {slot}: active={active} but running point disagrees")
        for slot, refs in db.execute("SELECT slot, refs FROM mblk"):
            seen[MASS].add(slot)
            if refs != counts.get((MASS, slot), 0) or refs <= 0:
                problems.append(f"mass block {slot}: refs {refs}, {counts.get((MASS, slot), 0)} L1 entries")
        for tier, ptr in counts:
            if ptr not in seen.get(tier, set()):
                problems.append(f"L1 entries point at missing {TIER_NAMES[tier]} block {ptr}")
        return problems + self._check_slabs(seen)


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (_Virtblocks, _PointerElimination)
}
