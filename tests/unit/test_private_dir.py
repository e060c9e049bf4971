"""Directories hvext makes in places other users can write (/dev/shm): never through a link,
never one someone else owns or can write (paths.private_dir, paths.volatile_dir)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hvext import paths
from hvext.errors import HostError
from hvext.paths import UnsafePathError

NOBODY = 65534
root_only = pytest.mark.requires(os.geteuid() == 0, "chown to another user needs root")


@pytest.fixture
def shm_like(tmp_path: Path) -> Path:
    """A world-writable, sticky directory, like /dev/shm and /tmp."""
    place = tmp_path / "shm"
    place.mkdir()
    place.chmod(0o1777)
    return place


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_errors_are_host_errors() -> None:
    assert issubclass(UnsafePathError, HostError)


def test_creates_root_owned_dir_with_exact_mode_and_group(shm_like: Path) -> None:
    made = paths.private_dir(shm_like / "hvext", mode=0o710, gid=NOBODY if os.geteuid() == 0 else None)
    st = os.lstat(made)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and mode_of(made) == 0o710
    if os.geteuid() == 0:
        assert st.st_gid == NOBODY


def test_a_planted_symlink_is_refused_and_its_target_untouched(shm_like: Path, tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.mkdir()
    target.chmod(0o755)
    (shm_like / "hvext").symlink_to(target)
    with pytest.raises(UnsafePathError, match="symlink"):
        paths.private_dir(shm_like / "hvext", mode=0o700)
    assert mode_of(target) == 0o755 and os.path.islink(shm_like / "hvext")


def test_a_dangling_symlink_is_refused_and_nothing_created(shm_like: Path, tmp_path: Path) -> None:
    (shm_like / "hvext").symlink_to(tmp_path / "not-yet")
    with pytest.raises(UnsafePathError, match="symlink"):
        paths.private_dir(shm_like / "hvext")
    assert not (tmp_path / "not-yet").exists()


@root_only
def test_a_dir_owned_by_another_user_is_refused(shm_like: Path) -> None:
    other = shm_like / "hvext"
    other.mkdir(mode=0o700)
    os.chown(other, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match=f"owned by uid {NOBODY}"):
        paths.private_dir(other)
    assert os.lstat(other).st_uid == NOBODY and mode_of(other) == 0o700  # not taken over


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o722])
def test_a_dir_others_can_write_is_refused(shm_like: Path, mode: int) -> None:
    opened = shm_like / "hvext"
    opened.mkdir()
    opened.chmod(mode)
    with pytest.raises(UnsafePathError, match="writable by"):
        paths.private_dir(opened)
    assert mode_of(opened) == mode


@root_only
def test_group_write_is_accepted_only_for_the_allowed_group(shm_like: Path) -> None:
    shared = shm_like / "dom"
    shared.mkdir()
    os.chown(shared, 0, NOBODY)
    shared.chmod(0o770)
    with pytest.raises(UnsafePathError, match=f"group {NOBODY}"):
        paths.private_dir(shared, mode=0o770, gid=NOBODY - 1)
    assert paths.private_dir(shared, mode=0o770, gid=NOBODY) == shared
    assert paths.private_dir(shared, mode=0o750, gid=NOBODY) == shared  # an older hvext's dir, tightened
    assert mode_of(shared) == 0o750


def test_a_file_in_its_place_is_refused(shm_like: Path) -> None:
    (shm_like / "hvext").write_text("x")
    with pytest.raises(UnsafePathError, match="not a directory"):
        paths.private_dir(shm_like / "hvext")


def test_an_older_readable_dir_of_ours_is_tightened(shm_like: Path) -> None:
    older = shm_like / "hvext"
    older.mkdir()
    older.chmod(0o755)
    paths.private_dir(older, mode=0o700)
    assert mode_of(older) == 0o700


def test_exclusive_refuses_an_existing_dir(shm_like: Path) -> None:
    paths.private_dir(shm_like / "d", exclusive=True)
    with pytest.raises(FileExistsError):
        paths.private_dir(shm_like / "d", exclusive=True)


def test_world_access_cannot_be_asked_for(shm_like: Path) -> None:
    with pytest.raises(ValueError):
        paths.private_dir(shm_like / "d", mode=0o755)


@root_only
def test_volatile_dir_layout_and_hostile_domain_dir(shm_like: Path, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setattr(paths, "VOLATILE_DIR", shm_like / "hvext")
    made = paths.volatile_dir("vm1", NOBODY)
    assert made == shm_like / "hvext" / "vm1"
    for path, mode in ((shm_like / "hvext", 0o710), (made, 0o750)):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, mode_of(path)) == (0, NOBODY, mode)
    # A user who can write the top directory (if it ever were open) plants a link for the next domain:
    (shm_like / "hvext").chmod(0o777)
    with pytest.raises(UnsafePathError):
        paths.volatile_dir("vm2", NOBODY)
    (shm_like / "hvext").chmod(0o710)
    (shm_like / "hvext" / "vm2").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match="symlink"):
        paths.volatile_dir("vm2", NOBODY)


@root_only
def test_volatile_dir_refuses_a_top_dir_owned_by_another_user(shm_like: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "VOLATILE_DIR", shm_like / "hvext")
    (shm_like / "hvext").mkdir(mode=0o755)
    os.chown(shm_like / "hvext", NOBODY, NOBODY)  # a user made /dev/shm/hvext before hvext did
    with pytest.raises(UnsafePathError, match="owned by"):
        paths.volatile_dir("vm1", 0)
    assert not (shm_like / "hvext" / "vm1").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_volatile_dir_refuses_names_that_are_not_one_component(name: str, shm_like: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "VOLATILE_DIR", shm_like / "hvext")
    with pytest.raises(UnsafePathError):
        paths.volatile_dir(name, 0)
