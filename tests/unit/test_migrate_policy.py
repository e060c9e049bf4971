"""The migration policy's pure decisions: features, the switch to post-copy, the source after a failure."""

from __future__ import annotations

from hvext.migrate.policy import MIB, Plan, Progress, after_failure, plan, should_switch_to_postcopy

RAM = 512 * MIB
CAP = 32  # MiB/s


def capped(dirty_mib_s: float) -> Plan:
    return plan("auto", RAM, int(dirty_mib_s * MIB), CAP * MIB, 300, CAP)


def sample(t: float, iteration: int, remaining_mib: int, dirty_mib_s: float = 0.0, bps_mib_s: float = CAP,
           expected_downtime_ms: int = 300) -> Progress:
    return Progress(t, iteration, remaining_mib * MIB, RAM, int(dirty_mib_s * MIB), int(bps_mib_s * MIB),
                    expected_downtime_ms)


def first_pass(seconds: int = 13) -> list[Progress]:
    """A job setting up for 2 s, then one pass over 512 MiB at 32 MiB/s (QEMU reports no dirty rate yet)."""
    return [sample(0.5, 0, 0), sample(1.5, 0, 0)] + \
        [sample(2 + t, 1, 505 - 32 * t) for t in range(seconds)]


# -- plan ------------------------------------------------------------------

def test_plain_uses_no_feature_and_never_gives_up() -> None:
    p = plan("plain", RAM, 100 * MIB, CAP * MIB, 300, CAP)
    assert not (p.postcopy or p.auto_converge or p.xbzrle_cache or p.multifd_channels)
    assert p.time_budget_s == float("inf")
    assert should_switch_to_postcopy(p, first_pass() + [sample(20, 5, 300, 90, 32, 9000)]) == ""


def test_idle_guest_precopies_with_post_copy_only_as_a_safety_net() -> None:
    p = capped(0)
    assert p.postcopy and not p.postcopy_at_start and not p.xbzrle_cache and not p.auto_converge
    assert "only if it stalls" in p.reason


def test_uncapped_idle_guest_uses_multifd_without_post_copy() -> None:
    p = plan("auto", RAM, 0, None, 300, None)
    assert p.multifd_channels == 2 and not p.postcopy


def test_half_the_bandwidth_gets_xbzrle_and_auto_converge() -> None:
    p = capped(16)
    assert p.auto_converge and p.xbzrle_cache >= 64 * MIB and p.postcopy and not p.postcopy_at_start


def test_dirtying_faster_than_the_link_goes_post_copy_from_the_start() -> None:
    for rate in (32, 64, 1000):
        p = capped(rate)
        assert p.postcopy and p.postcopy_at_start, rate
        assert not p.xbzrle_cache and not p.auto_converge  # no pre-copy pass re-sends anything
        assert "post-copy from the start" in p.reason


# -- the switch to post-copy ------------------------------------------------

def test_planned_switch_waits_for_qemu_then_happens_at_once() -> None:
    p = capped(64)
    assert should_switch_to_postcopy(p, []) == ""
    assert should_switch_to_postcopy(p, [sample(0.5, 0, 0)]) == ""  # libvirt still preparing
    assert "planned" in should_switch_to_postcopy(p, [sample(0.5, 0, 0), sample(1.0, 1, 505)])


def test_idle_guest_is_never_switched() -> None:
    """Pre-copy converging on its own keeps going: no switch in the first pass, nor in a short second one."""
    p = capped(0)
    history = first_pass()
    for i in range(len(history)):
        assert should_switch_to_postcopy(p, history[:i + 1]) == ""
    # the second pass of an idle guest: little left, QEMU's expected downtime above the target for a moment
    history += [sample(15.5, 2, 6, dirty_mib_s=0.4, expected_downtime_ms=400), sample(16, 2, 1, 0.4, 32, 310)]
    assert should_switch_to_postcopy(p, history) == ""


