import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvext.errors import UsageError
from hvext.memory.policy import MIB, GuestMemory, VMState, decide, mom_step

GIB = 1024 * MIB


def vm(free: int = 0, cache: int = 0, inactive: int = 0, swap: int = 0, responsive: bool = True,
       agent: bool = True, available: int | None = None) -> VMState:
    guest = GuestMemory(total=GIB, free=free, clean_cache=cache, anon_inactive=inactive, swap_free=swap)
    return VMState("vm", actual=GIB, balloon_responsive=responsive, guest=guest if agent else None,
                   balloon_available=available)


def test_mostly_free_guest_is_ballooned() -> None:
    d = decide(vm(free=800 * MIB), 400 * MIB)
    assert (d.method, d.balloon, d.swap) == ("balloon", 400 * MIB, 0)
    assert "free 800" in d.reason


def test_clean_cache_counts_as_spare_but_hot_anon_does_not() -> None:
    assert decide(vm(free=50 * MIB, cache=600 * MIB), 400 * MIB).method == "balloon"
    hot = decide(vm(free=40 * MIB, inactive=300 * MIB), 400 * MIB)  # no guest swap: inactive anon is not spare
    assert hot.method == "swap" and hot.balloon == 0 and hot.swap == 400 * MIB
    with_swap = decide(vm(free=60 * MIB, inactive=300 * MIB, swap=GIB), 400 * MIB)
    assert with_swap.method == "balloon+swap"
    assert with_swap.balloon == 360 * MIB - GIB // 20 and with_swap.balloon + with_swap.swap == 400 * MIB


def test_split_keeps_a_margin() -> None:
    d = decide(vm(free=300 * MIB), 400 * MIB)
    assert d.method == "balloon+swap" and d.balloon + d.swap == 400 * MIB
    assert d.balloon == 300 * MIB - GIB // 20


def test_dead_balloon_driver_means_swap() -> None:
    d = decide(vm(free=900 * MIB, responsive=False), 400 * MIB)
    assert (d.method, d.swap) == ("swap", 400 * MIB) and "not responding" in d.reason
    with pytest.raises(UsageError, match="does not respond"):
        decide(vm(responsive=False), 100 * MIB, "balloon")


def test_missing_agent_limits_the_balloon_to_the_drivers_figure() -> None:
    d = decide(vm(agent=False, available=200 * MIB), 400 * MIB)
    assert d.balloon == 200 * MIB - GIB // 20 and d.swap == 400 * MIB - d.balloon
    assert "agent report unavailable" in d.reason
    blind = decide(vm(agent=False), 400 * MIB)
    assert blind.method == "swap"


def test_a_lying_guest_only_hurts_itself() -> None:
    # claims 100 GiB free: the balloon is still bounded by the VM's own size
    liar = VMState("vm", actual=GIB, balloon_responsive=True,
                   guest=GuestMemory(total=GIB, free=100 * GIB, clean_cache=0, anon_inactive=0))
    d = decide(liar, 800 * MIB)
    assert d.balloon <= GIB - 128 * MIB and d.balloon + d.swap == 800 * MIB


def test_explicit_methods_and_bad_input() -> None:
    assert decide(vm(free=900 * MIB), 100 * MIB, "swap").method == "swap"
    assert decide(vm(), 100 * MIB, "balloon").method == "balloon"
    for amount, method, message in [(0, "auto", "positive"), (100 * MIB, "magic", "unknown reclaim method"),
                                    (GIB, "auto", "keeps at least")]:
        with pytest.raises(UsageError, match=message):
            decide(vm(), amount, method)


def test_balloon_never_goes_below_the_drivers_floor() -> None:
    state = VMState("vm", actual=GIB, balloon_responsive=True, balloon_floor=900 * MIB,
                    guest=GuestMemory(total=GIB, free=800 * MIB, clean_cache=0, anon_inactive=0))
    d = decide(state, 400 * MIB)
    assert d.balloon == GIB - 900 * MIB and d.swap == 400 * MIB - d.balloon


def test_mom_step_shrinks_at_most_5_percent_under_host_pressure() -> None:
    assert mom_step(0.10, GIB, GIB, guest_free=800 * MIB) == int(GIB * 0.95)
    # above the 20 % threshold: no pressure, and a guest at its maximum stays there
    assert mom_step(0.20, GIB, GIB, guest_free=800 * MIB) is None


def test_mom_step_keeps_20_percent_of_the_guest_free() -> None:
    # uses 800 MiB: the floor is 800 + 20 % of 1 GiB = 1004.8 MiB, above the 5 % step (972.8 MiB)
    assert mom_step(0.10, GIB, GIB, guest_free=224 * MIB) == 800 * MIB + int(GIB * 0.2)
    # already at 20 % free (page cache is not free): no change
    assert mom_step(0.10, GIB, GIB, guest_free=200 * MIB) is None
    # a guest claiming more free memory than it has cannot make the step larger than 5 %
    assert mom_step(0.10, GIB, GIB, guest_free=100 * GIB) == int(GIB * 0.95)


def test_mom_step_grows_back_without_pressure() -> None:
    assert mom_step(0.5, 600 * MIB, GIB, guest_free=500 * MIB) == int(600 * MIB * 1.05)
    # a guest short of free memory is given used + 20 % of its maximum at once
    assert mom_step(0.5, 600 * MIB, GIB, guest_free=0) == min(GIB, 600 * MIB + int(GIB * 0.2))
    assert mom_step(0.5, int(GIB * 0.999), GIB, guest_free=GIB) is None  # too small a change


def test_mom_step_rejects_nonsense() -> None:
    with pytest.raises(UsageError):
        mom_step(0.1, 0, GIB, guest_free=0)


@given(st.floats(0, 1), st.integers(1, 64 * GIB), st.integers(-GIB, 128 * GIB))
def test_mom_step_moves_at_most_5_percent_down_and_never_above_the_maximum(host_free: float, actual: int,
                                                                           guest_free: int) -> None:
    target = mom_step(host_free, actual, 64 * GIB, guest_free)
    if target is not None:
        assert target <= 64 * GIB
        if host_free < 0.2:
            assert int(actual * 0.95) <= target < actual
