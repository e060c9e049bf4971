"""hvext.pmem.power without a VM: the registry, the persistence hints given to a save, and trusting dirty lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hvext.dirty.pages import DirtyBlock, DirtyPages
from hvext.errors import UsageError
from hvext.host import Domain
from hvext.pmem import hints, power
from tests.support import require
from hvext.pmem.store import BLOCK_SIZE, Store, StoreError

SIZE = 16 * BLOCK_SIZE


def reg(**fields: object) -> power.Registration:
    base: dict[str, object] = {"domain": "d", "uuid": "u", "backing": "/dev/shm/hvext/d/nvdimm0.img", "store": "/s",
                               "model": "nvdimm", "size": SIZE, "ram_block": "memnvdimm0",
                               "dirty_log": {"domain_id": 7, "generation": 3}}
    base.update(fields)
    return power.Registration(**base)  # type: ignore[arg-type]


def test_registry_is_written_atomically_and_read_back(tmp_path: Path) -> None:
    with power.registry(tmp_path) as regs:
        regs.append(reg())
    assert not list(tmp_path.glob(".registry.json.tmp*"))
    data = json.loads((tmp_path / "registry.json").read_text())
    assert data["devices"][0]["ram_block"] == "memnvdimm0"
    with power.registry(tmp_path) as regs:
        regs[0].pending = "resume"
    assert power.registrations(tmp_path)[0].pending == "resume"
    (tmp_path / "registry.json").write_text("not json")
    with pytest.raises(power.PowerError, match="unreadable"):
        power.registrations(tmp_path)


def test_unprotect(tmp_path: Path) -> None:
    with power.registry(tmp_path) as regs:
        regs.append(reg())
    with pytest.raises(power.PowerUsageError, match="not protected"):
        power.unprotect("d", Path("/other"), registry_dir=tmp_path)
    assert power.unprotect("d", Path("/other"), registry_dir=tmp_path, missing_ok=True) is None
    assert power.unprotect("d", Path(reg().backing), registry_dir=tmp_path) is not None
    assert power.registrations(tmp_path) == []


class Ranges:
    """A hint provider that only narrows what is saved (power.HintProvider)."""

    def __init__(self, ranges: list[tuple[int, int]] | None) -> None:
        self._ranges = ranges

    def before_pause(self, domain: Domain, deadline: float) -> dict[str, Any]:
        return {}

    def after_resume(self, domain: Domain) -> None:
        pass

    def ranges(self, reg: power.Registration) -> list[tuple[int, int]] | None:
        return self._ranges


def test_the_hints_given_narrow_the_ranges_saved_and_none_means_the_whole_device() -> None:
    assert power.ranges_to_save(reg(), None) == [(0, SIZE)]
    assert power.ranges_to_save(reg(), Ranges(None)) == [(0, SIZE)]
    assert power.ranges_to_save(reg(), Ranges([(BLOCK_SIZE, 10)])) == [(BLOCK_SIZE, 10)]


def test_the_guest_hints_provider_saves_what_before_pause_prepared() -> None:
    registration = reg()
    assert hints.PROVIDER.ranges(registration) is None  # nothing prepared: the whole device
    hints._prepared[registration.backing] = [(0, BLOCK_SIZE)]
    assert power.ranges_to_save(registration, hints.PROVIDER) == [(0, BLOCK_SIZE)]
    assert hints.PROVIDER.ranges(registration) is None  # taken once: a later save is not narrowed by it


def test_dirty_list_is_trusted_only_when_unbroken(tmp_path: Path) -> None:
    store = Store.create(tmp_path / "s", SIZE)
    block = DirtyBlock("memnvdimm0", SIZE, True, SIZE // 4096, ((0, 1), (17, 2), (40, 1)))
    dirty = DirtyPages(4096, 4, 1000, {"memnvdimm0": block})
    # pages 0, 17-18, 40 -> 64 KiB blocks 0, 1, 2
    assert power._dirty_blocks(reg(), dirty, 7, store) == {0, 1, 2}
    assert power._dirty_blocks(reg(), dirty, 8, store) is None  # another QEMU run
    assert power._dirty_blocks(reg(dirty_log={"domain_id": 7, "generation": 2}), dirty, 7, store) is None  # gap
    assert power._dirty_blocks(reg(dirty_log=None), dirty, 7, store) is None
    assert power._dirty_blocks(reg(ram_block="other"), dirty, 7, store) is None
    assert power._dirty_blocks(reg(), None, 7, store) is None


def test_guest_snapshot_change_runs() -> None:
    from hvext.pmem.guestsnap import _changed_blocks
    a = bytes(8 * 4)
    b = bytearray(a)
    b[4] = 1      # block 1
    b[9] = 1      # block 2
    b[31] = 1     # block 7
    assert list(_changed_blocks(a, bytes(b), 4)) == [(4, 8), (28, 4)]
    assert list(_changed_blocks(a, a, 4)) == []


@pytest.mark.parametrize("argv, message", [
    (["pmem-attach", "d", "--size", "64M", "--store", "/var/tmp/s"], "--store goes with --volatile-backing"),
    (["pmem-attach", "d", "--size", "64M", "--volatile-backing", "--backing", "/a"], "omit --backing"),
    (["power", "bogus"], "invalid choice"),
])
def test_cli_input_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from hvext.cli.main import main
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "error: " in err and message in err, err


def test_registry_is_private(tmp_path: Path) -> None:
    directory = tmp_path / "power"
    old = os.umask(0o022)
    try:
        with power.registry(directory) as regs:
            regs.append(reg())
    finally:
        os.umask(old)
    assert directory.stat().st_mode & 0o777 == 0o700
    for name in ("registry.json", "registry.lock"):
        assert (directory / name).stat().st_mode & 0o777 == 0o600, name
    directory.chmod(0o755)  # made by an earlier hvext: tightened on the next use
    power.registrations(directory)
    assert directory.stat().st_mode & 0o777 == 0o700


def test_registry_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    directory = tmp_path / "power"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(StoreError, match="writable by every user"):
        power.registrations(directory)
    assert not list(directory.iterdir())


def test_restore_check_does_not_follow_a_link_or_block_on_a_fifo(tmp_path: Path) -> None:
    """Power restore compares the backing with the store as root: a backing replaced by a link (to a
    file of root's) or by a FIFO is refused, not read through (nor waited on)."""
    source = tmp_path / "dev.img"
    source.write_bytes(bytes(SIZE))
    Store.create(tmp_path / "store", SIZE).save(source)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's secret")
    backing = tmp_path / "backing.img"
    backing.symlink_to(victim)
    registration = reg(backing=str(backing), store=str(tmp_path / "store"))
    with pytest.raises(UsageError, match="symbolic link"):
        power._restore_file(None, registration, (os.getuid(), os.getgid()), force=False)  # type: ignore[arg-type]
    assert victim.read_bytes() == b"root's secret" and backing.is_symlink()
    backing.unlink()
    os.mkfifo(backing)
    with pytest.raises(UsageError, match="not a regular file"):
        power._restore_file(None, registration, (os.getuid(), os.getgid()), force=True)  # type: ignore[arg-type]


def test_unprotect_remove_store_keeps_foreign_files(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    Store.create(store_dir, SIZE)
    (store_dir / "mine.txt").write_text("a user's file")
    with power.registry(tmp_path) as regs:
        regs.append(reg(store=str(store_dir)))
    power.unprotect("d", Path(reg().backing), remove_store=True, registry_dir=tmp_path)
    assert sorted(p.name for p in store_dir.iterdir()) == ["mine.txt"]


@pytest.mark.parametrize("content", [b"[" * 100_000, b'{"devices": ' + b"9" * 5000 + b"}", b"\xff\xfe",
                                     b'{"devices": [{"x": NaN}]}', b"[]", b'{"devices": [1]}'], ids=["deep", "huge-int", "not-utf8", "nan", "list", "not-objects"])
def test_a_damaged_registry_is_a_power_error(tmp_path: Path, content: bytes) -> None:
    """A damaged or hostile registry gave RecursionError (deep nesting) instead of a PowerError."""
    power.registrations(tmp_path)  # creates the private directory
    (tmp_path / "registry.json").write_bytes(content)
    with pytest.raises(power.PowerError, match="registry.json"):
        power.registrations(tmp_path)


def test_registry_lock_is_never_taken_through_a_symlink(tmp_path: Path) -> None:
    directory = tmp_path / "power"
    power.registrations(directory)
    (directory / "registry.lock").unlink()
    (directory / "registry.lock").symlink_to(tmp_path / "victim")
    with pytest.raises(power.PowerError, match=f"{directory / 'registry.lock'}"):
        power.registrations(directory)
    assert not (tmp_path / "victim").exists()


def test_an_unreadable_registry_is_a_power_error_naming_it(tmp_path: Path) -> None:
    """Reading the registry failed with a raw OSError (IsADirectoryError here; EACCES for a non-root
    user alike), not the PowerError every caller handles."""
    directory = tmp_path / "power"
    power.registrations(directory)
    (directory / "registry.json").mkdir()  # unreadable as a file, also for root
    with pytest.raises(power.PowerError, match=f"{directory / 'registry.json'}") as info:
        power.registrations(directory)
    assert isinstance(info.value.__cause__, OSError)


def test_an_unwritable_registry_is_a_power_error_naming_it(tmp_path: Path) -> None:
    """Writing the registry back failed with a raw OSError: the directory is gone (a file is in its
    place) when the changes are written."""
    directory = tmp_path / "power"
    power.registrations(directory)
    with pytest.raises(power.PowerError, match=f"{directory / 'registry.json'}") as info:
        with power.registry(directory) as regs:
            regs.append(reg())
            directory.rename(tmp_path / "moved")
            directory.write_text("not a directory")
    assert isinstance(info.value.__cause__, OSError)
    assert [p.name for p in (tmp_path / "moved").iterdir()] == ["registry.lock"]  # nothing half written


def test_an_error_of_the_registry_user_is_not_translated(tmp_path: Path) -> None:
    """Only the registry's own I/O becomes a PowerError; what the block raises passes unchanged."""
    with pytest.raises(FileNotFoundError, match="the caller's"), power.registry(tmp_path) as regs:
        regs.append(reg())
        raise FileNotFoundError("the caller's")
    assert power.registrations(tmp_path) == []


def test_a_user_who_cannot_read_the_registry_gets_a_power_error_not_a_traceback(tmp_path: Path) -> None:
    """``hvext undefine`` checks the registry before it undefines: as a user who cannot read root's
    0700 power directory that check must raise PowerError (a clear ``error:``), not PermissionError."""
    require(os.geteuid() == 0, "needs root to run the check as another user")
    private = tmp_path / "power"
    private.mkdir(mode=0o700)
    (private / "registry.json").write_text("[]")
    tmp_path.chmod(0o755)
    code = ("import sys; from pathlib import Path; from hvext.pmem import power\n"
            "try:\n    power.unregister_domain('d', 'u', registry_dir=Path(sys.argv[1]))\n"
            "except power.PowerError as err:\n    print('PowerError:', err); sys.exit(3)\n")
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-c", code, str(private)],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(power.__file__).parents[2])})
    assert done.returncode == 3, done.stderr
    assert "only be checked and dropped as root" in done.stdout
