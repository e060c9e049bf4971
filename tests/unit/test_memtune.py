"""hvext.memory.memtune: what a pool entitlement means for a VM's memtune and balloon (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvext.memory import demand
from hvext.memory.memtune import (
    MIN_BALLOON_MIB,
    UNLIMITED_KIB,
    BindInput,
    Memtune,
    decide,
    memtune_changes,
    overhead_mib,
)
from hvext.memory.pools import ResourceTree


def item(**kw: int) -> BindInput:
    values = {"boot_mib": 1024, "actual_mib": 1024, "entitlement_mib": 1024, "limited_mib": 1024,
              "reservation_mib": 0} | kw
    return BindInput("vm", **values)


def test_overhead_grows_with_the_guest() -> None:
    assert overhead_mib(0) == 256
    assert overhead_mib(1024) == 256 + 64
    assert overhead_mib(16384) == 256 + 1024


def test_entitlement_becomes_the_hard_limit_plus_qemus_overhead() -> None:
    b = decide(item(entitlement_mib=600, limited_mib=1024, reservation_mib=200))
    assert b.memtune == Memtune(hard_limit_kib=(600 + 320) << 10, soft_limit_kib=(200 + 320) << 10)
    assert b.balloon_target_mib is None  # contention for capacity does not move the balloon
    assert b.overhead_mib == 320


def test_reservation_above_entitlement_is_capped_at_it() -> None:
    b = decide(item(entitlement_mib=300, reservation_mib=512, actual_mib=300), overhead=100)
    assert b.memtune.soft_limit_kib == 400 << 10 and b.memtune.hard_limit_kib == 400 << 10


def test_no_reservation_protects_only_qemu() -> None:
    assert decide(item(), overhead=128).memtune.soft_limit_kib == 128 << 10


def test_a_pool_limit_below_the_balloon_shrinks_it() -> None:
    b = decide(item(entitlement_mib=256, limited_mib=256))
    assert b.balloon_target_mib == 256 and "balloon to 256" in b.reason
    assert decide(item(entitlement_mib=10, limited_mib=10)).balloon_target_mib == MIN_BALLOON_MIB
    # the balloon already at or below what the limits leave: untouched
    assert decide(item(actual_mib=256, entitlement_mib=256, limited_mib=256)).balloon_target_mib is None


@pytest.mark.parametrize("field", ["boot_mib", "actual_mib", "entitlement_mib", "limited_mib", "reservation_mib"])
def test_nonsense_figures_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        decide(item(**{field: -1}))
    with pytest.raises(ValueError, match="overhead"):
        decide(item(), overhead=-5)


@given(st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.integers(0, 1 << 20),
       st.integers(0, 1 << 20))
def test_soft_never_above_hard_and_the_balloon_only_shrinks(boot: int, actual: int, ent: int, lim: int,
                                                           res: int) -> None:
    b = decide(BindInput("vm", boot, actual, min(ent, lim, actual), lim, res))
    assert b.memtune.soft_limit_kib <= b.memtune.hard_limit_kib < UNLIMITED_KIB
    assert b.balloon_target_mib is None or MIN_BALLOON_MIB <= b.balloon_target_mib < actual


def test_changes_only_what_differs() -> None:
    now = Memtune(hard_limit_kib=1 << 20, soft_limit_kib=UNLIMITED_KIB)
    assert memtune_changes(now, now) == {}
    assert memtune_changes(Memtune(1 << 20, 512 << 10), now) == {"soft_limit": 512 << 10}
    assert memtune_changes(Memtune((1 << 20) + 4, UNLIMITED_KIB), now) == {}  # libvirt's page rounding
    assert memtune_changes(Memtune(), now) == {"hard_limit": UNLIMITED_KIB}


def test_limited_entitlements_ignore_capacity_but_not_limits() -> None:
    tree = ResourceTree(capacity_mib=1000)
    tree.create("/a", limit_mib=600)
    tree.create("/a/x", domain="x")
    tree.create("/a/y", domain="y", shares=3000)
    tree.create("/b", reservation_mib=500)
    tree.create("/b/z", domain="z", reservation_mib=500)
    demands = {"x": 800, "y": 800, "z": 800}
    # capacity binds: z keeps its reservation, /a at most its limit
    assert sum(demand.entitlements(tree, demands).values()) == 1000
    # limits alone: /a's 600 split 1:3 by shares, z unlimited
    assert demand.limited_entitlements(tree, demands) == {"x": 150, "y": 450, "z": 800}
    assert demand.limited_entitlements(tree, {}) == {}


def test_reserved_entitlements_share_a_pools_reservation_among_its_vms() -> None:
    tree = ResourceTree(capacity_mib=4096)
    tree.create("/res", reservation_mib=384)
    tree.create("/res/a", domain="a")
    tree.create("/res/b", domain="b", reservation_mib=100, shares=3000)
    tree.create("/free")
    tree.create("/free/c", domain="c")
    tree.create("/own", domain="d", reservation_mib=200)
    got = demand.reserved_entitlements(tree, {"a": 512, "b": 512, "c": 512, "d": 512})
    assert got == {"a": 71, "b": 313, "c": 0, "d": 200}  # b: its 100 + 3/4 of the other 284 (213)
    assert demand.reserved_entitlements(tree, {"a": 50, "b": 512}) == {"a": 50, "b": 334}
