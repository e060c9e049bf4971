"""Lab hosts share /var/lib/hvext: `define` on one host must never remove the state (disk overlay) of
a domain defined on another, and removes a leftover only when its recorded owner is gone."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import libvirt
import pytest

from tests.support import missing

from hvext import paths, statedir
from hvext.errors import HostError
from hvext.host import DomainSpec, Host
from hvext.lab import Lab

pytestmark = [pytest.mark.requires(os.geteuid() == 0, "the lab needs root"), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def lab(guest_image) -> Iterator[Lab]:  # type: ignore[no-untyped-def]
    if Lab.load() is not None:
        missing("a lab is already up (maybe someone else's); `hvext lab down` first to run these tests")
    built = Lab.up(2)
    try:
        yield built
    finally:
        built.down()


@pytest.fixture
def two_hosts(lab: Lab) -> Iterator[tuple[Host, Host]]:
    # host1 through its unix socket, host2 through TLS: the record must work with either URI.
    first, second = Host(lab.hosts[0].uri_unix), Host(lab.hosts[1].uri_tls)
    yield first, second
    first.close()
    second.close()


@pytest.fixture
def name() -> Iterator[str]:
    name = f"hvext-test-{os.getpid()}-statedir"
    yield name
    shutil.rmtree(paths.domain_dir(name), ignore_errors=True)


def _undefine_everywhere(hosts: tuple[Host, Host], name: str) -> None:
    for host in hosts:
        try:
            host.conn.lookupByName(name).undefine()
        except libvirt.libvirtError:
            pass


def test_define_keeps_another_hosts_state(two_hosts: tuple[Host, Host], name: str) -> None:
    host1, host2 = two_hosts
    try:
        first = host1.define(DomainSpec(name=name, memory_mib=256))
        disk = paths.domain_dir(name) / "disk.qcow2"
        owner, _ = statedir.read_owner(paths.domain_dir(name))
        assert owner is not None and owner.domain_uuid == first.dom.UUIDString()
        assert owner.host_uuid == host1.host_uuid and owner.uri == host1.uri
        marker = paths.domain_dir(name) / "marker"
        marker.write_text("host1's")  # the file system may reuse a removed disk's inode number: mark the dir
        with pytest.raises(HostError, match=f"belongs to domain '{name}'.*defined on the host at"):
            host2.define(DomainSpec(name=name, memory_mib=256))
        assert marker.read_text() == "host1's" and disk.is_file()  # host1's state is untouched
        with pytest.raises(libvirt.libvirtError):
            host2.conn.lookupByName(name)
        # host2 undefining a same-named domain of its own does not take host1's state either.
        other = host2.conn.defineXML(first.dom.XMLDesc(0).replace(first.dom.UUIDString(),
                                                                     "6f1f4c3e-0000-4000-8000-000000000001"))
        host2.lookup(name).undefine()
        assert disk.exists() and other is not None
        # Gone from its host (undefined outside hvext): now the leftover may be replaced.
        first.dom.undefine()
        second = host2.define(DomainSpec(name=name, memory_mib=256))
        owner, _ = statedir.read_owner(paths.domain_dir(name))
        assert owner is not None and owner.host_uuid == host2.host_uuid
        assert owner.domain_uuid == second.dom.UUIDString()
        second.undefine()
        assert not paths.domain_dir(name).exists()
    finally:
        _undefine_everywhere(two_hosts, name)


def test_a_state_dir_without_a_trusted_owner_is_not_removed(two_hosts: tuple[Host, Host], name: str) -> None:
    host1, _ = two_hosts
    state = paths.domain_dir(name)
    state.mkdir(parents=True)
    (state / "disk.qcow2").write_bytes(b"someone's data")
    with pytest.raises(HostError, match="cannot tell which domain it belongs to"):
        host1.define(DomainSpec(name=name, memory_mib=256))
    assert (state / "disk.qcow2").read_bytes() == b"someone's data"
    statedir.write_owner(state, statedir.StateOwner("00000000-0000-4000-8000-000000000000",
                                                    "qemu+unix:///system?socket=/nonexistent",
                                                    "00000000-0000-4000-8000-000000000001", name))
    with pytest.raises(HostError, match="cannot check"):  # its host is unreachable: it may still exist
        host1.define(DomainSpec(name=name, memory_mib=256))
    assert (state / "disk.qcow2").read_bytes() == b"someone's data"
    _undefine_everywhere(two_hosts, name)
