"""Shared pytest setup: markers, KVM skipping, and failure reports for fixtures."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``kvm`` where hardware KVM is unusable (the accel rule decides)."""
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
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if item.get_closest_marker("kvm"):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    """Expose each phase's report as ``item.rep_<phase>`` so fixtures can keep artifacts on failure."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
