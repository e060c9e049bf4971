"""Balloon control without a VM: limits, the safety floor, following a scripted balloon, the reports.

The domains are real ones on libvirt's test driver (``test:///default``), read through hvext's
``Domain``: their XML, metadata and state come from libvirt. The test driver runs no QEMU, so the
balloon's QMP answers (``query-balloon``, guest statistics, BALLOON_CHANGE events) are the one part
scripted: :class:`FakeQMP` stands in for the domain's ``qmp`` session and for nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from hvext import aio
from hvext.errors import UsageError
from hvext.host import Domain
from hvext.memory import balloon
from hvext.units import MIB
from tests.unit.testdriver import running_domain

XML = """<domain type='test'><name>vm</name><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>
  <memory unit='KiB'>{memory}</memory><currentMemory unit='KiB'>{current}</currentMemory>
  {cpu}
  <devices>{devices}<memballoon model='virtio'{autodeflate}/></devices>
</domain>"""
NAME = f"hvext-unit-{os.getpid()}-balloon"  # what tests.unit.testdriver.running_domain names it
#: The test driver opens no file: the path only has to be there.
NVDIMM = ("<memory model='nvdimm'><source><path>/nonexistent/hvext-unit.img</path></source>"
          "<target><size unit='KiB'>262144</size></target></memory>")


class FakeQMP:
    """query-balloon answers from a script; BALLOON_CHANGE events for each new value."""

    supports_events = True

    def __init__(self, script: list[int], stats: dict[str, Any]) -> None:
        self.script = script
        self.stats = stats
        self.queries = 0

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        if command == "query-balloon":
            value = self.script[min(self.queries, len(self.script) - 1)]
            self.queries += 1
            return {"actual": value}
        if command == "qom-get":
            return self.stats
        raise AssertionError(command)

    async def events(self, *names: str) -> AsyncIterator[dict[str, Any]]:
        await asyncio.sleep(3600)
        yield {}


@contextlib.contextmanager
def real_domain(xml: str, *, qmp: FakeQMP | None = None, metadata: str | None = None) -> Iterator[Domain]:
    """The running test-driver domain :data:`NAME` defined from *xml*, with hvext's balloon
    record *metadata* set through libvirt and its QMP session scripted by *qmp*; removed afterwards."""
    xml = xml.replace("<name>vm</name>", "<name>{name}</name>").replace("type='kvm'", "type='test'")
    if "<os>" not in xml:
        xml = xml.replace("</name>", "</name><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>", 1)
    with running_domain(xml, "balloon") as dom:
        if metadata is not None:
            dom.set_metadata(balloon.METADATA_KEY, balloon.METADATA_NS, metadata, live=True)
        if qmp is not None:
            @contextlib.asynccontextmanager
            async def session() -> AsyncIterator[FakeQMP]:
                yield qmp

            dom.qmp = session  # type: ignore[method-assign,assignment]
        yield dom


def domain(memory_mib: int = 512, *, numa: bool = True, nvdimm: bool = False, autodeflate: bool = False,
           **kwargs: Any) -> contextlib.AbstractContextManager[Domain]:
    total = memory_mib + (256 if nvdimm else 0)
    cpu = f"<cpu><numa><cell id='0' cpus='0' memory='{memory_mib}' unit='MiB'/></numa></cpu>" if numa else ""
    return real_domain(XML.format(memory=total * 1024, current=memory_mib * 1024, cpu=cpu,
                                  devices=NVDIMM if nvdimm else "",
                                  autodeflate=" autodeflate='on'" if autodeflate else ""), **kwargs)


@pytest.mark.parametrize("numa", [True, False])
def test_the_ceiling_is_boot_memory_without_memory_devices(numa: bool) -> None:
    with domain(512, numa=numa, nvdimm=True) as dom:
        assert balloon.boot_memory(dom) == 512 * MIB
        assert balloon.check_target(dom, 512 * MIB) == 512 * MIB
        assert balloon.check_target(dom, 300 * MIB + 100) == 300 * MIB  # whole KiB
        with pytest.raises(UsageError, match=rf"above the maximum of '{NAME}' \(512.00 MiB, its boot memory\)"):
            balloon.check_target(dom, 513 * MIB)
        with pytest.raises(UsageError, match="absurdly small: the minimum is 64.00 MiB"):
            balloon.check_target(dom, 63 * MIB)
        assert not balloon.autodeflate(dom)
    with domain(autodeflate=True) as dom:
        assert balloon.autodeflate(dom)


def test_safe_floor_keeps_headroom() -> None:
    assert balloon.safe_floor(256 * MIB, 94 * MIB) == 162 * MIB + 64 * MIB
    assert balloon.safe_floor(4096 * MIB, 1024 * MIB) == 3072 * MIB + int(4096 * MIB * 0.05)


def test_recorded_target_prefers_hvexts_record() -> None:
    record = f'<balloon xmlns="{balloon.METADATA_NS}" target-kib="307200" set-at="1700000000.5"/>'
    with domain(metadata=record) as dom:
        assert balloon.recorded_target(dom) == balloon.Target(300 * MIB, "hvext", 1700000000.5)
    with domain(400) as dom:
        assert balloon.recorded_target(dom) == balloon.Target(400 * MIB, "definition")
    with domain(400, metadata="<balloon target-kib='x'/>") as dom:
        assert balloon.recorded_target(dom) == balloon.Target(400 * MIB, "definition")


#: What libvirt writes for a 768 MiB hvext guest after `hvext pmem-attach` of a 64 MiB NVDIMM (cold):
#: it adds the device to <memory> and <currentMemory> (captured from libvirt 9.0).
LIBVIRT_AFTER_NVDIMM_ATTACH = """<domain type='kvm'><name>vm</name>
  <maxMemory slots='8' unit='KiB'>67108864</maxMemory>
  <memory unit='KiB'>851968</memory><currentMemory unit='KiB'>851968</currentMemory>
  <cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model>
    <numa><cell id='0' cpus='0' memory='786432' unit='KiB'/></numa></cpu>
  <devices><memory model='nvdimm'><source><path>/var/lib/hvext/pmem/vm.img</path></source>
    <target><size unit='KiB'>65536</size><node>0</node></target></memory>
  <memballoon model='virtio'/></devices></domain>"""


def test_the_definitions_target_does_not_count_pmem() -> None:
    """dommemstat showed "balloon target (definition) 832 MiB" for this 768 MiB guest."""
    with real_domain(LIBVIRT_AFTER_NVDIMM_ATTACH) as dom:
        assert balloon.recorded_target(dom) == balloon.Target(768 * MIB, "definition")
    # currentMemory 512 MiB before the attach, 576 after: libvirt hands QEMU 576, below the boot memory
    ballooned = LIBVIRT_AFTER_NVDIMM_ATTACH.replace("<currentMemory unit='KiB'>851968",
                                                    "<currentMemory unit='KiB'>589824")
    with real_domain(ballooned) as dom:
        assert balloon.recorded_target(dom) == balloon.Target(576 * MIB, "definition")


def follow(script: list[int], target: int, monkeypatch: pytest.MonkeyPatch, **kwargs: Any) -> balloon.BalloonResult:
    monkeypatch.setattr(balloon, "POLL_INTERVAL_S", 0.01)
    stats = {"stats": {"stat-free-memory": 5 * MIB, "stat-available-memory": 8 * MIB}, "last-update": 1}
    seen: list[int] = []
    with domain(qmp=FakeQMP(script, stats)) as dom:
        result = aio.run(balloon.follow(dom, target, progress=seen.append, **kwargs))
    assert seen and seen[-1] == result.actual
    return result


def test_follow_until_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    result = follow([512 * MIB, 400 * MIB, 300 * MIB + 4096], 300 * MIB, monkeypatch)
    assert result.reached and result.actual == 300 * MIB + 4096 and result.start == 512 * MIB
    assert result.message() == f"balloon of '{NAME}' reached 300.00 MiB in {result.elapsed_s:.1f} s"


def test_follow_reports_where_a_shrinking_guest_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    script = [512 * MIB, 400 * MIB] + [180 * MIB] * 1000
    result = follow(script, 100 * MIB, monkeypatch, stall_after=0.2, timeout=10)
    assert result.outcome == "stalled" and result.actual == 180 * MIB and result.stalled_for_s >= 0.2
    assert result.guest_free == 5 * MIB and result.guest_available == 8 * MIB
    assert result.message().startswith(f"balloon of '{NAME}' stopped at 180.00 MiB, target 100.00 MiB (started at "
                                       "512.00 MiB): the guest stopped giving memory back")
    assert "the guest reports 5.00 MiB free and 8.00 MiB available" in result.message()
    assert "cannot (or will not) give more" in result.message()
    data = result.to_dict()
    assert data["reached"] is False and data["reason"] in data["message"]


def test_follow_reports_a_guest_that_never_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    result = follow([512 * MIB] * 1000, 300 * MIB, monkeypatch, stall_after=0.2)
    assert result.outcome == "stalled"
    assert "did not move its balloon at all" in result.reason() and "virtio_balloon" in result.reason()


def test_follow_gives_up_at_the_timeout_while_still_moving(monkeypatch: pytest.MonkeyPatch) -> None:
    script = [512 * MIB - i * MIB for i in range(2000)]
    result = follow(script, 100 * MIB, monkeypatch, stall_after=5, timeout=0.3)
    assert result.outcome == "timeout" and "still moving" in result.reason()
    with pytest.raises(balloon.BalloonStalled, match="stopped at .* still moving"):
        raise balloon.BalloonStalled(result)


class EventQMP(FakeQMP):
    """query-balloon never moves; BALLOON_CHANGE events (some malformed) carry the only progress."""

    def __init__(self, events: list[Any], stats: dict[str, Any]) -> None:
        super().__init__([512 * MIB], stats)
        self.queued = events

    async def events(self, *names: str) -> AsyncIterator[dict[str, Any]]:
        assert names == ("BALLOON_CHANGE",)
        for event in self.queued:
            await asyncio.sleep(0.02)
            yield event
        await asyncio.sleep(3600)


def test_malformed_balloon_events_are_skipped_and_the_watcher_keeps_going(monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU's event data is untrusted: a bad ``actual`` is ignored, the events after it still count."""
    monkeypatch.setattr(balloon, "POLL_INTERVAL_S", 0.01)
    bad = [{"data": {"actual": "x"}}, {"data": {"actual": [1] * 3}}, {"data": None}, "junk",
           {"data": {"actual": 2**70}}, {"data": {"actual": -1}}, {"data": {"actual": 1.5}}]
    good = {"event": "BALLOON_CHANGE", "data": {"actual": 300 * MIB}}
    with domain(qmp=EventQMP([*bad, good], {"stats": {}, "last-update": 1})) as dom:
        result = aio.run(balloon.follow(dom, 300 * MIB, stall_after=5, timeout=10))
    assert result.reached and result.actual == 300 * MIB and result.events == len(bad) + 1
