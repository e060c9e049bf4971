"""The owner record of a shared state directory (hvext.statedir): written safely, trusted only when
root's and well-formed, and never a reason to open a command-running libvirt transport."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import pytest

from hvext import host, paths, statedir
from hvext.statedir import StateOwner

OWNER = StateOwner(host_uuid=str(uuid.uuid4()), uri="qemu+unix:///system?socket=/run/hvext-lab/host1/libvirt/libvirt-sock",
                   domain_uuid=str(uuid.uuid4()), name="vm1")
root_only = pytest.mark.requires(os.geteuid() == 0, "the record is trusted only when root's")


@root_only
def test_round_trip(tmp_path: Path) -> None:
    statedir.write_owner(tmp_path, OWNER)
    assert statedir.read_owner(tmp_path) == (OWNER, "")
    assert oct(os.stat(tmp_path / statedir.OWNER_FILE).st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == [statedir.OWNER_FILE]  # no temporary left


def test_missing_record(tmp_path: Path) -> None:
    owner, why = statedir.read_owner(tmp_path)
    assert owner is None and "no owner.json" in why


@root_only
def test_a_record_replaced_by_a_link_or_another_users_file_is_not_trusted(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    real.write_text(json.dumps(OWNER.__dict__))
    (tmp_path / statedir.OWNER_FILE).symlink_to(real)
    assert statedir.read_owner(tmp_path)[0] is None
    (tmp_path / statedir.OWNER_FILE).unlink()
    statedir.write_owner(tmp_path, OWNER)
    os.chown(tmp_path / statedir.OWNER_FILE, 64055, 64055)  # QEMU's user rewrote it (its group may write the dir)
    owner, why = statedir.read_owner(tmp_path)
    assert owner is None and "root" in why
    os.chown(tmp_path / statedir.OWNER_FILE, 0, 0)
    os.chmod(tmp_path / statedir.OWNER_FILE, 0o666)
    assert statedir.read_owner(tmp_path)[0] is None


@root_only
@pytest.mark.parametrize("record", [
    "{", "[]", '{"host_uuid": "x", "uri": "qemu:///system", "domain_uuid": "y", "name": "a"}',
    json.dumps({**OWNER.__dict__, "extra": 1}), json.dumps({**OWNER.__dict__, "name": 5}),
    json.dumps({**OWNER.__dict__, "name": "x" * 5000}), "\udcff",
])
def test_malformed_records_are_not_trusted(tmp_path: Path, record: str) -> None:
    (tmp_path / statedir.OWNER_FILE).write_bytes(record.encode(errors="surrogateescape"))
    owner, why = statedir.read_owner(tmp_path)
    assert owner is None and why


@pytest.mark.parametrize("uri,safe", [
    ("qemu:///system", True),
    ("qemu+unix:///system?socket=/run/hvext-lab/host1/libvirt/libvirt-sock", True),
    ("qemu+tls://198.18.0.12/system?pkipath=/var/lib/hvext/lab/pki/client", True),
    ("qemu+tcp://host2.example:16509/system", True),
    ("qemu+ext:///system?command=/tmp/evil", False),
    ("qemu+ssh://root@198.18.0.12/system", False),
    ("qemu+unix:///system?socket=/x&command=/tmp/evil", False),
    ("qemu+tls://198.18.0.12/system?pkipath=/p&no_verify=1", False),
    ("qemu:///session", False),
    ("qemu+tls://198.18.0.12/system?pkipath=/p\n", False),
])
def test_only_plain_uris_are_opened_on_a_records_word(uri: str, safe: bool) -> None:
    assert statedir.safe_uri(uri) is safe


@root_only
def test_a_record_with_a_command_uri_is_not_trusted(tmp_path: Path) -> None:
    statedir.write_owner(tmp_path, StateOwner(OWNER.host_uuid, "qemu+ext:///system?command=/tmp/evil",
                                              OWNER.domain_uuid, "vm1"))
    owner, why = statedir.read_owner(tmp_path)
    assert owner is None and "URI" in why


def test_state_that_cannot_be_removed_at_undefine_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Undefine removed state with rmtree(ignore_errors=True): a failure went unnoticed."""
    monkeypatch.setattr(paths, "STATE_DIR", tmp_path / "state")
    monkeypatch.setattr(paths, "VOLATILE_DIR", tmp_path / "shm")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not hvext's")
    paths.domain_dir("vm").parent.mkdir(parents=True)
    paths.domain_dir("vm").symlink_to(elsewhere)  # not a directory hvext can remove (nor follow)
    (paths.VOLATILE_DIR / "vm").mkdir(parents=True)
    (paths.VOLATILE_DIR / "vm" / "pmem.img").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, "hvext.host"):
        failures = host.remove_domain_state("vm")
    assert len(failures) == 1 and str(paths.domain_dir("vm")) in failures[0]
    assert "vm: undefined, but its state was not fully removed" in caplog.text
    assert (elsewhere / "keep").exists() and not (paths.VOLATILE_DIR / "vm").exists()
    assert host.remove_domain_state("other") == []  # nothing there: nothing to report


def test_a_failed_write_keeps_the_old_record_and_leaves_no_temporary(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from hvext import durable

    (tmp_path / statedir.OWNER_FILE).write_bytes(b"old")

    def full(step: str) -> None:
        if step == "written":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "_step_hook", full)
    with pytest.raises(OSError):
        statedir.write_owner(tmp_path, OWNER)
    assert [p.name for p in tmp_path.iterdir()] == [statedir.OWNER_FILE]
    assert (tmp_path / statedir.OWNER_FILE).read_bytes() == b"old"


@root_only
@pytest.mark.parametrize("record", [b"[" * 4000, b'{"name": ' + b"9" * 4000 + b"}", b'{"name": 1e999}'],
                         ids=["deep", "long-int", "infinite"])
def test_hostile_records_are_not_trusted(tmp_path: Path, record: bytes) -> None:
    """A record nested deeply within the size limit raised RecursionError (json.loads unbounded): it is
    read by hvext's bounded JSON loader, and refused with a reason like any malformed record."""
    (tmp_path / statedir.OWNER_FILE).write_bytes(record)
    owner, why = statedir.read_owner(tmp_path)
    assert owner is None and "malformed" in why
