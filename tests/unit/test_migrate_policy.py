"""The migration policy's pure decisions: features, the switch to post-copy, the source after a failure."""

from __future__ import annotations

from hvext.migrate.policy import after_failure

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
