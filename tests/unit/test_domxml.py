"""Golden-XML tests: the same spec must always render the same domain XML."""

import os
from pathlib import Path

import pytest
from lxml import etree

from hvext import domxml
from hvext.errors import UsageError

GOLDEN = Path(__file__).parent / "golden"


def make(kvm: bool) -> domxml.DomainXML:
    state = Path("/var/lib/hvext/domains/golden")
    return domxml.DomainXML(
        name="golden", memory_mib=1024, current_memory_mib=768, vcpus=2,
        domain_type="kvm" if kvm else "qemu", uuid="6d3e1c2a-7f43-4a39-9a0e-4d6b3c1f0a11",
        os_boot=domxml.OSBoot(Path("/cache/vmlinuz"), Path("/cache/initrd.img"), "root=/dev/vda rw"),
        cpu=domxml.CPU(kvm=kvm, vcpus=2, memory_mib=1024), disk=domxml.Disk(state / "disk.qcow2"),
        console=domxml.SerialConsole(Path("/var/log/hvext/console/golden.log")),
        qmp=domxml.QMPMonitor(state / "qmp.sock", state / "qmp-cli.sock"),
        emulator=Path("/usr/local/lib/hvext/qemu-system-x86_64") if kvm else None,
        devices=[domxml.AgentChannel(state / "agent.sock"), domxml.Balloon(free_page_reporting=kvm), domxml.RNG()],
    )


@pytest.mark.parametrize("kvm", [False, True], ids=["tcg", "kvm"])
def test_golden(kvm: bool) -> None:
    path = GOLDEN / f"domain-{'kvm' if kvm else 'tcg'}.xml"
    rendered = make(kvm).render()
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(rendered)
    assert rendered == path.read_text()


def test_facts_of_hvext_domain() -> None:
    xml = make(False).render()
    facts = domxml.read_facts(xml)
    assert facts.hvext_managed
    assert facts.qmp_socket == Path("/var/lib/hvext/domains/golden/qmp.sock")
    assert facts.qmp_cli_socket == Path("/var/lib/hvext/domains/golden/qmp-cli.sock")
    assert facts.monitor_socket("daemon") == facts.qmp_socket
    assert facts.monitor_socket("cli") == facts.qmp_cli_socket  # hvextd and the CLI never share a monitor
    assert facts.agent_socket == Path("/var/lib/hvext/domains/golden/agent.sock") and facts.has_agent_channel
    assert facts.console_log == Path("/var/log/hvext/console/golden.log")
    assert (facts.max_memory_kib, facts.current_memory_kib) == (1024 * 1024, 768 * 1024)


def test_facts_of_plain_libvirt_domain() -> None:
    xml = """<domain type='qemu'><name>plain</name><memory unit='KiB'>262144</memory>
      <currentMemory unit='GiB'>1</currentMemory><devices><serial type='pty'/></devices></domain>"""
    facts = domxml.read_facts(xml)
    assert not facts.hvext_managed and facts.qmp_socket is None
    assert not facts.has_agent_channel and facts.console_log is None
    assert (facts.max_memory_kib, facts.current_memory_kib) == (262144, 1024 * 1024)


def test_domain_defined_with_one_monitor_keeps_working() -> None:
    """Domains defined before hvext gave them two monitors: hvextd and the CLI share the one they have."""
    xml = make(False).render()
    old = xml.replace('<hvext:qmp-cli path="/var/lib/hvext/domains/golden/qmp-cli.sock"/>', "")
    assert old != xml
    facts = domxml.read_facts(old)
    assert facts.qmp_cli_socket is None
    assert facts.monitor_socket("cli") == facts.monitor_socket("daemon") == facts.qmp_socket


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 65, "é"])
def test_bad_names(name: str) -> None:
    with pytest.raises(UsageError):
        domxml.validate_name(name)


@pytest.mark.parametrize("text,unit,expected", [
    ("512", None, 512 * 1024), ("512", "KiB", 512 * 1024), ("2", "GiB", 2 << 30), ("1", "KB", 1000),
    ("3", "MB", 3_000_000), ("7", "b", 7), ("", "MiB", 0), (None, None, 0),
])
def test_libvirt_sizes(text, unit, expected) -> None:
    assert domxml.libvirt_size(text, unit) == expected


def test_file_memory_backing_is_shared_and_placed_after_current_memory() -> None:
    """--swap-file: guest RAM in a file QEMU maps shared (a private mapping would go to host swap)."""
    spec = make(False)
    assert "memoryBacking" not in spec.render()
    spec.memory_backing = domxml.FileMemoryBacking()
    root = etree.fromstring(spec.render().encode())
    backing = root.find("memoryBacking")
    assert backing is not None
    assert backing.find("source").get("type") == "file" and backing.find("access").get("mode") == "shared"
    names = [child.tag for child in root if isinstance(child.tag, str)]
    assert names[names.index("currentMemory") + 1] == "memoryBacking"  # libvirt's order
