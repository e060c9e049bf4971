"""Hot PMEM in DRAM (C15): the pure placement policy and the range translation, with hostile hints."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvext.daemon import config as daemon_config
from hvext.errors import UsageError
from hvext.pmem import hints
from hvext.pmem.placement import parse_maps
from hvext.pmem.placement_policy import (PAGE, VMA, DeviceInput, Params, demand, normalize, plan_vm,
                                         split_budget, subtract, total, translate)

MIB = 1 << 20
DEV = "/var/lib/hvext/domains/a/pmem0.img"


def test_normalize_clamps_aligns_merges_and_drops_garbage() -> None:
    hostile = [(-1, 10), (0, 0), (5, -3), (True, 4096), ("0", 4096), (10 * MIB, PAGE), (3 * MIB, 1 << 70),
               (100, 1), (4000, 200), (PAGE * 3, PAGE), (PAGE * 4, PAGE), (1, 2, 3), None]  # type: ignore[list-item]
    assert normalize(hostile, 4 * MIB) == [(0, 2 * PAGE), (3 * PAGE, 2 * PAGE), (3 * MIB, MIB)]


def test_subtract_and_total() -> None:
    assert subtract([(0, 100)], [(10, 10), (50, 100)]) == [(0, 10), (20, 30)]
    assert subtract([(0, 100)], []) == [(0, 100)] and subtract([(0, 100)], [(0, 100)]) == []
    assert total([(0, 3), (10, 4)]) == 7


def test_budget_is_split_max_min_fairly() -> None:
    shares = split_budget({"greedy": 1 << 40, "small": 8 * MIB, "mid": 100 * MIB}, 200 * MIB)
    assert shares["small"] == 8 * MIB  # wants less than a third: gets all it wants
    assert shares["mid"] == 96 * MIB and shares["greedy"] == 96 * MIB  # the rest, evenly
    assert sum(shares.values()) <= 200 * MIB
    assert split_budget({"a": 5 * MIB, "b": 5 * MIB}, 100 * MIB) == {"a": 5 * MIB, "b": 5 * MIB}
    assert split_budget({"a": -5, "b": MIB}, -1) == {"a": 0, "b": 0}
    assert split_budget({}, MIB) == {}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=3), st.integers(-MIB, 1 << 40), max_size=8),
       st.integers(-MIB, 1 << 40))
def test_shares_never_exceed_the_budget_nor_a_demand(demands: dict[str, int], budget: int) -> None:
    shares = split_budget(demands, budget)
    assert set(shares) == set(demands) and sum(shares.values()) <= max(0, budget)
    for name, share in shares.items():
        assert 0 <= share <= max(0, demands[name]) + PAGE and share % PAGE == 0


def test_plan_keeps_hot_within_the_share_and_the_rest_is_cold() -> None:
    device = DeviceInput(DEV, 64 * MIB, ((8 * MIB, 4 * MIB), (32 * MIB, 8 * MIB)))
    (plan,), state = plan_vm([device], 6 * MIB, None)
    assert plan.keep == ((8 * MIB, 4 * MIB), (32 * MIB, 2 * MIB))  # the second is cut at the share
    assert plan.unplaced == 6 * MIB and total(plan.keep) + total(plan.cold) == 64 * MIB
    assert subtract(plan.cold, [(0, 8 * MIB), (12 * MIB, 20 * MIB), (34 * MIB, 30 * MIB)]) == []
    assert state.kept[DEV] == [((8 * MIB, 4 * MIB), 0), ((32 * MIB, 2 * MIB), 0)]


def test_kept_ranges_are_sticky_and_linger_after_they_cool() -> None:
    params = Params(linger_rounds=2)
    first = DeviceInput(DEV, 64 * MIB, ((0, 4 * MIB),))
    _, state = plan_vm([first], 4 * MIB, None, params)
    # a newcomer appears before the kept range in the hints: the kept one keeps its DRAM
    both = DeviceInput(DEV, 64 * MIB, ((40 * MIB, 4 * MIB), (0, 4 * MIB)))
    (plan,), state = plan_vm([both], 4 * MIB, state, params)
    assert plan.keep == ((0, 4 * MIB),) and plan.unplaced == 4 * MIB
    # it stops being hot: kept (lingering) for two rounds, cold in the third
    none = DeviceInput(DEV, 64 * MIB, ())
    for _ in range(2):
        (plan,), state = plan_vm([none], 16 * MIB, state, params)
        assert plan.keep == ((0, 4 * MIB),) and plan.lingering == ((0, 4 * MIB),)
    (plan,), state = plan_vm([none], 16 * MIB, state, params)
    assert plan.keep == () and plan.cold == ((0, 64 * MIB),) and state.kept[DEV] == []
    # lingering ranges come after hot ones when the share is tight
    _, state = plan_vm([first], 4 * MIB, None, params)
    other = DeviceInput(DEV, 64 * MIB, ((40 * MIB, 4 * MIB),))
    assert demand([other], state, params) == 8 * MIB
    (plan,), _ = plan_vm([other], 4 * MIB, state, params)
    assert plan.keep == ((40 * MIB, 4 * MIB),)


def test_a_device_that_shrank_drops_the_state_past_its_end() -> None:
    _, state = plan_vm([DeviceInput(DEV, 64 * MIB, ((60 * MIB, 4 * MIB),))], 64 * MIB, None)
    (plan,), _ = plan_vm([DeviceInput(DEV, 32 * MIB, ())], 64 * MIB, state)
    assert plan.keep == () and plan.cold == ((0, 32 * MIB),)


def test_params_are_checked() -> None:
    for bad in (-1, 1001, True, 1.5):
        with pytest.raises(ValueError):
            Params(bad)  # type: ignore[arg-type]


# -- translation: guest physical hint -> device offset -> QEMU address ---------------------------

BASE = 0x1_4000_0000  # the device's address from query-memory-devices
QEMU = 0x7F00_0000_0000  # where QEMU maps the backing


def test_hints_outside_the_device_never_reach_a_qemu_address() -> None:
    windows = [(BASE, 64 * MIB, DEV)]
    raw = {"ranges": [
        {"kind": "hot", "gpa": BASE + 8 * MIB, "length": 4 * MIB},      # fine
        {"kind": "hot", "gpa": BASE - PAGE, "length": 2 * PAGE},          # starts below the device
        {"kind": "hot", "gpa": BASE + 63 * MIB, "length": 2 * MIB},       # runs past its end
        {"kind": "hot", "gpa": 0, "length": 1 << 63},                     # all of guest memory
        {"kind": "hot", "gpa": (1 << 64) - PAGE, "length": 2 * PAGE},     # wraps around
        {"kind": "hot", "gpa": BASE, "length": -PAGE},
        {"kind": "cold", "gpa": BASE, "length": PAGE},                    # not a kind
        {"kind": "hot", "gpa": float(BASE), "length": PAGE},
        "hot",
    ]}
    validated = hints.validate(raw, windows, "a")
    hot = validated.devices[DEV].ranges["hot"]
    assert hot == [(8 * MIB, 4 * MIB)] and len(validated.rejected) == 8
    vmas = [VMA(QEMU, QEMU + 64 * MIB, 0)]
    (plan,), _ = plan_vm([DeviceInput(DEV, 64 * MIB, tuple(hot))], 1 << 40, None)
    keep, refused = translate(plan.keep, vmas, 64 * MIB)
    assert keep == [(QEMU + 8 * MIB, 4 * MIB)] and refused == 0
    cold, refused = translate(plan.cold, vmas, 64 * MIB)
    assert refused == 0 and all(QEMU <= a and a + n <= QEMU + 64 * MIB for a, n in cold)


def test_translation_refuses_what_qemu_does_not_map_and_follows_split_mappings() -> None:
    vmas = [VMA(QEMU, QEMU + 2 * MIB, 0), VMA(QEMU + 10 * MIB, QEMU + 12 * MIB, 2 * MIB),
            VMA(5, 5, 0), VMA(1, 100, -4)]  # empty and negative-offset ones are ignored
    out, refused = translate([(MIB, 2 * MIB), (6 * MIB, 2 * MIB), (-PAGE, PAGE), (0, 0)], vmas, 5 * MIB)
    assert out == [(QEMU + MIB, MIB), (QEMU + 10 * MIB, MIB)]
    assert refused == 2 * MIB + PAGE  # past the device's 5 MiB, and the negative offset


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-(1 << 65), 1 << 65), st.integers(-(1 << 65), 1 << 65)), max_size=20),
       st.integers(1, 1 << 40))
def test_any_guest_ranges_stay_inside_the_device_and_its_mapping(ranges: list[tuple[int, int]], size: int) -> None:
    vmas = [VMA(QEMU, QEMU + size, 0)]
    (plan,), _ = plan_vm([DeviceInput(DEV, size, tuple(ranges))], 1 << 62, None)
    assert total(plan.keep) + total(plan.cold) == size
    for part in (plan.keep, plan.cold):
        for address, length in translate(part, vmas, size)[0]:
            assert QEMU <= address and address + length <= QEMU + size and length > 0


def test_maps_are_matched_by_device_and_inode_and_shared_only() -> None:
    text = ("7f0000000000-7f0004000000 rw-s 00000000 fd:01 1234 /var/lib/hvext/domains/a/pmem0.img\n"
            "7f0004000000-7f0006000000 rw-s 04000000 fd:01 1234 /var/lib/hvext/domains/a/pmem0.img (deleted)\n"
            "7f0010000000-7f0014000000 rw-p 00000000 fd:01 1234 /var/lib/hvext/domains/a/pmem0.img\n"
            "7f0020000000-7f0024000000 rw-s 00000000 fd:01 9999 /var/lib/hvext/domains/a/pmem0.img\n"
            "7f0030000000-7f0034000000 rw-s 00000000 fd:02 1234 /var/lib/hvext/domains/b/pmem0.img\n"
            "zz-yy rw-s 0 fd:01 1234 /x\n"
            "7f0040000000-7f0044000000 rw-s 00000000 fd:01 1234\n")
    assert parse_maps(text, (0xFD, 1), 1234) == [VMA(0x7F0000000000, 0x7F0004000000, 0),
                                                  VMA(0x7F0004000000, 0x7F0006000000, 0x4000000)]


def test_placement_config_is_off_unless_enabled(tmp_path: Path) -> None:
    from hvext.daemon.placement_loop import PlacementConfig
    path = tmp_path / "hvextd.toml"
    path.write_text("")
    assert daemon_config.load(path).get(PlacementConfig) == PlacementConfig() and not PlacementConfig().enabled
    path.write_text('[placement]\nenabled = true\nbudget_mib = 512\ncold = "pageout"\ndomains = ["a"]\n')
    loaded = daemon_config.load(path).get(PlacementConfig)
    assert loaded is not None and loaded.enabled and loaded.budget_mib == 512 and loaded.domains == ("a",)
    for bad, message in (("cold = 'drop'", "cold: must be"), ("budget_mib = -1", "budget_mib"),
                         ("interval_s = nan", "interval_s"), ("enabled = 1", "enabled"),
                         ("linger_rounds = true", "linger_rounds"), ("domains = 'a'", "domains")):
        path.write_text(f"[placement]\n{bad}\n")
        with pytest.raises(UsageError, match=message):
            daemon_config.load(path)
