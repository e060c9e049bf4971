"""What QEMU answers is untrusted: hvext's QMP callers validate replies into values or QMPError."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from hvext import aio
from hvext.errors import HostError, QMPError
from hvext.host import Host
from hvext.pmem import power, virtio


class ScriptedQMP:
    """A QMP session that answers each command with a fixed (possibly malformed) reply."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.executed: list[str] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.executed.append(command)
        return self.replies[command]


class QMPDomain:
    name = "vm"

    def __init__(self, session: ScriptedQMP) -> None:
        self.session = session

    @contextlib.asynccontextmanager
    async def qmp(self) -> AsyncIterator[ScriptedQMP]:
        yield self.session


@pytest.mark.parametrize("reply", [None, {"name": "x"}, [{"nam": "x"}], [{"name": 5}], ["x"], [[]]])
def test_a_malformed_query_commands_reply_means_no_dirty_log(reply: Any) -> None:
    session = ScriptedQMP({"query-commands": reply})
    assert aio.run(power._start_log(QMPDomain(session))) is None  # type: ignore[arg-type]
    assert session.executed == ["query-commands"]


PORT = {"qdev_id": "pci.4", "pci_bridge": {"devices": []}}


@pytest.mark.parametrize("reply", [None, {"bus": 0}, [5], [{"devices": 3}], [{"nodevices": []}],
                                   [{"devices": [7]}], [{"devices": [{"qdev_id": ["x"], "pci_bridge": {}}]}],
                                   [{"devices": [{"qdev_id": "pci.1", "pci_bridge": "x"}]}]])
def test_a_malformed_query_pci_reply_is_a_qmp_error(reply: Any) -> None:
    with pytest.raises(QMPError, match="malformed query-pci reply"):
        virtio.free_root_port(reply)


def test_the_free_root_port_of_a_query_pci_reply() -> None:
    busy = {"qdev_id": "pci.1", "pci_bridge": {"devices": [{"qdev_id": ""}]}}
    assert virtio.free_root_port([{"devices": [{"qdev_id": ""}, busy, PORT]}]) == "pci.4"
    with pytest.raises(HostError, match="no free PCIe root port"):
        virtio.free_root_port([{"devices": [busy]}])


class ThreadSpy:
    """Forwards to a real libvirt object and records the thread of every call."""

    def __init__(self, target: Any, calls: list[tuple[str, str]]) -> None:
        self._target, self._calls = target, calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append((name, threading.current_thread().name))
            return attr(*args, **kwargs)
        return call


def test_attach_makes_no_libvirt_call_on_the_event_loop(tmp_path: Path) -> None:
    """A cold attach on libvirt's test driver: every libvirt call runs off the loop's thread."""
    name = f"hvext-unit-{os.getpid()}-vpmem"
    xml = (f"<domain type='test'><name>{name}</name><memory unit='MiB'>256</memory><os><type>hvm</type></os>"
           "<devices><controller type='pci' index='0' model='pcie-root'/>"
           "<controller type='pci' index='1' model='pcie-root-port'/></devices></domain>")
    calls: list[tuple[str, str]] = []
    with Host("test:///default") as host:
        host.conn.defineXML(xml)
        try:
            domain = host.lookup(name)
            domain.dom = ThreadSpy(domain.dom, calls)
            host.conn = ThreadSpy(host.conn, calls)
            device = aio.run(virtio.attach(domain, 2 * 1024 * 1024, backing=tmp_path / "vpmem.img"))
        finally:
            host.conn = getattr(host.conn, "_target", host.conn)
            host.conn.lookupByName(name).undefine()
    assert device.size == 2 * 1024 * 1024 and (tmp_path / "vpmem.img").stat().st_size == device.size
    names = {call for call, _ in calls}
    assert {"isPersistent", "XMLDesc", "defineXML", "getCapabilities"} <= names
    assert [call for call, thread in calls if thread == "hvext-aio"] == []  # aio.run's loop thread
