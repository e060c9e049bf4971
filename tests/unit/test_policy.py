import pytest

from hvext.errors import UsageError
from hvext.memory.policy import MIB, GuestMemory, VMState, decide

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
