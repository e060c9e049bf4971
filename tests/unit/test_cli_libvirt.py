"""libvirt failing under the CLI (libvirt's test driver, shared by the connections of this process):
a domain that vanishes between lookup and use gives `error: ...` or is skipped, never a traceback.

The vanishing is forced at an exact point: a profile hook destroys the (transient) domain for real,
through libvirt, when the named hvext.host.Domain method returns for it.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import libvirt
import pytest

from hvext.cli import domain as cli_domain
from hvext.cli.main import main
from hvext.errors import DomainNotFound
from hvext.host import Host

URI = "test:///default"


@pytest.fixture
def transient() -> Iterator[libvirt.virDomain]:
    """A running transient domain on the test driver (destroying it makes it vanish)."""
    conn = libvirt.open(URI)
    name = f"hvext-test-vanish-{uuid.uuid4().hex[:8]}"
    dom = conn.createXML(f"<domain type='test'><name>{name}</name><memory>65536</memory>"
                         "<os><type>hvm</type></os></domain>", 0)
    try:
        yield dom
    finally:
        try:
            dom.destroy()
        except libvirt.libvirtError:
            pass
        conn.close()


@contextmanager
def vanish_after(method: str, dom: libvirt.virDomain) -> Iterator[None]:
    """Destroy *dom* once, right after hvext.host.Domain.<method> returned for it."""
    name = dom.name()
    done = False

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal done
        if done or event != "return" or frame.f_code.co_name != method \
                or not frame.f_code.co_filename.endswith(str(Path("hvext", "host.py"))):
            return
        handle = frame.f_locals.get("self")
        if getattr(handle, "name", None) == name:
            done = True
            dom.destroy()

    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(None)
    assert done, f"Domain.{method} never ran for {name}"


def test_list_skips_a_domain_undefined_while_listing(transient: libvirt.virDomain,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with vanish_after("state", transient):
        status = main(["-c", URI, "list", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert transient.name() not in [row["name"] for row in json.loads(out)]


def test_pool_list_reports_a_domain_that_vanished_between_lookup_and_use(
        transient: libvirt.virDomain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`dom.dom.info()` was a raw libvirt call: a vanished domain gave a libvirtError traceback."""
    monkeypatch.setenv("HVEXT_POOLS_DB", str(tmp_path / "pools.sqlite"))
    assert main(["-c", URI, "pool-assign", transient.name(), "/vm", "--create"]) == 0
    capsys.readouterr()
    with vanish_after("is_active", transient):
        status = main(["-c", URI, "pool-list", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    leaf = json.loads(out)["tree"]["children"][0]
    assert leaf["domain"] == transient.name() and leaf["domain_state"] == "missing"


def test_domain_accessors_translate_libvirt_errors(transient: libvirt.virDomain) -> None:
    with Host(URI) as host:
        domain = host.lookup(transient.name())
        assert domain.id() is not None and domain.uuid() == transient.UUIDString()
        assert transient.name() in domain.xml()
        assert host.memory_mib() > 0
        transient.destroy()
        for accessor in (domain.id, domain.xml, domain.info, lambda: domain.state):  # the UUID is known locally
            with pytest.raises(DomainNotFound):
                accessor()


def test_a_libvirt_error_that_escapes_a_command_is_an_error_line(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A raw libvirt call a command module forgot to translate gave a traceback; now `error: ...`, exit 1."""
    def raw_lookup(args: argparse.Namespace) -> int:
        libvirt.open("test:///default").lookupByName("hvext-unit-no-such-domain")  # a real libvirtError
        return 0
    monkeypatch.setattr(cli_domain, "cmd_dominfo", raw_lookup)
    assert main(["-c", "test:///default", "dominfo", "whatever"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: hvext dominfo: no such domain") and "Traceback" not in err


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug is not dressed up as a user error: it propagates (Python prints its traceback)."""
    def buggy(args: argparse.Namespace) -> int:
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(cli_domain, "cmd_dominfo", buggy)
    with pytest.raises(ZeroDivisionError):
        main(["-c", "test:///default", "dominfo", "whatever"])
