"""The pool commands: create, set, remove, list, assign, unassign; their output and error messages."""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import pytest

from hvext.cli import common
from hvext.cli.main import main
from hvext.host import Host
from hvext.memory.host import meminfo
from hvext.memory.pools import PoolStore
from hvext.units import MIB


TEST_URI = "test:///default"
#: Two real domains on libvirt's test driver: web-1 running with a 3000 MiB balloon (the driver reports
#: half of it as RSS), db-1 defined and shut off. The driver's state lives in this process only (and
#: only while a connection is open), so the plain names cannot clash with parallel runs.
DOMAIN_XML = """<domain type='test'><name>{name}</name><memory unit='MiB'>4096</memory>
  <currentMemory unit='MiB'>{current}</currentMemory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os>
  <devices><memballoon model='virtio'/></devices></domain>"""
WEB_RSS_MIB = 1500  # the test driver's memoryStats: rss is half the balloon


@pytest.fixture(autouse=True)
def domains(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    """web-1 and db-1 on the test driver, which hvext's commands reach as the default URI."""
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", TEST_URI)
    with Host(TEST_URI) as host:  # held open: the driver drops its state with the last connection
        defined = [host.conn.defineXML(DOMAIN_XML.format(name=name, current=current))
                   for name, current in (("web-1", 3000), ("db-1", 1024))]
        defined[0].create()
        try:
            yield host
        finally:
            for dom in defined:
                if dom.isActive():
                    dom.destroy()
                dom.undefine()


@pytest.fixture(autouse=True)
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, domains: Host) -> Path:
    """A new pool store whose host capacity is 8192 MiB (set as an admin does, with pool-set)."""
    monkeypatch.setattr(common.console, "width", 200)  # one tree node per line
    db = tmp_path / "pools.sqlite"
    monkeypatch.setenv("HVEXT_POOLS_DB", str(db))
    assert main(["pool-set", "/", "--capacity", "8G"]) == 0
    return db


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def ok(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    return " ".join(out.split())  # rich wraps long lines


def listing(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    return json.loads(ok(capsys, "pool-list", "--json", *argv))


def nodes(tree: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {tree["path"]: tree}
    for child in tree["children"]:
        out.update(nodes(child))
    return out


def test_create_set_remove_round_trip_through_the_store(capsys: pytest.CaptureFixture[str], store: Path) -> None:
    assert "Pool /prod created (reservation 2048 MiB, limit 6144 MiB, shares 2000, not expandable)" in \
        ok(capsys, "pool-create", "/prod", "--reservation", "2G", "--limit", "6G", "--shares", "high")
    assert "expandable)" in ok(capsys, "pool-create", "/dev", "--expandable")
    ok(capsys, "pool-create", "/dev/a", "--reservation", "100", "--limit", "1.5GiB", "--shares", "750")
    assert "now has reservation 1024 MiB, limit none, shares 2000, expandable" in \
        ok(capsys, "pool-set", "/prod", "--reservation", "1024M", "--limit", "none", "--expandable")
    ok(capsys, "pool-set", "/prod", "--no-expandable")
    tree = PoolStore(store).load()  # what the commands left on disk
    assert tree.get("/prod").reservation_mib == 1024 and tree.get("/prod").limit_mib is None
    assert not tree.get("/prod").expandable
    assert tree.get("/dev/a").limit_mib == 1536 and tree.get("/dev/a").shares == 750
    assert "Pool /dev removed with its subtree" in ok(capsys, "pool-remove", "/dev", "--recursive")
    assert "Host capacity set to 4096 MiB" in ok(capsys, "pool-set", "/", "--capacity", "4G")
    tree = PoolStore(store).load()
    assert not tree.exists("/dev") and tree.capacity_mib == 4096


def test_a_new_store_takes_the_hosts_memory_as_capacity(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, domains: Host) -> None:
    monkeypatch.setenv("HVEXT_POOLS_DB", str(tmp_path / "new.sqlite"))
    assert listing(capsys)["tree"]["reservation_mib"] == meminfo("MemTotal") // MIB  # without -c: this machine's
    monkeypatch.setenv("HVEXT_POOLS_DB", str(tmp_path / "new-with-uri.sqlite"))
    status, out, err = run(capsys, "-c", TEST_URI, "pool-list", "--json")
    assert status == 0, err
    assert json.loads(out)["tree"]["reservation_mib"] == domains.memory_mib() == 3072  # the test driver's node


def test_list_shows_settings_entitlements_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, "pool-create", "/prod", "--reservation", "2G", "--limit", "6G", "--shares", "2000")
    ok(capsys, "pool-create", "/prod/web", "--reservation", "512")
    ok(capsys, "pool-create", "/prod/db", "--reservation", "1G", "--expandable")
    ok(capsys, "pool-create", "/test", "--limit", "2G")
    assert "Domain 'web-1' assigned to /prod/web" in ok(capsys, "pool-assign", "web-1", "/prod/web")
    assert "Domain 'db-1' assigned to /prod/db/db1" in ok(capsys, "pool-assign", "db-1", "/prod/db/db1",
                                                          "--create")
    data = listing(capsys)
    assert data["libvirt_error"] is None
    by_path = nodes(data["tree"])
    web = by_path["/prod/web"]
    assert web["domain"] == "web-1" and web["domain_state"] == "running"
    assert web["demand_mib"] == 3000 and web["usage_mib"] == WEB_RSS_MIB and web["entitlement_mib"] == 3000
    assert by_path["/prod/db/db1"]["domain_state"] == "shut off" and by_path["/prod/db/db1"]["demand_mib"] == 0
    assert by_path["/prod"]["demand_mib"] == 3000 and by_path["/prod"]["usage_mib"] == WEB_RSS_MIB
    assert by_path["/prod"]["effective_reservation_mib"] == 2048
    assert by_path["/"]["entitlement_mib"] == 3000 and by_path["/test"]["usage_mib"] is None
    assert set(nodes(listing(capsys, "/prod/db")["tree"])) == {"/prod/db", "/prod/db/db1"}
    text = ok(capsys, "pool-list")
    assert "/ capacity 8192" in text
    assert "web vm web-1 (running) res 512 · limit - · shares 1000 · eff.res 512 · demand 3000 · " \
           f"entitled 3000 · used {WEB_RSS_MIB}" in text
    assert "db (expandable) res 1024" in text


def test_list_without_libvirt_still_shows_the_tree(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    ok(capsys, "pool-create", "/prod")
    ok(capsys, "pool-assign", "web-1", "/prod/vm", "--create")
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "test:///nonexistent/hvext-no-such-driver-config.xml")
    data = listing(capsys)
    assert "cannot connect to libvirt" in data["libvirt_error"]
    assert nodes(data["tree"])["/prod/vm"]["demand_mib"] == 0
    assert "libvirt unavailable, no demand or usage" in ok(capsys, "pool-list")


def test_unassign(capsys: pytest.CaptureFixture[str]) -> None:
    ok(capsys, "pool-create", "/p")
    ok(capsys, "pool-assign", "web-1", "/p/vm", "--create")
    assert "Domain 'web-1' unassigned from /p/vm" in ok(capsys, "pool-unassign", "web-1")
    assert nodes(listing(capsys)["tree"])["/p/vm"]["domain"] is None


@pytest.mark.parametrize("setup,argv,message", [
    ([], ["pool-create", "prod"], "pool path 'prod' must be absolute"),
    ([], ["pool-create", "/a b"], "invalid pool name 'a b'"),
    ([], ["pool-create", "/"], "the root '/' always exists"),
    ([], ["pool-create", "/x/y"], "no pool '/x'"),
    ([["pool-create", "/p"]], ["pool-create", "/p"], "pool '/p' already exists"),
    ([], ["pool-create", "/p", "--reservation", "lots"], "--reservation: invalid size 'lots'"),
    ([], ["pool-create", "/p", "--reservation", "1.5K"], "must be a whole number of MiB"),
    ([], ["pool-create", "/p", "--limit=-1G"], "--limit: invalid size"),
    ([], ["pool-create", "/p", "--shares", "0"], "--shares: must be positive"),
    ([], ["pool-create", "/p", "--shares", "many"], "not a positive integer or low/normal/high"),
    ([], ["pool-create", "/p", "--reservation", "9G"], "exceeds its parent /'s limit 8192 MiB"),
    ([["pool-create", "/a", "--reservation", "5G"]], ["pool-create", "/b", "--reservation", "4G"],
     "would reserve 9216 MiB (through /b) but the host has only 8192 MiB"),
    ([], ["pool-create", "/p", "--reservation", "2G", "--limit", "1G"], "rule reservation-within-limit"),
    ([["pool-create", "/p", "--limit", "1G"]], ["pool-create", "/p/c", "--reservation", "2G"],
     "rule reservation-within-parent-limit"),
    ([["pool-create", "/p", "--reservation", "1G"], ["pool-create", "/p/c", "--reservation", "1G"]],
     ["pool-set", "/p", "--reservation", "512"], "its children reserve 1024 MiB but it is not expandable and reserves only 512 MiB"),
    ([["pool-create", "/p"]], ["pool-set", "/p"], "give at least one of --reservation"),
    ([], ["pool-set", "/", "--reservation", "1G"], "the root '/' is the host"),
    ([["pool-create", "/p"]], ["pool-set", "/p", "--capacity", "1G"], "--capacity applies to the root '/' alone"),
    ([["pool-create", "/p", "--reservation", "2G"]], ["pool-set", "/", "--capacity", "1G"],
     "the top-level pools reserve 2048 MiB, more than a capacity of 1024 MiB"),
    ([], ["pool-set", "/nope", "--shares", "5"], "no pool '/nope'"),
    ([["pool-create", "/p"], ["pool-create", "/p/c"]], ["pool-remove", "/p"],
     "has children (c); remove them first or pass --recursive"),
    ([], ["pool-remove", "/"], "the root '/' cannot be removed"),
    ([["pool-create", "/p"], ["pool-assign", "web-1", "/p/vm", "--create"]], ["pool-remove", "/p", "--recursive"],
     "domains are assigned (web-1 at /p/vm); unassign them first"),
    ([], ["pool-assign", "no-such-vm", "/p"], "no such domain"),
    ([], ["pool-assign", "web-1", "/p"], "no pool '/p': create it first (`hvext pool-create /p`) or pass --create"),
    ([["pool-create", "/p"], ["pool-create", "/p/c"]], ["pool-assign", "web-1", "/p"],
     "'/p' has children; a domain can only be assigned to a leaf"),
    ([["pool-create", "/p"], ["pool-assign", "web-1", "/p/a", "--create"], ["pool-create", "/p/b"]],
     ["pool-assign", "web-1", "/p/b"], "domain 'web-1' is already assigned to '/p/a'"),
    ([], ["pool-unassign", "web-1"], "domain 'web-1' is not assigned to any pool"),
    ([], ["pool-list", "/nope"], "no pool '/nope'"),
])
def test_errors(capsys: pytest.CaptureFixture[str], setup: list[list[str]], argv: list[str], message: str) -> None:
    for step in setup:
        ok(capsys, *step)
    status, out, err = run(capsys, *argv)
    assert status == 1, out
    err = " ".join(err.split())
    assert err.startswith("error: ") and message in err, err


def test_a_broken_store_is_a_clear_error(capsys: pytest.CaptureFixture[str], store: Path) -> None:
    store.write_bytes(b"this is not a database" * 100)
    status, _, err = run(capsys, "pool-list")
    assert status == 1 and err.startswith(f"error: cannot open the pool store '{store}': file is not a database"), err
