"""Skips that cannot hide a broken install.

A test that needs something ``make setup`` installs (the patched QEMU,
libvirtd, root, a free lab slot, ...) calls :func:`require`, or carries
``@pytest.mark.requires(condition, reason)``. Locally a missing part skips
the test with the reason; under ``CI=true`` (set by ``.ci/run`` and GitHub
Actions) setup has run, so a missing part is a broken install and the test
fails with the reason instead. Plain ``pytest.skip`` stays for what setup
cannot provide (hardware KVM on a CPU without vmx/svm, a file system
feature).

``tests/conftest.py`` imports :func:`pytest_runtest_setup` so the marker
works in the suite (registered in pyproject.toml); ``-p tests.support``
loads it into any pytest run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import pytest

#: Values of ``CI`` that mean "running in CI" (GitHub Actions sets ``true``).
CI_VALUES = frozenset({"1", "true", "yes"})


def in_ci(env: Mapping[str, str] | None = None) -> bool:
    """Whether this run is CI, where everything setup installs must be present."""
    return (os.environ if env is None else env).get("CI", "").strip().lower() in CI_VALUES


def missing(reason: str, *, fail: bool | None = None) -> None:
    """Skip with *reason*, or fail with it when *fail* (default: under CI)."""
    if in_ci() if fail is None else fail:
        pytest.fail(f"{reason} (CI=true: setup provides this, so its absence is a broken install)",
                    pytrace=False)
    pytest.skip(reason)


def require(condition: object, reason: str, *, fail: bool | None = None) -> None:
    """Go on when *condition* holds; otherwise skip locally, fail under ``CI=true`` (or when *fail*)."""
    if not condition:
        missing(reason, fail=fail)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Apply every ``requires`` marker of *item* (module, class and function level)."""
    for marker in item.iter_markers("requires"):
        require(*marker.args, **marker.kwargs)
