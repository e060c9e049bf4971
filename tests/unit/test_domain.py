"""hvext.host.Domain on libvirt's test driver (a real libvirt domain, no VM): the run state as an enum
mapped from libvirt in hvext.host alone, the guards, and every libvirt call translated there."""

from __future__ import annotations

import os
from collections.abc import Iterator

import libvirt
import pytest

from tests.unit.testdriver import PLAIN_XML, running_domain

from hvext.errors import DomainStateError, HvextError, QMPError
from hvext.host import Domain, Host, JobStats, MigrationOptions, RunState

XML = PLAIN_XML


@pytest.fixture
def domain() -> Iterator[Domain]:
    with running_domain(XML, "dom") as dom:
        yield dom


def test_every_libvirt_run_state_has_a_name() -> None:
    """libvirt's VIR_DOMAIN_<state> constants (this test reads them from libvirt) all map to a RunState."""
    from hvext import host
    codes = {getattr(libvirt, f"VIR_DOMAIN_{s.name}") for s in RunState if s is not RunState.UNKNOWN}
    assert set(host._RUN_STATES) == codes and len(set(host._RUN_STATES.values())) == len(codes)
    assert str(RunState.SHUTOFF) == "shut off"


def test_state_follows_the_domain_and_says_why_it_is_paused(domain: Domain) -> None:
    assert domain.state is RunState.RUNNING and domain.state_and_reason() == (RunState.RUNNING, "")
    domain.suspend()
    assert domain.state_and_reason() == (RunState.PAUSED, "user")
    assert domain.info()["state"] == "paused"
    domain.resume()
    domain.destroy()
    assert domain.state is RunState.SHUTOFF and not domain.is_active()


def test_require_running_guards_a_shut_off_domain(domain: Domain) -> None:
    domain.require_running()
    domain.destroy()
    with pytest.raises(DomainStateError, match=f"domain '{domain.name}' is not running"):
        domain.require_running()


# -- libvirt behind Domain and Host: each call translated, guarded where it needs a state ------------


def test_xml_forms_and_redefine(domain: Domain) -> None:
    assert f"<name>{domain.name}</name>" in domain.xml()
    assert domain.is_persistent() and "<title>" not in domain.xml(inactive=True)
    assert f"<name>{domain.name}</name>" in domain.xml(migratable=True, secure=True)
    domain.redefine(domain.xml(inactive=True).replace("</name>", "</name><title>renamed</title>", 1))
    assert "<title>renamed</title>" in domain.xml(inactive=True)


def test_suspend_resume_start_and_their_guards(domain: Domain) -> None:
    domain.suspend()
    assert domain.state is RunState.PAUSED
    domain.resume()
    assert domain.state is RunState.RUNNING
    with pytest.raises(DomainStateError, match="already running"):
        domain.start(paused=True)
    domain.destroy()
    for guarded in (domain.suspend, domain.resume):  # refused with hvext's reason, before libvirt is asked
        with pytest.raises(DomainStateError, match=f"domain '{domain.name}' is not running"):
            guarded()
    domain.start()  # (the test driver cannot start paused: tests/vm/test_power.py restores that way)
    assert domain.state is RunState.RUNNING


def test_memory_and_metadata(domain: Domain) -> None:
    ns = "https://example.invalid/hvext-unit"
    assert domain.metadata(ns) is None  # nothing recorded: not an error
    domain.set_metadata("unit", ns, "<record value='1'/>")
    assert "value=\"1\"" in (domain.metadata(ns) or "")
    domain.set_memory(128 * 1024, live=True)
    assert domain.info()["used_memory_kib"] == 128 * 1024


def test_every_libvirt_failure_leaves_as_an_hvext_error() -> None:
    """A domain that vanished behind hvext's back: each call raises an HvextError, never a libvirtError."""
    with Host("test:///default") as host:
        raw = host.conn.createXML(XML.format(name=f"hvext-unit-{os.getpid()}-gone"), 0)  # transient
        domain = host.lookup(raw.name())
        raw.destroy()
        calls = [domain.is_persistent, domain.xml, domain.suspend, domain.resume, domain.abort_job,
                 domain.start_postcopy, domain.job_stats, lambda: domain.metadata("urn:x"),
                 lambda: domain.set_memory(1024, live=False), lambda: domain.redefine("<domain/>"),
                 lambda: domain.set_max_downtime(100), lambda: domain.attach_device("<x/>", config=True, live=False),
                 lambda: domain.detach_device("<x/>", config=True, live=False),
                 lambda: domain.migrate("test:///default", MigrationOptions(dest_xml="<domain/>"))]
        for call in calls:
            with pytest.raises(HvextError):  # a libvirtError would escape pytest.raises
                call()
        with pytest.raises(QMPError):
            domain.monitor_command("query-status", '{"execute": "query-status"}')


def test_host_watch_registers_and_unregisters() -> None:
    """Registration only: the test driver delivers no events to libvirtaio (tests/vm/test_daemon.py sees them)."""
    with Host("test:///default") as host:
        assert host.keep_alive() is False  # an in-process driver has no keepalive (and needs none)
        handle = host.watch(lambda domain, event, detail: None, lambda reason: None)
        host.unwatch(handle)
        with pytest.raises(HvextError):  # already gone: translated too
            host.unwatch(handle)


def test_job_stats_read_libvirts_typed_parameters() -> None:
    assert JobStats.from_libvirt({}) is None
    idle = JobStats.from_libvirt({"type": libvirt.VIR_DOMAIN_JOB_NONE})
    assert idle is not None and not idle.active and idle.downtime_ms is None
    running = JobStats.from_libvirt({"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "memory_remaining": 5,
                                     "memory_page_size": 4096, "downtime": 30})
    assert running == JobStats(active=True, memory_remaining=5, memory_page_size=4096, downtime_ms=30)


def test_migration_options_become_libvirts_flags_and_parameters() -> None:
    flags, params = MigrationOptions(dest_xml="<domain/>").flags_and_params()
    assert flags == libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
    assert params == {"destination_xml": "<domain/>", "persistent_xml": "<domain/>"}
    flags, params = MigrationOptions(dest_xml="x", bandwidth_mib=100, auto_converge=True, xbzrle_cache=1 << 20,
                                     multifd_channels=2, postcopy=True, unsafe=True).flags_and_params()
    for flag in (libvirt.VIR_MIGRATE_AUTO_CONVERGE, libvirt.VIR_MIGRATE_COMPRESSED, libvirt.VIR_MIGRATE_PARALLEL,
                 libvirt.VIR_MIGRATE_POSTCOPY, libvirt.VIR_MIGRATE_UNSAFE):
        assert flags & flag
    assert params["bandwidth"] == params["bandwidth.postcopy"] == 100 and params["compression"] == "xbzrle"
    assert params["compression.xbzrle.cache"] == 1 << 20 and params["parallel.connections"] == 2
