"""A protected domain redefined with ``virsh define`` has its new definition stored in the cluster by its
owner's hvextd (libvirt's DEFINED lifecycle event), on the real libvirtd (the test driver sends hvextd no
events) and a REAL etcd member: only for domains that hvextd owns, and never for one unprotected meanwhile.
The domain is tiny (64 MiB, no disk: QEMU sits in its firmware), so no guest boots.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
from lxml import etree

from hvext.ha import cluster
from hvext.ha.client import Client, Protection
from hvext.ha.etcd import Layout
from tests.unit import test_ha_cluster, test_ha_fence
from tests.unit.test_daemon import ROOT, _wait_for

member = test_ha_fence.member  # the etcd fixture (one member in tmp_path, torn down after the test)

TTL = 3
URI = "qemu:///system"
TINY = ("<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>")

pytestmark = [*test_ha_cluster.pytestmark, pytest.mark.timeout(120)]


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = libvirt.open(URI)
    try:
        yield c
    finally:
        for dom in c.listAllDomains():
            if dom.name().startswith(f"hvext-test-{os.getpid()}-hadef"):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        c.close()


def described(dom: libvirt.virDomain, text: str) -> str:
    """*dom*'s persistent definition with *text* as its description (what `virsh edit` would define)."""
    root = etree.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())
    desc = root.find("description")
    if desc is None:
        desc = etree.SubElement(root, "description")
    desc.text = text
    return etree.tostring(root).decode()


def _record(client: Client, name: str) -> Protection | None:
    return client.protected()[0].get(name)


def _until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_the_owner_stores_a_redefined_protected_domain_and_only_its_own(
        member: Layout, tmp_path: Path, conn: libvirt.virConnect) -> None:  # noqa: F811
    url = cluster.require_member(member).client_url
    client = Client([url], member.credentials())
    mine, theirs = f"hvext-test-{os.getpid()}-hadef1", f"hvext-test-{os.getpid()}-hadef2"
    dom = conn.defineXML(TINY.format(name=mine))
    dom.create()
    other = conn.defineXML(TINY.format(name=theirs))  # defined here, but owned by another (live) host
    other_lease = client.grant(60).id
    config = tmp_path / "hvextd.toml"
    config.write_text(f'[ha]\ncluster = "test"\netcd_endpoints = ["{url}"]\nhost = "h-def"\n'
                      f'lease_ttl = {TTL}\nfence_margin = 1.0\ncredentials = "{member.pki_dir}"\n')
    state = tmp_path / "state"
    state.mkdir()
    log = tmp_path / "hvextd.log"
    daemon = None
    try:
        inactive = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
        assert client.protect(Protection(mine, dom.XMLDesc(inactive), "h-def", time.time()))
        client.register_host("h-other", other_lease)
        assert client.protect(Protection(theirs, other.XMLDesc(inactive), "h-other", time.time()))
        assert client.claim(theirs, "h-other", other_lease)
        with open(log, "w") as out:
            daemon = subprocess.Popen([sys.executable, "-m", "hvext.daemon.main", "-c", URI, "--config", str(config)],
                                      stderr=out, env=dict(os.environ, HVEXT_STATE_DIR=str(state),
                                                           PYTHONPATH=str(ROOT)))
        _wait_for(log, f"protected domain {mine}: already running on this host")

        conn.defineXML(described(dom, "revision one"))  # `virsh define` of the running domain
        _until(lambda: "revision one" in (_record(client, mine) or Protection("", "", "", 0)).xml, 10,
               "the owner stored the new definition")
        _wait_for(log, f"protected domain {mine} redefined: stored definition updated")
        record = _record(client, mine)
        assert record is not None and record.home == "h-def" and client.owners()[mine][0] == "h-def"

        conn.defineXML(described(other, "not ours"))  # owned by h-other: h-def's hvextd leaves it alone
        # unprotected, then redefined at once (before hvextd's next renewal reads that it owns nothing):
        # the record's revision and owner compares keep it unprotected
        assert client.unprotect(mine)
        conn.defineXML(described(dom, "revision two"))
        time.sleep(TTL)
        assert _record(client, mine) is None and mine not in client.owners()
        assert "not ours" not in (_record(client, theirs) or Protection("", "x", "", 0)).xml
        assert client.owners()[theirs] == ("h-other", other_lease)
        assert daemon.poll() is None, log.read_text()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, log.read_text()
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for name in (mine, theirs):
            client.unprotect(name)
        client.revoke(other_lease)
        client.close()
