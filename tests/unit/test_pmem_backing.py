"""User-given PMEM backings (pmem-attach --backing): absolute at input, never a link, never a file
or directory another user controls; the chown for QEMU acts on the file that was checked."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hvext.errors import UsageError
from hvext.pmem import devices

SIZE = 2 * 1024 * 1024
NOBODY = 65534
root_only = pytest.mark.requires(os.geteuid() == 0, "files of another user need root")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file of exactly the device's size that an attacker would like hvext to chown or truncate."""
    target = tmp_path / "victim"
    target.write_bytes(b"secret" + bytes(SIZE - 6))
    target.chmod(0o600)
    return target


def test_backing_path_is_absolute_at_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert devices.backing_path("pm.img") == tmp_path / "pm.img"
    assert devices.backing_path("sub/../pm.img") == tmp_path / "pm.img"
    link = tmp_path / "dirlink"
    link.symlink_to("/")
    assert devices.backing_path("dirlink/x.img") == tmp_path / "dirlink" / "x.img"  # not resolved through it
    for bad in ("", "a\0b"):
        with pytest.raises(UsageError):
            devices.backing_path(bad)


def test_a_relative_path_is_refused_where_it_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="absolute"):
        devices.prepare_backing(Path("pm.img"), SIZE)
    assert not (tmp_path / "pm.img").exists()


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "pm.img"
    link.symlink_to(victim)
    before = os.stat(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        devices.prepare_backing(link, SIZE, owner=(NOBODY, NOBODY))
    after = os.stat(victim)
    assert (after.st_uid, after.st_gid, after.st_size) == (before.st_uid, before.st_gid, SIZE)


def test_a_dangling_symlink_is_not_followed_to_create_a_file(tmp_path: Path) -> None:
    link = tmp_path / "pm.img"
    link.symlink_to(tmp_path / "created-through-link")
    with pytest.raises(UsageError, match="symbolic link"):
        devices.prepare_backing(link, SIZE)
    assert not (tmp_path / "created-through-link").exists()


def test_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="not a regular file"):  # and it does not block opening it
        devices.prepare_backing(fifo, SIZE)
    (tmp_path / "dir").mkdir()
    with pytest.raises(UsageError, match="not a regular file"):
        devices.prepare_backing(tmp_path / "dir", SIZE)


def test_a_hard_link_is_refused(tmp_path: Path, victim: Path) -> None:
    os.link(victim, tmp_path / "pm.img")
    with pytest.raises(UsageError, match="hard links"):
        devices.prepare_backing(tmp_path / "pm.img", SIZE, owner=(NOBODY, NOBODY))
    assert os.stat(victim).st_uid == os.geteuid()


@root_only
def test_a_file_of_another_user_is_refused_unless_allowed(tmp_path: Path, victim: Path) -> None:
    os.chown(victim, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=f"belongs to uid {NOBODY}"):
        devices.prepare_backing(victim, SIZE)
    assert devices.prepare_backing(victim, SIZE, allowed_uids=(NOBODY,)) is False  # QEMU's own file


@root_only
def test_a_directory_another_user_controls_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=f"belongs to uid {NOBODY}"):
        devices.prepare_backing(theirs / "pm.img", SIZE)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(UsageError, match="writable by every user"):
        devices.prepare_backing(open_dir / "pm.img", SIZE)
    assert not (theirs / "pm.img").exists() and not (open_dir / "pm.img").exists()
    sticky = tmp_path / "sticky"  # like /tmp: others cannot rename or remove root's file there
    sticky.mkdir()
    sticky.chmod(0o1777)
    assert devices.prepare_backing(sticky / "pm.img", SIZE) is True


def test_a_new_backing_is_private_sparse_and_given_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "pm.img"
    owner = (NOBODY, NOBODY) if os.geteuid() == 0 else None
    assert devices.prepare_backing(path, SIZE, owner=owner) is True
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == SIZE
    assert st.st_blocks == 0
    if owner:
        assert (st.st_uid, st.st_gid) == owner


def test_an_existing_backing_keeps_its_data_and_needs_the_exact_size(tmp_path: Path, victim: Path) -> None:
    assert devices.prepare_backing(victim, SIZE) is False
    assert victim.read_bytes()[:6] == b"secret"
    with pytest.raises(UsageError, match="exactly"):
        devices.prepare_backing(victim, 2 * SIZE)


def test_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        devices.prepare_backing(tmp_path / "nope" / "pm.img", SIZE)
