"""The pause around a guest PMEM snapshot, on libvirt's test driver (a real libvirt domain, no VM):
a guest frozen at an epoch for the pause is thawed also when the suspend or the resume fails."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from tests.unit.testdriver import PLAIN_XML, running_domain

from hvext.errors import HostError
from hvext.host import Domain, RunState
from hvext.pmem import guestsnap, hints

XML = PLAIN_XML


class Failing:
    """Fault injection (the test driver cannot be made to refuse a suspend or resume): libvirt's
    handle of the domain, except that the named call fails."""

    def __init__(self, dom: libvirt.virDomain, call: str) -> None:
        self._dom, self._call = dom, call

    def __getattr__(self, name: str) -> Any:
        if name == self._call:
            def refuse(*args: Any) -> int:
                raise libvirt.libvirtError(f"injected: {name} refused")
            return refuse
        return getattr(self._dom, name)


@pytest.fixture
def domain() -> Iterator[Domain]:
    with running_domain(XML, "snap") as dom:
        yield dom


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the guest agent would be asked: freeze before the pause, thaw after."""
    seen: list[str] = []
    monkeypatch.setattr(hints, "before_pause", lambda dom: seen.append("freeze") or {"epoch_consistent": True})
    monkeypatch.setattr(hints, "after_resume", lambda dom: seen.append("thaw"))
    return seen


def test_a_guest_frozen_for_a_pause_that_fails_is_thawed(domain: Domain, calls: list[str]) -> None:
    real = domain.dom
    domain.dom = Failing(real, "suspend")  # type: ignore[assignment]
    with pytest.raises(HostError, match="suspend refused"), guestsnap.paused(domain):
        pytest.fail("the block ran without a pause")
    assert calls == ["freeze", "thaw"]
    assert domain.state is RunState.RUNNING


def test_a_guest_whose_resume_fails_is_thawed_all_the_same(domain: Domain, calls: list[str]) -> None:
    real = domain.dom
    domain.dom = Failing(real, "resume")  # type: ignore[assignment]
    with pytest.raises(HostError, match="resume refused"), guestsnap.paused(domain):
        assert domain.state is RunState.PAUSED
    assert calls == ["freeze", "thaw"]


def test_a_paused_snapshot_freezes_and_thaws_once(domain: Domain, calls: list[str]) -> None:
    with guestsnap.paused(domain) as (_, epoch):
        assert domain.state is RunState.PAUSED and epoch == {"epoch_consistent": True}
    assert calls == ["freeze", "thaw"] and domain.state is RunState.RUNNING
