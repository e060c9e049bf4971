"""An HA restart defines the stored definition with this host's per-host paths (QMP and agent sockets,
console log), not those of the host that ran it: that host may still be alive (the battery path's early
hand-off), and lab hosts share STATE_DIR, so the same paths would be the same sockets and log files.

libvirt's test driver (a real libvirt), paths under a temporary directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext import paths
from hvext.daemon import ha_loop
from hvext.errors import DomainNotFound
from hvext.host import Host, host_path_ids, rewrite_host_paths

OTHER = "0ld0wner"


def stored_xml(name: str, host_id: str) -> str:
    """A definition as hvext builds it on host *host_id* (the per-host parts only)."""
    runtime = paths.runtime_dir(name, host_id)
    return (f"<domain type='test'><name>{name}</name><memory unit='MiB'>256</memory><os><type>hvm</type></os>"
            f"<devices><serial type='file'><source path='{paths.console_log(name, host_id)}'/></serial>"
            f"<channel type='unix'><source mode='bind' path='{runtime / 'agent.sock'}'/>"
            f"<target type='virtio' name='org.hvext.agent.0'/></channel></devices></domain>")


@pytest.fixture
def short_dirs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="hv-"))  # socket paths must stay short
    monkeypatch.setattr(paths, "STATE_DIR", top / "state")
    monkeypatch.setattr(paths, "LOG_DIR", top / "log")
    try:
        yield top
    finally:
        shutil.rmtree(top)


def test_the_host_ids_of_a_definitions_per_host_paths_are_found_and_rewritten(short_dirs: Path) -> None:
    name = "hvext-unit-ids"
    xml = stored_xml(name, OTHER)
    assert host_path_ids(xml, name) == {OTHER}
    assert host_path_ids(xml, "hvext-unit-other-name") == set()  # another domain's paths are not its
    moved = rewrite_host_paths(xml, name, OTHER, "n3w")
    assert host_path_ids(moved, name) == {"n3w"} and OTHER not in moved


def test_a_restarted_domain_gets_this_hosts_sockets_and_console_log(short_dirs: Path) -> None:
    name = f"hvext-unit-{os.getpid()}-restart-paths"
    with Host("test:///default") as host:
        try:
            assert ha_loop.ensure_running("test:///default", name, stored_xml(name, OTHER)) == "defined and started"
            defined = host.lookup(name).dom.XMLDesc(0)
            assert host_path_ids(defined, name) == {host.host_id}, defined
            assert str(paths.runtime_dir(name, host.host_id) / "agent.sock") in defined
            assert str(paths.console_log(name, host.host_id)) in defined
            assert paths.runtime_dir(name, host.host_id).is_dir()  # where this host's QEMU binds its sockets
            assert not paths.runtime_dir(name, OTHER).exists()
        finally:
            try:
                dom = host.lookup(name)
                if dom.is_active():
                    dom.destroy()
                dom.dom.undefine()  # the test driver takes no undefine flags
            except DomainNotFound:
                pass
