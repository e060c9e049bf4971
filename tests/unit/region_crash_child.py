"""Helper for the NVMRegion tests: an in-memory model, a seeded operation
generator, and (run as a program) the child that the crash tests SIGKILL.

Child usage::

    python region_crash_child.py NVM_DIR MASS_DIR SEED NOPS PROGRESS [OP:POINT:NTH]

It opens the region, appends ``ready`` to PROGRESS, then for each generated
operation i appends ``start i``, runs it, appends ``done i``.  With
``OP:POINT:NTH`` it SIGKILLs itself the NTH time ``_fault_hook(OP, POINT)``
fires (deterministic crash points); otherwise the parent kills it at a
random moment.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from typing import Any

# Region geometry shared by the crash tests: small, so runs are fast, but
# several blocks per write and several snapshots per block.
SIZE = 48 * 512
BLOCK_SIZE = 512

Op = tuple[Any, ...]


class Model:
    """What an NVMRegion must read back: the running point and each snapshot."""

    def __init__(self, size: int) -> None:
        self.running = bytearray(size)
        self.snaps: dict[str, bytes] = {}  # insertion order = creation order

    def apply(self, op: Op) -> None:
        kind = op[0]
        if kind == "write":
            _, offset, data = op
            self.running[offset : offset + len(data)] = data
        elif kind == "snapshot":
            self.snaps[op[1]] = bytes(self.running)
        elif kind == "delete":
            del self.snaps[op[1]]
        elif kind in ("purge", "reopen"):
            pass
        else:
            raise ValueError(op)


def generate_ops(seed: int, count: int, size: int, block_size: int, *, reopen: bool = False) -> list[Op]:
    """A valid random operation sequence (writes mostly, some snapshots,
    deletes and purges) that depends only on its arguments."""
    rng = random.Random(seed)
    names: list[str] = []
    serial = 0
    ops: list[Op] = []
    for _ in range(count):
        r = rng.random()
        if r < 0.55:
            if rng.random() < 0.5:  # block aligned, 1-4 blocks
                nblk = rng.randint(1, 4)
                first = rng.randrange(size // block_size - nblk + 1)
                offset, length = first * block_size, nblk * block_size
            else:  # any alignment, up to 3 blocks
                length = rng.randint(1, 3 * block_size)
                offset = rng.randrange(size - length + 1)
            ops.append(("write", offset, rng.randbytes(length)))
        elif r < 0.70:
            serial += 1
            name = f"s{serial}"
            names.append(name)
            ops.append(("snapshot", name))
        elif r < 0.80 and names:
            ops.append(("delete", names.pop(rng.randrange(len(names)))))
        elif r < 0.92:
            ops.append(("purge",))
        elif reopen:
            ops.append(("reopen",))
        else:
            ops.append(("purge",))
    return ops


def run_op(reg: Any, op: Op) -> Any:
    """Apply *op* to an open NVMRegion (``reopen`` is the caller's job)."""
    kind = op[0]
    if kind == "write":
        return reg.write(op[1], op[2])
    if kind == "snapshot":
        return reg.snapshot(op[1])
    if kind == "delete":
        return reg.delete_snapshot(op[1])
    if kind == "purge":
        return reg.purge()
    raise ValueError(op)


def main(argv: list[str]) -> None:
    nvm, mass, seed, nops, progress = argv[:5]
    from hvext.pmem import region as region_mod
    from hvext.pmem.region import region as region_core

    if len(argv) > 5:
        fault_op, fault_point, nth = argv[5].split(":")
        hits = [0]

        def hook(op: str, point: str) -> None:
            if op == fault_op and point == fault_point:
                hits[0] += 1
                if hits[0] == int(nth):
                    os.kill(os.getpid(), signal.SIGKILL)

        region_core._fault_hook = hook

    fd = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    reg = region_mod.NVMRegion.open(nvm, mass)
    os.write(fd, b"ready\n")
    for i, op in enumerate(generate_ops(int(seed), int(nops), SIZE, BLOCK_SIZE)):
        os.write(fd, f"start {i}\n".encode())
        run_op(reg, op)
        os.write(fd, f"done {i}\n".encode())
    reg.close()
    os.write(fd, b"finished\n")


if __name__ == "__main__":
    main(sys.argv[1:])
