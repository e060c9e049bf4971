"""The record of where a device's snapshot region lives (``region.json``, hvext.pmem.guestsnap) is read
as a file that may be damaged: anything but a well-formed record is a GuestSnapshotError naming it,
never RecursionError, MemoryError, KeyError or a raw OSError."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.testdriver import PLAIN_XML, running_domain

from hvext import paths
from hvext.host import Domain
from hvext.pmem import guestsnap
from hvext.pmem.devices import PmemDevice

XML = PLAIN_XML


@pytest.fixture
def domain() -> Iterator[Domain]:
    with running_domain(XML, "snapcfg") as dom:
        yield dom


@pytest.mark.parametrize("content", [
    b"[" * 100_000,
    b'{"backing": "/dev/shm/hvext/d/dev.img", "nvm_dir": "/n", "mass_dir": "/m"}' + b" " * (16 << 20),
    b'{"backing": ' + b"9" * 5000 + b"}",
    b"\xff\xfe",
    b"[]",
    b"{}",
    b'{"backing": "/dev/shm/hvext/d/dev.img", "nvm_dir": 5, "mass_dir": "/m"}',
], ids=["deep", "huge", "huge-int", "not-utf8", "list", "no-fields", "not-strings"])
def test_a_damaged_region_record_is_a_guest_snapshot_error(domain: Domain, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, content: bytes) -> None:
    monkeypatch.setattr(paths, "STATE_DIR", tmp_path)
    device = PmemDevice("nvdimm", Path("/dev/shm/hvext/d/dev.img"), 1 << 20, 0)
    config = guestsnap.config_path(domain, device)
    config.parent.mkdir(parents=True)
    config.write_bytes(content)
    with pytest.raises(guestsnap.GuestSnapshotError, match=str(config)):
        guestsnap.open_region(domain, device)


def test_an_unreadable_region_record_is_a_guest_snapshot_error(domain: Domain, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "STATE_DIR", tmp_path)
    device = PmemDevice("nvdimm", Path("/dev/shm/hvext/d/dev.img"), 1 << 20, 0)
    config = guestsnap.config_path(domain, device)
    config.mkdir(parents=True)  # unreadable as a file, also for root
    with pytest.raises(guestsnap.GuestSnapshotError, match=str(config)):
        guestsnap.open_region(domain, device)
