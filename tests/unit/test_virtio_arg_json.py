"""Reading hvext's virtio-pmem devices back from a domain's ``<qemu:commandline>``
(hvext.pmem.virtio): each argument is parsed as JSON, and a domain definition is not hvext's to trust
(anyone allowed to define domains writes it). Parsing an argument is total: a dict or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from hvext.domxml import QEMU_NS
from hvext.errors import HostError
from hvext.pmem import virtio

DEEP = '{"a":' * 100_000 + "1" + "}" * 100_000


def _domain_xml(*values: str) -> str:
    root = etree.Element("domain", nsmap={"qemu": QEMU_NS})
    etree.SubElement(root, "name").text = "d"
    cmdline = etree.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for value in values:
        etree.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=value)
    return etree.tostring(root, encoding="unicode")


def test_a_deeply_nested_argument_is_not_a_device() -> None:
    """It raised RecursionError, out of parse() and whatever listed a domain's devices."""
    assert virtio._arg_json(DEEP) == {}
    ours = virtio._device_args("hvext-vpmem0", Path("/dev/shm/hvext/d/p.img"), 1 << 20, "pci.3")
    (device,) = virtio.parse(_domain_xml("-object", DEEP, *ours))
    assert device.alias == "hvext-vpmem0" and device.size == 1 << 20


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.text() | st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                                      lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                                      max_leaves=20).map(json.dumps)
       | st.integers(1, 5000).map(lambda depth: '{"a":' * depth + "[]" + "}" * depth))
def test_arg_json_is_total(value: str) -> None:
    """Any argument gives a dict (its JSON object, or {} for anything else), never an exception."""
    assert isinstance(virtio._arg_json(value), dict)


@pytest.mark.parametrize("fields", [{"mem-path": None}, {"size": None}, {"mem-path": 7}, {"mem-path": ""},
                                    {"size": "1G"}, {"size": True}, {"size": -1}, {"size": 1.5}])
def test_an_hvext_backend_with_a_bad_path_or_size_is_a_clear_error(fields: dict) -> None:
    """A missing mem-path raised KeyError, a bad size ValueError or TypeError (or was taken as 1 byte)."""
    backend = {"qom-type": "memory-backend-file", "id": "hvext-vpmem0", "mem-path": "/dev/shm/p.img",
               "size": 1 << 20, "share": True}
    backend.update(fields)
    backend = {key: value for key, value in backend.items() if value is not None}  # None: the key is absent
    with pytest.raises(HostError, match="virtio-pmem backend 'hvext-vpmem0' is malformed"):
        virtio.parse(_domain_xml("-object", json.dumps(backend)))
