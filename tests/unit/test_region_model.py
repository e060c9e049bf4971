"""Random operation sequences on NVMRegion checked against an in-memory model."""

from __future__ import annotations

import importlib.util
import pathlib
import random

import pytest

from hvext.pmem.region import STRATEGIES, NVMRegion

_spec = importlib.util.spec_from_file_location(
    "region_crash_child", pathlib.Path(__file__).with_name("region_crash_child.py")
)
assert _spec and _spec.loader
helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helper)

SIZE = 40 * 1024
BLOCK_SIZE = 1024




def assert_matches(reg: NVMRegion, model, rng: random.Random | None = None) -> None:
    """Everything the model holds reads back; with *rng*, also random slices."""
    assert reg.snapshots() == list(model.snaps)
    assert reg.read(0, SIZE) == model.running
    for name, data in model.snaps.items():
        assert reg.read_snapshot(name, 0, SIZE) == data, name
    if rng is not None:
        for _ in range(3):
            offset = rng.randrange(SIZE)
            length = rng.randrange(SIZE - offset + 1)
            assert reg.read(offset, length) == model.running[offset : offset + length]
    assert reg.check() == []


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("seed", [11, 22, 33])
def test_random_sequence_matches_model(tmp_path, fast_tmp, strategy, seed):
    nvm, mass = fast_tmp / "nvm", tmp_path / "mass"
    ops = helper.generate_ops(seed, 160, SIZE, BLOCK_SIZE, reopen=True)
    model = helper.Model(SIZE)
    rng = random.Random(seed)
    reg = NVMRegion.create(nvm, mass, SIZE, block_size=BLOCK_SIZE, strategy=strategy)
    try:
        for i, op in enumerate(ops):
            if op[0] == "reopen":
                reg.close()
                reg = NVMRegion.open(nvm, mass)
            else:
                result = helper.run_op(reg, op)
            model.apply(op)
            if op[0] == "purge":
                stats = reg.stats()
                # only blocks the running point references stay on NVM
                assert stats["nvm_blocks"] == stats["running_blocks"]
                assert stats["nonactive_nvm_blocks"] == 0
                if strategy == "virtblocks":
                    assert result["entries_rewritten"] == result["blocks_moved"]
                else:
                    assert result["entries_rewritten"] >= result["blocks_moved"]
            if op[0] in ("purge", "delete", "reopen") or i % 20 == 0:
                assert_matches(reg, model, rng)
            else:  # cheap spot check of what the op touched
                if op[0] == "write":
                    assert reg.read(op[1], len(op[2])) == op[2]
        assert_matches(reg, model, rng)
        # Delete every snapshot: nothing may stay on mass storage, and NVM
        # keeps exactly the running point's blocks.
        for name in list(model.snaps):
            reg.delete_snapshot(name)
            model.apply(("delete", name))
        stats = reg.stats()
        assert stats["mass_blocks"] == 0
        assert stats["nvm_blocks"] == stats["running_blocks"]
        assert_matches(reg, model)
    finally:
        reg.close()


def test_strategies_agree_on_content(tmp_path, fast_tmp):
    """Both strategies, same operations: same bytes, same blocks moved."""
    ops = helper.generate_ops(5, 120, SIZE, BLOCK_SIZE)
    regions = {
        s: NVMRegion.create(fast_tmp / s / "nvm", tmp_path / s / "mass", SIZE, block_size=BLOCK_SIZE, strategy=s)
        for s in STRATEGIES
    }
    try:
        for op in ops:
            results = {s: helper.run_op(r, op) for s, r in regions.items()}
            if op[0] == "purge":
                moved = {s: res["blocks_moved"] for s, res in results.items()}
                assert len(set(moved.values())) == 1, moved
        a, b = regions.values()
        assert a.read(0, SIZE) == b.read(0, SIZE)
        assert a.snapshots() == b.snapshots()
        for name in a.snapshots():
            assert a.read_snapshot(name, 0, SIZE) == b.read_snapshot(name, 0, SIZE)
        sa, sb = a.stats(), b.stats()
        for key in ("nvm_blocks", "mass_blocks", "snapshots", "running_blocks"):
            assert sa[key] == sb[key], key
    finally:
        for r in regions.values():
            r.close()
