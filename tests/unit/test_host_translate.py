"""host.translate: each libvirt failure becomes the hvext error a user can act on.

The errors are real libvirt errors: from libvirt's test driver (a real
connection, no VM) and from a connection to a socket nobody listens on. Codes
the test driver cannot produce are checked as libvirt reports them (a
libvirtError carries its code in ``err``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from hvext.errors import (DomainNotFound, DomainStateError, HostError, LibvirtUnavailable, UnsupportedError,
                          UsageError)
from hvext.host import translate

URI = "test:///default"
XML = "<domain type='test'><name>hvext-unit-translate</name><memory unit='MiB'>64</memory>" \
      "<os><type>hvm</type></os></domain>"


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    connection = libvirt.open(URI)
    try:
        yield connection
    finally:
        connection.close()


def raised(call: Callable[[], object]) -> libvirt.libvirtError:
    with pytest.raises(libvirt.libvirtError) as caught:
        call()
    return caught.value


def test_a_missing_domain_is_domain_not_found(conn: libvirt.virConnect) -> None:
    err = raised(lambda: conn.lookupByName("hvext-unit-no-such-domain"))
    translated = translate(err, "domain 'x'")
    assert type(translated) is DomainNotFound
    assert str(translated) == "domain 'x': no such domain; `hvext list --all` shows the defined ones"


def test_an_operation_in_the_wrong_state_is_a_domain_state_error(conn: libvirt.virConnect) -> None:
    dom = conn.defineXML(XML)
    try:
        err = raised(dom.destroy)  # not running
        assert err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
        translated = translate(err, "stopping 'x'")
        assert type(translated) is DomainStateError
        assert str(translated) == f"stopping 'x': {err.get_error_message()}"
    finally:
        dom.undefine()


def test_bad_xml_is_a_usage_error(conn: libvirt.virConnect) -> None:
    err = raised(lambda: conn.defineXML("<domain"))
    assert err.get_error_code() in (libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL)
    assert type(translate(err, "defining")) is UsageError


def test_an_unreachable_libvirtd_is_libvirt_unavailable(tmp_path: Path) -> None:
    err = raised(lambda: libvirt.open(f"qemu+unix:///system?socket={tmp_path}/nobody-listens"))
    translated = translate(err, "connecting")
    assert type(translated) is LibvirtUnavailable
    assert "cannot reach libvirtd" in str(translated) and "hvext doctor" in str(translated)


def libvirt_error(code: int, message: str) -> libvirt.libvirtError:
    """A libvirtError as libvirt raises it for *code* (the test driver cannot produce every code)."""
    err = libvirt.libvirtError(message)
    err.err = (code, libvirt.VIR_FROM_NONE, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)
    return err


@pytest.mark.parametrize("code,expected", [
    (libvirt.VIR_ERR_NO_CONNECT, LibvirtUnavailable),
    (libvirt.VIR_ERR_RPC, LibvirtUnavailable),
    (libvirt.VIR_ERR_AUTH_FAILED, LibvirtUnavailable),
    (libvirt.VIR_ERR_NO_SUPPORT, UnsupportedError),
    (libvirt.VIR_ERR_CONFIG_UNSUPPORTED, UnsupportedError),
    (libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED, UnsupportedError),
    (libvirt.VIR_ERR_INVALID_ARG, UsageError),
    (libvirt.VIR_ERR_INTERNAL_ERROR, HostError),
])
def test_each_code_maps_to_its_error(code: int, expected: type[Exception]) -> None:
    translated = translate(libvirt_error(code, "what libvirt said"), "ctx")
    assert type(translated) is expected
    assert str(translated).startswith("ctx: ")


def test_a_system_error_is_unavailable_only_when_it_is_about_connecting() -> None:
    assert type(translate(libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, "Failed to connect socket"), "c")) \
        is LibvirtUnavailable
    assert type(translate(libvirt_error(libvirt.VIR_ERR_SYSTEM_ERROR, "cannot open file"), "c")) is HostError
