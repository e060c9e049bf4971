"""The NVM RAM policy (pure): grow while the host is short and the tier has room, give back when the
tier is short, hysteresis between the tier's watermarks, VMs mid-change left alone."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvext.errors import UsageError
from hvext.memory.nvmram_policy import Thresholds, VMNvmRam, decide
from hvext.units import MIB

LIMITS = Thresholds(host_available_min=2048 * MIB, nvm_free_min=1024 * MIB, nvm_free_high=2048 * MIB,
                    step=256 * MIB)


def vm(name: str, requested: int, size: int = 4096 * MIB, current: int | None = -1) -> VMNvmRam:
    return VMNvmRam(name, size, requested * MIB, requested * MIB if current == -1 else current, 2 * MIB)


def test_host_short_grows_by_a_step_within_the_device_and_says_why() -> None:
    plan = decide(1000 * MIB, 8192 * MIB, [vm("a", 0), vm("b", 0)], LIMITS)
    # 1048 MiB short: a step each from the first VMs until the shortfall is covered (256 MiB each here)
    assert [(c.vm, c.requested // MIB) for c in plan.changes] == [("a", 256), ("b", 256)]
    assert "host available 1000 MiB (floor 2048)" in plan.changes[0].reason
    assert "adding 256 MiB of NVM RAM" in plan.changes[0].reason


def test_growth_stops_at_the_shortfall_the_device_size_and_the_tier_room() -> None:
    assert [c.requested // MIB for c in decide(2000 * MIB, 8192 * MIB, [vm("a", 0)], LIMITS).changes] == [48]
    assert [c.requested // MIB for c in decide(0, 8192 * MIB, [vm("a", 4000)], LIMITS).changes] == [4096]
    # the tier may not fall below its high watermark: 2148 free, 2048 high -> 100 MiB of room, block-aligned
    assert [c.requested // MIB for c in decide(0, 2148 * MIB, [vm("a", 0)], LIMITS).changes] == [100]


def test_hysteresis_between_the_tier_watermarks_nothing_moves() -> None:
    for free in (1024, 1500, 2048):
        plan = decide(100 * MIB, free * MIB, [vm("a", 512)], LIMITS)
        assert plan.changes == ()
    assert "not growing" in decide(100 * MIB, 1500 * MIB, [vm("a", 512)], LIMITS).reason
    # a recovered host never makes a VM give its NVM RAM back: only the tier's shortage does
    assert decide(64 * 1024 * MIB, 8192 * MIB, [vm("a", 512)], LIMITS).changes == ()


def test_tier_short_gives_back_largest_first_up_to_the_high_watermark_even_when_the_host_is_short() -> None:
    vms = [vm("small", 64), vm("big", 1024), vm("mid", 300)]
    plan = decide(100 * MIB, 1800 * MIB - 1, vms, LIMITS)  # between the watermarks: nothing
    assert plan.changes == ()
    plan = decide(100 * MIB, 900 * MIB, vms, LIMITS)  # 1148 MiB to free, 256 per VM per round
    assert [(c.vm, c.requested // MIB) for c in plan.changes] == [("big", 768), ("mid", 44), ("small", 0)]
    assert all("NVM tier short" in c.reason and c.delta < 0 for c in plan.changes)


def test_a_vm_still_changing_or_without_a_current_size_is_left_alone() -> None:
    changing = vm("a", 256, current=128 * MIB)
    unknown = vm("b", 256, current=None)
    assert decide(0, 8192 * MIB, [changing, unknown], LIMITS).changes == ()
    assert decide(0, 100 * MIB, [changing, unknown], LIMITS).changes == ()
    assert "no VM" in decide(0, 100 * MIB, [changing], LIMITS).reason


def test_thresholds_refuse_inverted_watermarks_and_an_empty_step() -> None:
    with pytest.raises(UsageError):
        Thresholds(0, 2048 * MIB, 1024 * MIB, 256 * MIB)
    with pytest.raises(UsageError):
        Thresholds(0, 0, 0, 0)


@given(available=st.integers(0, 1 << 40), free=st.integers(0, 1 << 40),
       vms=st.lists(st.tuples(st.integers(0, 2048), st.integers(0, 2048), st.booleans()), max_size=5))
def test_every_plan_stays_within_the_devices_blocks_and_one_direction(available: int, free: int,
                                                                      vms: list[tuple[int, int, bool]]) -> None:
    devices = [VMNvmRam(f"vm{i}", max(r, s) * 2 * MIB, r * 2 * MIB, r * 2 * MIB if settled else None, 2 * MIB)
               for i, (r, s, settled) in enumerate(vms)]
    plan = decide(available, free, devices, LIMITS)
    by_name = {d.name: d for d in devices}
    assert len({c.vm for c in plan.changes}) == len(plan.changes)
    assert len({c.delta > 0 for c in plan.changes}) <= 1  # never grow one VM and shrink another
    for change in plan.changes:
        device = by_name[change.vm]
        assert device.current == device.requested
        assert 0 <= change.requested <= device.size and change.requested % device.block_size == 0
        assert 0 < abs(change.delta) <= LIMITS.step
        assert change.delta < 0 if free < LIMITS.nvm_free_min else available < LIMITS.host_available_min
    if free >= LIMITS.nvm_free_min:
        assert sum(c.delta for c in plan.changes) <= max(0, free - LIMITS.nvm_free_high)
