"""Live migration between two lab hosts: plain and auto, and a destination killed halfway."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext import aio
from hvext.agent.client import AgentInfo, StressStatus
from hvext.errors import DomainNotFound
from hvext.host import Domain, Host, RunState
from hvext.lab import Lab
from hvext.memory.swap import qemu_pid
from hvext.migrate import orchestrate
from tests.support import require
from tests.vm.conftest import VMFactory


@pytest.fixture(scope="module")
def lab(guest_image) -> Iterator[Lab]:
    existing = Lab.load()
    require(existing is None or len(existing.hosts) == 2, "another lab is up; these tests need a 2-host lab")
    lab = Lab.up(2)
    yield lab
    if existing is None:
        lab.down()


@pytest.fixture(scope="module")
def hosts(lab: Lab) -> Iterator[tuple[Host, Host]]:
    first, second = Host(lab.hosts[0].uri_unix), Host(lab.hosts[1].uri_unix)
    yield first, second
    first.close()
    second.close()


@pytest.fixture
def migrating_vm(hosts, request) -> Iterator[Domain]:
    """A guest on lab host1; teardown removes it from whichever host it ended on."""
    factories = [VMFactory(hosts[0]), VMFactory(hosts[1])]
    domain = factories[0].boot(factories[0].define(memory_mib=512))
    yield domain
    for factory, host in zip(factories, hosts):
        try:
            moved = host.lookup(domain.name)
        except DomainNotFound:
            continue
        factory.domains = [moved]
        if getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed:
            factory.keep_logs(request.node.nodeid)
        factory.cleanup()


def agent_info(domain: Domain) -> AgentInfo:
    return aio.run(domain.wait_agent(60))


def test_plain_then_auto_under_a_dirtying_workload(migrating_vm: Domain, hosts, lab: Lab) -> None:
    source, dest = hosts
    uptime = agent_info(migrating_vm).uptime_s
    plain = aio.run(orchestrate.migrate(migrating_vm, lab.hosts[1].uri_tls, policy="plain"))
    assert plain.downtime_ms is not None and plain.total_s > 0
    with pytest.raises(DomainNotFound):
        source.lookup(migrating_vm.name)  # undefined on the source
    moved = dest.lookup(migrating_vm.name)
    assert moved.state is RunState.RUNNING and agent_info(moved).uptime_s >= uptime  # same guest, not rebooted

    async def stress() -> None:
        async with moved.agent() as agent:
            await agent.stress_start(64, 200)
    aio.run(stress())
    time.sleep(3)
    auto = aio.run(orchestrate.migrate(moved, lab.hosts[0].uri_tls, policy="auto", bandwidth_mib=32))
    assert auto.measured_dirty_rate_mib_s and auto.measured_dirty_rate_mib_s > 16
    assert "post-copy" in auto.plan_reason and auto.postcopy_switch, auto.plan_reason
    back = source.lookup(migrating_vm.name)
    assert back.state is RunState.RUNNING
    assert aio.run(_stress_status(back)).running  # the workload survived the move


async def _stress_status(domain: Domain) -> StressStatus:
    async with domain.agent() as agent:
        return await agent.stress_status()


def test_killed_destination_leaves_the_source_running(migrating_vm: Domain, hosts, lab: Lab) -> None:
    source, dest = hosts
    dest_run = Path(lab.hosts[1].socket).parent / "qemu"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            aio.run(orchestrate.migrate(migrating_vm, lab.hosts[1].uri_tls, policy="plain", bandwidth_mib=4))
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            errors.append(err)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    pid = None
    while pid is None and time.monotonic() < deadline:
        try:
            pid = qemu_pid(migrating_vm.name, run_dir=dest_run)
        except Exception:
            time.sleep(0.2)
    assert pid is not None, "the destination QEMU never started"
    time.sleep(2)
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], orchestrate.MigrationError), errors
    assert "source keeps running" in str(errors[0])
    assert migrating_vm.state is RunState.RUNNING
    assert agent_info(migrating_vm).kernel  # the guest still answers
    with pytest.raises(DomainNotFound):
        dest.lookup(migrating_vm.name)


def test_migrate_input_errors(migrating_vm: Domain, lab: Lab, capsys) -> None:
    from tests.vm.helpers import cli
    source = ["-c", lab.hosts[0].uri_unix, "migrate", migrating_vm.name]
    for argv, message in [
        (source + [lab.hosts[0].uri_tls], "already runs on"),
        (source + [lab.hosts[1].uri_tls, "--downtime-ms", "0"], "downtime must be 1 to 60000 ms"),
        (source + [lab.hosts[1].uri_tls, "--bandwidth", "0"], "bandwidth must be 1 to 100000"),
        (source + [lab.hosts[1].uri_tls, "--policy", "fast"], "invalid choice"),
        (["-c", lab.hosts[0].uri_unix, "migrate", "hvext-test-no-such", lab.hosts[1].uri_tls], "no such domain"),
    ]:
        status, _, err = cli(capsys, *argv)
        assert status == 1 and err.splitlines()[-1].startswith("error: "), (argv, err)
        assert message in err, (argv, err)
    assert migrating_vm.state is RunState.RUNNING


def test_migration_hands_over_the_shared_state(migrating_vm: Domain, hosts, lab: Lab) -> None:
    """hvext's migration (over the TLS URI) moves the state dir's owner record to the destination, so
    `define` of the same name on the source can no longer remove the running guest's disk."""
    from hvext import paths, statedir
    from hvext.errors import HostError
    from hvext.host import DomainSpec

    aio.run(orchestrate.migrate(migrating_vm, lab.hosts[1].uri_tls, policy="plain"))
    owner, _ = statedir.read_owner(paths.domain_dir(migrating_vm.name))
    assert owner is not None and owner.host_uuid == hosts[1].host_uuid
    marker = paths.domain_dir(migrating_vm.name) / "marker"
    marker.write_text("running on host2")
    with pytest.raises(HostError, match="belongs to domain"):
        hosts[0].define(DomainSpec(name=migrating_vm.name, memory_mib=256))
    assert marker.exists() and (paths.domain_dir(migrating_vm.name) / "disk.qcow2").is_file()
    assert agent_info(hosts[1].lookup(migrating_vm.name)).kernel


def test_failed_migration_leaves_a_user_paused_source_paused(migrating_vm: Domain, hosts, lab: Lab) -> None:
    """Only a pause the migration made is undone: a domain the user had paused stays paused."""
    source, dest = hosts
    migrating_vm.dom.suspend()
    try:
        with pytest.raises(orchestrate.MigrationError) as failed:  # 1 MiB/s cannot move the guest in 3 s
            aio.run(orchestrate.migrate(migrating_vm, lab.hosts[1].uri_tls, policy="plain", bandwidth_mib=1,
                                        timeout_s=3))
        assert "as it was before the migration" in str(failed.value), failed.value
        assert migrating_vm.state is RunState.PAUSED
        with pytest.raises(DomainNotFound):
            dest.lookup(migrating_vm.name)
    finally:
        if migrating_vm.state is RunState.PAUSED:
            migrating_vm.dom.resume()
    assert agent_info(migrating_vm).kernel  # the guest runs on where it was
