"""Persistence hints from the guest and pmem windows from QEMU are untrusted: every shape is
either kept (when it is well formed and inside the domain's own devices) or rejected, never a crash."""

from __future__ import annotations

from typing import Any

import pytest

from hvext.errors import QMPError
from hvext.pmem import hints

MIB = 1 << 20
WINDOWS = [(0x100000000, 64 * MIB, "/dev/shm/x.img")]


def test_hints_outside_the_domains_devices_are_rejected() -> None:
    raw = {"ranges": [
        {"kind": "persistent", "gpa": 0x100000000, "length": 4096},
        {"kind": "volatile", "gpa": 0x0, "length": 4096},                          # guest RAM, not pmem
        {"kind": "volatile", "gpa": 0x100000000 + 64 * MIB - 10, "length": 4096},  # runs off the end
        {"kind": "evil", "gpa": 0x100000000, "length": 1},
        {"kind": "hot", "gpa": -5, "length": 10},
    ] + [{"kind": "hot", "gpa": 0x100000000, "length": 1}] * 5000, "epochs": {"pmem0": {"count": 2}}}
    result = hints.validate(raw, WINDOWS, "vm")
    device = result.devices["/dev/shm/x.img"]
    assert device.ranges["persistent"] == [(0, 4096)] and device.ranges["volatile"] == []
    assert len(result.rejected) >= 4 and any("over the limit" in r for r in result.rejected)
    assert sum(len(v) for v in device.ranges.values()) <= hints.MAX_RANGES
    assert device.epochs == 2
    assert hints.save_ranges(hints.DeviceHints("b", 100, {"persistent": [], "volatile": [(10, 20), (25, 10)],
                                                          "hot": []})) == [(0, 10), (35, 65)]


@pytest.mark.parametrize("raw", [
    {"frozen": 5}, {"missing": 5}, {"errors": 7}, {"errors": {"a": 1}}, {"frozen": {"1": 2}},
    {"frozen": "123"}, {"errors": "oops"}, {"errors": None}, {"frozen": None},
    {"epochs": {"pmem0": {"count": 10 ** 5000}}}, {"epochs": {"pmem0": {"count": -7}}},
    {"epochs": {"pmem0": {"count": True}}}, {"epochs": [1, 2]},
    {"errors": [[[[]]]], "frozen": [True, -1, 10 ** 30, 7]},
    {"errors": [10 ** 5000]},
    {"ranges": "abc"}, {"ranges": [{"kind": ["persistent"], "gpa": 1, "length": 1}]},
    {"ranges": [{"kind": "hot", "gpa": 10 ** 5000, "length": 1}]},
    {"ranges": [{"kind": "hot", "gpa": 0x100000000, "length": 10 ** 5000}]},
    {"ranges": [{"kind": "hot", "gpa": 0x100000000, "length": 1.5}]},
])
def test_hostile_shapes_are_rejected_not_raised(raw: dict[str, Any]) -> None:
    result = hints.validate(raw, WINDOWS, "vm")
    device = result.devices["/dev/shm/x.img"]
    assert 0 <= device.epochs < 2 ** 63
    assert all(isinstance(p, int) and not isinstance(p, bool) and 0 < p < 2 ** 32
               for p in result.frozen + result.missing)
    assert all(isinstance(e, str) for e in result.guest_errors)
    assert all(isinstance(r, str) and len(r) < 300 for r in result.rejected)
    result.to_dict()  # serialisable


def test_well_formed_fields_are_kept() -> None:
    raw = {"frozen": [12, 13], "missing": [14], "errors": ["app 12 did not answer", 5],
           "epochs": {"pmem0": {"count": 3}, "pmem1": {"count": 4}}}
    result = hints.validate(raw, WINDOWS, "vm")
    assert result.frozen == [12, 13] and result.missing == [14]
    assert result.guest_errors == ["app 12 did not answer"]
    assert result.devices["/dev/shm/x.img"].epochs == 7


class _Device:
    def __init__(self, alias: str, path: str) -> None:
        self.alias, self.path = alias, path


ALIASES = {"nvdimm0": _Device("nvdimm0", "/dev/shm/a.img"), "pmem1": _Device("pmem1", "/dev/shm/b.img")}


def test_memory_device_windows_from_a_good_reply() -> None:
    reply = [{"type": "dimm", "data": {"id": "dimm0", "addr": 1, "size": 2}},
             {"type": "nvdimm", "data": {"id": "nvdimm0", "addr": 0x100000000, "size": 64 * MIB}},
             {"type": "virtio-pmem", "data": {"id": "pmem1", "memaddr": 0x200000000, "size": 8 * MIB}},
             {"type": "nvdimm", "data": {"id": "someone-else", "addr": 0, "size": 1}}]
    assert hints._windows_from(reply, ALIASES) == [(0x100000000, 64 * MIB, "/dev/shm/a.img"),
                                                    (0x200000000, 8 * MIB, "/dev/shm/b.img")]
    assert hints._windows_from([{"type": "nvdimm", "data": {"id": ["nvdimm0"]}}], ALIASES) == []


@pytest.mark.parametrize("reply", [
    None, {"a": 1}, "text",
    [{"type": "nvdimm", "data": {"id": "nvdimm0", "addr": 0x1000}}],                 # no size
    [{"type": "nvdimm", "data": {"id": "nvdimm0", "addr": "0x1000", "size": 4096}}],
    [{"type": "nvdimm", "data": {"id": "nvdimm0", "addr": 0x1000, "size": -4096}}],
    [{"type": "nvdimm", "data": {"id": "nvdimm0", "addr": 0x1000, "size": 10 ** 5000}}],
    [{"type": "nvdimm", "data": {"id": "nvdimm0", "addr": 2 ** 64 - 1, "size": 4096}}],
    [{"type": "nvdimm", "data": {"id": "nvdimm0", "addr": 0x1000, "size": True}}],
    [{"type": "nvdimm", "data": {"id": "nvdimm0", "addr": 0x1000, "size": 4096.0}}],
    [{"type": "nvdimm", "data": [1, 2]}], [5],
    [{"type": "nvdimm", "data": {"id": "nvdimm0", "addr": 0x1000, "size": 4096}}] * 2,  # one device twice
])
def test_memory_device_windows_from_a_bad_reply_raise_qmp_error(reply: Any) -> None:
    with pytest.raises(QMPError):
        hints._windows_from(reply, ALIASES)