def test_a_first_pass_dirtying_near_the_bandwidth_switches_after_it() -> None:
    """The pre-measured rate was low (the workload started later): the first finished pass decides."""
    p = capped(2)
    history = first_pass()
    assert should_switch_to_postcopy(p, history) == ""
    history.append(sample(15.5, 2, 300, dirty_mib_s=28, expected_downtime_ms=9800))
    assert "dirtied 28 MiB/s" in should_switch_to_postcopy(p, history)


def test_one_slow_moment_of_the_link_does_not_switch() -> None:
    """A sample in which the source sent only 13 MiB/s (the host was busy) is not the link's rate."""
    p = capped(16)
    history = first_pass() + [sample(15.5, 2, 200, dirty_mib_s=16, expected_downtime_ms=6000),
                              sample(16, 2, 190, dirty_mib_s=16, bps_mib_s=13, expected_downtime_ms=15000)]
    assert should_switch_to_postcopy(p, history) == ""


def test_a_converging_second_pass_is_left_alone() -> None:
    p = capped(16)
    history = first_pass() + [sample(15.5, 2, 200, dirty_mib_s=15, expected_downtime_ms=6000)]
    assert should_switch_to_postcopy(p, history) == ""


def test_stalled_passes_switch() -> None:
    p = capped(16)
    history = first_pass()
    t = 15.0
    for iteration, start in [(2, 200), (3, 150), (4, 160)]:  # the third pass starts no smaller
        for left in (start, start // 2):
            history.append(sample(t, iteration, left, dirty_mib_s=18, expected_downtime_ms=5000))
            t += 1
        if iteration < 4:
            assert should_switch_to_postcopy(p, history) == ""
    assert "stopped shrinking" in should_switch_to_postcopy(p, history)


def test_shrinking_passes_do_not_switch() -> None:
    p = capped(16)
    history = first_pass()
    t = 15.0
    for iteration, start in [(2, 200), (3, 120), (4, 70), (5, 40)]:
        history.append(sample(t, iteration, start, dirty_mib_s=18, expected_downtime_ms=1000))
        t += 1
    assert should_switch_to_postcopy(p, history) == ""


def test_past_half_the_budget_switches() -> None:
    p = capped(16)
    late = first_pass() + [sample(p.time_budget_s * 0.5 + 1, 3, 100, dirty_mib_s=10, expected_downtime_ms=3000)]
    assert "has not finished" in should_switch_to_postcopy(p, late)


# -- the source after a failed migration -------------------------------------


def test_a_source_the_migration_paused_is_resumed() -> None:
    recovery = after_failure("paused", "migration", paused_before=False, postcopy_started=False)
    assert recovery.resume and "resumed" in recovery.outcome


def test_a_source_the_user_had_paused_stays_paused() -> None:
    for reason in ("user", "migration"):  # libvirt may report the migration as the last pause reason
        recovery = after_failure("paused", reason, paused_before=True, postcopy_started=False)
        assert not recovery.resume and "as it was before" in recovery.outcome


def test_a_source_paused_for_post_copy_stays_paused() -> None:
    for reason, started in [("post-copy", False), ("post-copy failed", False), ("migration", True)]:
        recovery = after_failure("paused", reason, paused_before=False, postcopy_started=started)
        assert not recovery.resume and "post-copy" in recovery.outcome


def test_a_source_paused_for_another_reason_is_left_alone() -> None:
    recovery = after_failure("paused", "I/O error", paused_before=False, postcopy_started=False)
    assert not recovery.resume and "I/O error" in recovery.outcome


def test_a_running_or_stopped_source_is_not_touched() -> None:
    assert after_failure("running", "", False, False) == after_failure("running", "", True, True)
    assert not after_failure("running", "", False, False).resume
    assert "keeps running" in after_failure("running", "", False, False).outcome
    shut = after_failure("shutoff", "", False, False)
    assert not shut.resume and "shutoff" in shut.outcome
