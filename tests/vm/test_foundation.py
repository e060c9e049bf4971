"""Real guests under libvirt: boot, agent, QMP, balloon statistics, lifecycle, attach."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from hvext import aio, paths
from hvext.errors import AgentTimeout
from hvext.host import Domain, Host
from hvext.qmp import SocketQMP
from tests.vm.helpers import cli, cli_json


def retry(check, timeout: float = 30.0, interval: float = 0.5):  # type: ignore[no-untyped-def]
    """Call *check* until it returns a truthy value or *timeout* passes (then return the last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_boot_reaches_agent(booted_vm: Domain, session_factory, capsys, record_property) -> None:
    record_property("boot_to_agent_s", round(session_factory.boot_seconds[booted_vm.name], 1))
    info = cli_json(capsys, "dominfo", booted_vm.name)
    assert info["state"] == "running" and info["hvext_managed"] and info["agent_channel"]
    ping = cli_json(capsys, "agent-ping", booted_vm.name)
    assert ping["agent_version"] == "0.1.0" and ping["kernel"].endswith("-amd64")
    status, out, _ = cli(capsys, "console-log", booted_vm.name)
    assert status == 0 and "hvext-agent: ready" in out


def test_list_shows_the_domain(booted_vm: Domain, capsys) -> None:
    rows = cli_json(capsys, "list")
    assert {"name": booted_vm.name, "state": "running", "hvext": True} \
        .items() <= next(r for r in rows if r["name"] == booted_vm.name).items()


def test_qmp_query_balloon(booted_vm: Domain, capsys) -> None:
    status, out, err = cli(capsys, "qmp", booted_vm.name, "query-balloon")
    assert status == 0, err
    assert json.loads(out) == {"actual": 512 * 1024 * 1024}
    status, _, err = cli(capsys, "qmp", booted_vm.name, "no-such-command")
    assert status == 1 and "QMP no-such-command failed" in err


def test_balloon_stats_reach_the_host(booted_vm: Domain, capsys) -> None:
    def stats_in() -> dict[str, Any] | None:
        result = cli_json(capsys, "dommemstat", booted_vm.name)
        ready = result["guest_stats"].get("stat-total-memory", -1) > 0 and result["agent"] is not None
        return result if ready else None

    result = retry(stats_in, timeout=30)
    assert result, "the balloon driver's statistics never reached the host"
    total_qmp = result["guest_stats"]["stat-total-memory"]
    total_agent = result["agent"]["meminfo_kb"]["MemTotal"] * 1024
    assert abs(total_qmp - total_agent) <= 0.01 * total_agent
    assert 300 * 2**20 < total_agent <= 512 * 2**20
    libvirt_stats = booted_vm.balloon_stats()
    assert libvirt_stats["actual"] == 512 * 1024 and libvirt_stats["usable"] > 0


def test_qmp_events_on_hvexts_monitor(booted_vm: Domain) -> None:
    async def pause_and_resume() -> list[str]:
        facts = booted_vm.facts()
        assert facts.qmp_socket is not None
        seen: list[str] = []
        async with await SocketQMP(facts.qmp_socket, name="test").connect() as qmp:
            async def collect() -> None:
                async for event in qmp.events("STOP", "RESUME"):
                    seen.append(event["event"])
                    if len(seen) == 2:
                        return
            watcher = asyncio.ensure_future(collect())
            await asyncio.sleep(0)
            await qmp.execute("stop")
            await qmp.execute("cont")
            await asyncio.wait_for(watcher, 10)
        return seen
    assert aio.run(pause_and_resume(), timeout=30) == ["STOP", "RESUME"]


def test_libvirt_events_arrive_on_the_shared_loop(booted_vm: Domain) -> None:
    async def suspend_and_resume() -> list[int]:
        seen: list[int] = []
        async with booted_vm.lifecycle_events() as events:
            await asyncio.get_running_loop().run_in_executor(None, booted_vm.dom.suspend)
            await asyncio.get_running_loop().run_in_executor(None, booted_vm.dom.resume)
            # libvirtd may still deliver the previous test's pause/resume first: look for ours in order
            while seen[-2:] != [libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_RESUMED]:
                seen.append((await asyncio.wait_for(events.get(), 10))[0])
        return seen
    seen = aio.run(suspend_and_resume(), timeout=30)
    assert len(seen) <= 4, f"unexpected lifecycle events {seen}"


@pytest.mark.parametrize("mode", ["garbage", "huge", "wrong-id", "bad-schema", "silence"])
def test_misbehaving_agent_is_contained(booted_vm: Domain, mode: str) -> None:
    async def provoke() -> None:
        async with booted_vm.agent(timeout=3) as agent:
            await agent.request("x-test-misbehave", {"mode": mode})
            with pytest.raises(AgentTimeout):
                await agent.request("meminfo")
            assert (await agent.info()).kernel  # the session re-synchronises
    aio.run(provoke(), timeout=60)


def test_state_errors(booted_vm: Domain, capsys) -> None:
    status, _, err = cli(capsys, "start", booted_vm.name)
    assert status == 1 and "already running" in err
    status, _, err = cli(capsys, "undefine", booted_vm.name)
    assert status == 1 and "is running" in err
    status, _, err = cli(capsys, "dominfo", "hvext-test-no-such-domain")
    assert status == 1 and "no such domain" in err and "hvext list --all" in err
    status, _, err = cli(capsys, "define", booted_vm.name)
    assert status == 1 and "already exists" in err


def test_lifecycle_define_boot_shutdown_undefine(vm_factory, capsys) -> None:
    name = f"hvext-test-{os.getpid()}-life"
    try:
        assert cli(capsys, "define", name, "--memory", "384M")[0] == 0
        vm_factory.domains.append(vm_factory.host.lookup(name))  # the factory cleans up on failure
        assert paths.domain_dir(name).joinpath("disk.qcow2").is_file()
        status, out, err = cli(capsys, "start", name, "--wait-agent", "180")
        assert status == 0 and "ready after" in out, err
        status, out, err = cli(capsys, "shutdown", name, "--wait", "60")
        assert status == 0 and "shut off" in out, err
        assert cli_json(capsys, "dominfo", name)["state"] == "shut off"
        assert cli(capsys, "undefine", name)[0] == 0
        assert not paths.domain_dir(name).exists()
        status, _, err = cli(capsys, "start", name)
        assert status == 1 and "no such domain" in err
    finally:
        vm_factory.domains = [d for d in vm_factory.domains if _exists(vm_factory.host, d.name)]


def _exists(host: Host, name: str) -> bool:
    try:
        host.lookup(name)
        return True
    except Exception:
        return False


PLAIN_XML = """<domain type='{type}'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices><serial type='pty'/></devices>
</domain>"""


@pytest.fixture
def plain_domain(host: Host, tmp_path) -> Iterator[str]:
    """A domain defined with plain `virsh define` (no hvext metadata, agent, or monitor)."""
    from hvext import accel
    name = f"hvext-test-{os.getpid()}-plain"
    xml = tmp_path / "plain.xml"
    xml.write_text(PLAIN_XML.format(type=accel.current().domain_type, name=name))
    subprocess.run(["virsh", "-q", "-c", host.uri, "define", str(xml)], check=True, capture_output=True)
    try:
        subprocess.run(["virsh", "-q", "-c", host.uri, "start", name], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["virsh", "-q", "-c", host.uri, "destroy", name], capture_output=True)
        subprocess.run(["virsh", "-q", "-c", host.uri, "undefine", name], capture_output=True)


def test_attach_to_a_plain_libvirt_domain(plain_domain: str, capsys) -> None:
    info = cli_json(capsys, "dominfo", plain_domain)
    assert info["state"] == "running" and not info["hvext_managed"] and not info["agent_channel"]
    status, out, err = cli(capsys, "qmp", plain_domain, "query-status")
    assert status == 0 and json.loads(out)["status"] == "running", err
    status, _, err = cli(capsys, "agent-ping", plain_domain)
    assert status == 1 and "has no hvext agent channel" in err
    result = cli_json(capsys, "dommemstat", plain_domain)
    assert result["balloon_actual"] == 128 * 2**20  # through libvirt's QMP passthrough
    assert "no hvext agent channel" in result["agent_error"]
    status, _, err = cli(capsys, "console-log", plain_domain)
    assert status == 1 and "no console log file" in err
