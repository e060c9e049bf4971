"""Pure HA decisions (hvext.ha.policy): fencing, renewal interval, which orphans a host claims."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvext.ha import policy
from hvext.ha.policy import Fence


def test_fences_at_ttl_minus_margin_not_before() -> None:
    assert policy.fence_decision(last_renewal=100.0, now=103.9, ttl=5, margin=1) is Fence.RUN
    assert policy.fence_decision(last_renewal=100.0, now=104.0, ttl=5, margin=1) is Fence.FENCE
    assert policy.fence_decision(last_renewal=100.0, now=130.0, ttl=5, margin=1) is Fence.FENCE


def test_a_margin_of_the_whole_ttl_fences_at_once_and_bad_values_are_refused() -> None:
    assert policy.fence_decision(100.0, 100.0, ttl=5, margin=5) is Fence.FENCE
    with pytest.raises(ValueError):
        policy.fence_decision(100.0, 100.0, ttl=0)
    with pytest.raises(ValueError):
        policy.fence_decision(100.0, 100.0, ttl=5, margin=-1)


@given(ttl=st.floats(0.5, 600), margin=st.floats(0, 10), elapsed=st.floats(0, 1000))
def test_never_runs_once_the_lease_may_have_expired(ttl: float, margin: float, elapsed: float) -> None:
    decision = policy.fence_decision(0.0, elapsed, ttl, margin)
    if elapsed >= ttl:
        assert decision is Fence.FENCE


def test_the_margin_widens_with_the_fence_paths_measured_latency_up_to_half_the_ttl() -> None:
    # An idle host keeps the configured margin; a loaded one (the partition test's pause came 1.3 s after
    # the watchdog's deadline in a CI run) fences early enough for its pause to land within the TTL.
    assert policy.fence_margin(1.0, latency=0.02, ttl=5) == 1.0
    assert policy.fence_margin(1.0, latency=0.7, ttl=5) == pytest.approx(1.9)
    assert policy.fence_margin(1.0, latency=10.0, ttl=5) == 2.5      # never past half the TTL
    assert policy.fence_margin(3.0, latency=0.0, ttl=5) == 3.0       # a larger configured margin stays
    assert policy.fence_margin(5.0, latency=0.0, ttl=5) == 2.5       # a margin of the whole TTL: half
    for bad in ((-1.0, 0.0, 5.0), (1.0, -0.1, 5.0), (1.0, 0.0, 0.0)):
        with pytest.raises(ValueError):
            policy.fence_margin(*bad)


@given(ttl=st.floats(2, 300), margin=st.floats(0, 10), latency=st.floats(0, 5))
def test_a_fence_measured_to_take_latency_lands_before_the_lease_ends(ttl: float, margin: float,
                                                                      latency: float) -> None:
    """When the fence's path takes as long as measured (twice over, for the pause itself), the pause
    lands within the TTL whenever the latency leaves room for it within half the TTL."""
    kept = policy.fence_margin(margin, latency, ttl)
    fence_at = ttl - kept
    assert policy.fence_decision(0.0, fence_at, ttl, kept) is Fence.FENCE
    assert fence_at >= ttl / 2 or margin >= ttl / 2
    if policy.FENCE_LATENCY_FACTOR * latency + policy.FENCE_SLACK_S <= ttl / 2:
        assert fence_at + policy.FENCE_LATENCY_FACTOR * latency < ttl


def test_renewals_fit_several_times_in_a_ttl() -> None:
    assert policy.renew_interval(6) == 2
    with pytest.raises(ValueError):
        policy.renew_interval(0)


def test_orphans_are_protected_domains_without_an_owner() -> None:
    found = policy.orphans(["a", "b", "c"], {"b": "h1"}, ["h1", "h2"])
    assert [o.domain for o in found] == ["a", "c"]
    assert all(o.preferred in ("h1", "h2") for o in found)
    assert policy.orphans(["a"], {}, []) == []  # no live host: nobody to claim


def test_every_host_agrees_on_the_preferred_host() -> None:
    hosts = ["h1", "h2", "h3"]
    for domain in (f"vm{i}" for i in range(50)):
        assert policy.preferred_host(domain, hosts) == policy.preferred_host(domain, list(reversed(hosts)))


def test_orphans_spread_over_the_survivors() -> None:
    domains = [f"vm{i}" for i in range(60)]
    claims = {h: policy.to_claim(h, domains, {}, ["h1", "h2", "h3"]) for h in ("h1", "h2", "h3")}
    assert sorted(d for c in claims.values() for d in c) == sorted(domains)  # each exactly once
    assert all(len(c) >= 10 for c in claims.values())


def test_after_the_grace_any_live_host_claims() -> None:
    live = ["h1", "h2"]
    theirs = [d for d in (f"vm{i}" for i in range(20)) if policy.preferred_host(d, live) == "h2"]
    assert policy.to_claim("h1", theirs, {}, live) == []
    assert policy.to_claim("h1", theirs, {}, live, {d: 2.0 for d in theirs}, grace=5.0) == []
    assert policy.to_claim("h1", theirs, {}, live, {d: 5.0 for d in theirs}, grace=5.0) == sorted(theirs)


def test_a_host_whose_own_key_is_gone_claims_nothing() -> None:
    assert policy.to_claim("h1", ["a", "b"], {}, ["h2"]) == []


def test_adopt_home_claims_its_own_and_survivors_only_orphans_of_dead_hosts() -> None:
    homes = {"a1": "a", "b1": "b", "d1": "dead", "d2": "dead", "owned": "dead"}
    owners = {"owned": "c"}
    live = ["a", "b", "c"]
    picks = {h: policy.to_adopt(h, homes, owners, live) for h in live}
    assert "a1" in picks["a"] and "a1" not in picks["b"] + picks["c"]   # a live home keeps its domain
    assert "b1" in picks["b"] and "b1" not in picks["a"] + picks["c"]
    assert all("owned" not in p for p in picks.values())               # an owned domain is nobody's to claim
    for orphan in ("d1", "d2"):                                         # each orphan: exactly its preferred host
        assert [h for h in live if orphan in picks[h]] == [policy.preferred_host(orphan, live)]
    assert policy.to_adopt("x", homes, owners, live) == []               # a host not alive claims nothing
    # after the grace, every live host tries (the transaction picks one)
    late = {h: policy.to_adopt(h, homes, owners, live, {"d1": 9.0}, grace=5.0) for h in live}
    assert all("d1" in p for p in late.values())
