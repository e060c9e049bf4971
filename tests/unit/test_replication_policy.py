"""Pure decisions of C16 replication: replica choice, who may claim a replicated domain, status rows."""

from __future__ import annotations

import pytest

from hvext.ha import policy, replication_policy as rp


def test_replicas_are_other_live_hosts_stably_chosen() -> None:
    live = ["h1", "h2", "h3", "h4"]
    two = rp.choose_replicas("vm", "h1", live, 2)
    assert len(two) == 2 and "h1" not in two and set(two) <= set(live)
    assert rp.choose_replicas("vm", "h1", list(reversed(live)), 2) == two       # order of the list is irrelevant
    assert set(two) <= set(rp.choose_replicas("vm", "h1", live, 3))             # rendezvous: a prefix
    with pytest.raises(ValueError, match="only 1 other"):
        rp.choose_replicas("vm", "h1", ["h1", "h2"], 2)
    with pytest.raises(ValueError):
        rp.choose_replicas("vm", "h1", live, 0)


def test_claimers_are_live_replicas_with_the_newest_ack() -> None:
    assert rp.claimers(["h2", "h3"], {"h2": 7, "h3": 9}, ["h2", "h3", "h4"]) == {"h3"}
    assert rp.claimers(["h2", "h3"], {"h2": 7, "h3": 9}, ["h2", "h4"]) == {"h2"}   # h3 dead: the best alive
    assert rp.claimers(["h2", "h3"], {"h2": 9, "h3": 9}, ["h2", "h3"]) == {"h2", "h3"}
    assert rp.claimers(["h2", "h3"], {}, ["h2", "h3", "h4"]) == {"h2", "h3"}        # nothing acked yet
    assert rp.claimers(["h2", "h3"], {"h2": 5}, ["h1", "h4"]) == set()              # no replica alive


def test_only_eligible_replicas_claim_a_replicated_orphan_even_after_the_grace() -> None:
    homes = {"vm": "h1", "plain": "h1"}
    live = ["h2", "h3", "h4"]
    eligible = {"vm": {"h3"}}
    picks = {me: policy.to_adopt(me, homes, {}, live, {"vm": 100.0, "plain": 100.0}, grace=5.0, eligible=eligible)
             for me in live}
    assert [me for me, p in picks.items() if "vm" in p] == ["h3"]
    assert all("plain" in p for p in picks.values())                              # grace passed: anyone
    before_grace = {me: policy.to_adopt(me, homes, {}, live, eligible=eligible) for me in live}
    assert [me for me, p in before_grace.items() if "vm" in p] == ["h3"]          # preferred among eligible only
    # Nobody eligible alive: nobody claims it (its PMEM exists nowhere else).
    assert all("vm" not in policy.to_adopt(me, homes, {}, live, {"vm": 100.0}, 5.0, {"vm": set()}) for me in live)
    # Its home alive (after a fence, say) re-adopts it, replicas or not.
    assert policy.to_adopt("h1", homes, {}, ["h1", "h2"], eligible={"vm": {"h2"}}) == ["plain", "vm"]
    # Without eligibility the old rule holds: whoever the hash prefers.
    assert sum("vm" in policy.to_adopt(me, homes, {}, live) for me in live) == 1


def test_status_rows_say_lag_and_dead_replicas() -> None:
    rows = rp.replica_states(["h2", "h3", "h4"],
                             {"h2": {"epoch": 10, "cut_at": 100.0, "pending_bytes": 0},
                              "h3": {"epoch": 7, "cut_at": 97.5, "pending_bytes": 4096},
                              "h4": {"epoch": 3, "cut_at": 90.0, "error": "peer 10.0.0.4:2390 is unreachable"}},
                             ["h1", "h2", "h3", "h4"], 10, 100.0)
    by = {r["host"]: r for r in rows}
    assert by["h2"]["state"] == "in sync" and by["h2"]["lag_epochs"] == 0 and by["h2"]["lag_seconds"] == 0.0
    assert by["h3"]["state"] == "behind" and by["h3"]["lag_bytes"] == 4096 and by["h3"]["lag_seconds"] == 2.5
    assert by["h4"]["state"].startswith("unreachable")
    dead = rp.replica_states(["h2"], {"h2": {"epoch": 4}}, ["h1"], 10, 100.0)
    assert dead[0]["state"].startswith("dead") and dead[0]["lag_epochs"] == 6 and dead[0]["lag_seconds"] is None


def test_ha_config_checks_the_replication_keys() -> None:
    from hvext.daemon.config import HAConfig
    from hvext.errors import UsageError
    base = {"etcd_endpoints": ["https://198.18.0.12:2379", "https://198.18.0.11:2379"]}
    config = HAConfig.from_table(base)
    assert (config.epoch_interval, config.peer_port, config.peer_host()) == (1.0, 2390, "198.18.0.12")
    assert HAConfig.from_table({**base, "peer_address": "10.0.0.5", "epoch_interval": 0.5,
                                "peer_port": 4000}).peer_host() == "10.0.0.5"
    for key, bad in [("epoch_interval", 0), ("epoch_interval", True), ("peer_port", 70000), ("peer_port", "1"),
                     ("peer_address", "a b"), ("peer_address", "[::1]"), ("peer_address", 5)]:
        with pytest.raises(UsageError, match=key):
            HAConfig.from_table({**base, key: bad})
