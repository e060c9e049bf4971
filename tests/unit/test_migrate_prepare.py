"""Migration planning on libvirt's test driver (a real libvirt domain, no VM): what RAM is planned
for, what happens without a dirty rate, and that the libvirt calls leave the event loop free."""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvext import aio, paths
from hvext.host import Domain, Host
from hvext.migrate import orchestrate, policy
from hvext.units import MIB
from tests.unit.testdriver import running_domain
from tests.unit.test_qemu_replies import ThreadSpy

XML = """<domain type='test'><name>{name}</name>
<maxMemory slots='4' unit='MiB'>2048</maxMemory><memory unit='MiB'>576</memory>
<cpu><numa><cell id='0' cpus='0' memory='512' unit='MiB'/></numa></cpu><os><type>hvm</type></os>
<devices><memory model='nvdimm'><source><path>/tmp/unused.img</path></source>
<target><size unit='MiB'>64</size><node>0</node></target></memory></devices></domain>"""


@pytest.fixture
def domain() -> Iterator[Domain]:
    with running_domain(XML, "migrate") as dom:
        yield dom


class OtherHost(Host):
    """The same test driver seen as another host (migrate refuses a destination that is the source)."""

    @functools.cached_property
    def host_uuid(self) -> str:
        return "d0000000-0000-4000-8000-000000000001"


def test_migration_planning_counts_boot_memory_logs_a_missing_rate_and_leaves_the_loop_free(
        domain: Domain, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    short = Path(tempfile.mkdtemp(prefix="hv-"))  # socket paths must stay short
    try:
        migrate_on_the_test_driver(domain, short, monkeypatch, caplog)
    finally:
        shutil.rmtree(short)


def migrate_on_the_test_driver(domain: Domain, tmp: Path, monkeypatch: pytest.MonkeyPatch,
                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(paths, "STATE_DIR", tmp / "state")
    monkeypatch.setattr(paths, "LOG_DIR", tmp / "log")
    monkeypatch.setattr(orchestrate, "Host", OtherHost)
    planned: list[tuple[Any, ...]] = []

    def recording_plan(*args: Any) -> policy.Plan:
        planned.append(args)
        return policy.plan(*args)
    monkeypatch.setattr(orchestrate, "plan", recording_plan)
    calls: list[tuple[str, str]] = []
    domain.dom = ThreadSpy(domain.dom, calls)  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, "hvext.migrate.orchestrate"), \
            pytest.raises(orchestrate.MigrationError):  # the test driver cannot migrate
        aio.run(orchestrate.migrate(domain, "test:///default", policy="auto"))
    assert planned and planned[0][1] == 512 * MIB  # the 64 MiB NVDIMM is not RAM to migrate
    assert planned[0][2] == 0  # planned without a rate (the test driver has no QMP) ...
    assert f"{domain.name}: dirty rate not measured (" in caplog.text  # ... and says why
    assert {"XMLDesc", "state"} <= {call for call, _ in calls}
    assert [call for call, thread in calls if thread == "hvext-aio"] == []  # aio.run's loop thread


def test_a_missing_dirty_rate_is_in_the_result(domain: Domain) -> None:
    ram, measured, error = aio.run(orchestrate._ram_and_rate(domain, "auto"))
    assert (ram, measured) == (512 * MIB, None) and error
    assert aio.run(orchestrate._ram_and_rate(domain, "plain")) == (512 * MIB, None, "")
    assert orchestrate.Result.__dataclass_fields__["dirty_rate_error"].default == ""
