"""A domain's run state as hvext reads it: an enum mapped from libvirt in hvext.host alone, with the
pause reason, on libvirt's test driver (a real libvirt domain, no VM)."""

from __future__ import annotations

from collections.abc import Iterator

import libvirt
import pytest

from tests.unit.testdriver import running_domain

from hvext.errors import DomainStateError
from hvext.host import Domain, RunState

XML = """<domain type='test'><name>{name}</name><memory unit='MiB'>256</memory>
<os><type>hvm</type></os></domain>"""


@pytest.fixture
def domain() -> Iterator[Domain]:
    with running_domain(XML, "state") as dom:
        yield dom


def test_every_libvirt_run_state_has_a_name() -> None:
    """libvirt's VIR_DOMAIN_<state> constants (this test reads them from libvirt) all map to a RunState."""
    from hvext import host
    codes = {getattr(libvirt, f"VIR_DOMAIN_{s.name}") for s in RunState if s is not RunState.UNKNOWN}
    assert set(host._RUN_STATES) == codes and len(set(host._RUN_STATES.values())) == len(codes)
    assert str(RunState.SHUTOFF) == "shut off"


def test_state_follows_the_domain_and_says_why_it_is_paused(domain: Domain) -> None:
    assert domain.state is RunState.RUNNING and domain.state_and_reason() == (RunState.RUNNING, "")
    domain.dom.suspend()  # behind hvext's back, as virsh would
    assert domain.state_and_reason() == (RunState.PAUSED, "user")
    assert domain.info()["state"] == "paused"
    domain.dom.resume()
    domain.destroy()
    assert domain.state is RunState.SHUTOFF and not domain.is_active()


def test_require_running_guards_a_shut_off_domain(domain: Domain) -> None:
    domain.require_running()
    domain.destroy()
    with pytest.raises(DomainStateError, match=f"domain '{domain.name}' is not running"):
        domain.require_running()
