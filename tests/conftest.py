"""Shared pytest setup: markers, KVM skipping, skips that fail under CI, and failure reports for fixtures."""

from __future__ import annotations

import os

import pytest

from tests.support import pytest_runtest_setup  # noqa: F401  (applies the `requires` marker)

#: Set where KVM is known to exist (the GitHub workflow): tests marked ``kvm`` then fail under TCG.
EXPECT_KVM = "HVEXT_EXPECT_KVM"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``kvm`` where hardware KVM is unusable (the accel rule decides).

    Where ``HVEXT_EXPECT_KVM=1`` says the machine has KVM, they fail instead, so a
    broken /dev/kvm cannot silently turn them into skips.
    """
    from hvext import accel

    try:
        acc = accel.current()
    except Exception as err:  # a bad HVEXT_ACCEL must not hide tests
        acc = None
        reason = str(err)
    else:
        reason = acc.reason
    if acc is not None and acc.is_kvm:
        return
    reason = f"needs KVM: {reason}"
    if os.environ.get(EXPECT_KVM, "") == "1":
        mark = pytest.mark.requires(False, f"{reason} ({EXPECT_KVM}=1 says this machine has KVM)", fail=True)
    else:
        mark = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("kvm"):
            item.add_marker(mark)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """Expose each phase's report as ``item.rep_<phase>`` so fixtures can keep artifacts on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
