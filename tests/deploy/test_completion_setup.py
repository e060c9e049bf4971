"""``setup/host.sh completion`` (run by ``make setup`` and the Ansible role) installs working bash completion.

The step writes /etc/bash_completion.d/hvext only when its content changed;
a real bash sources the file and its completion function completes a command.
The file as it was before the test is restored afterwards.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clirun import HVEXT, ROOT, env
from tests.support import require

TARGET = Path("/etc/bash_completion.d/hvext")


@pytest.fixture
def target() -> Iterator[Path]:
    require(os.geteuid() == 0, "setup/host.sh runs as root")
    require(HVEXT.is_file(), f"{HVEXT} missing: the console script comes with `make venv`")
    before = TARGET.read_bytes() if TARGET.exists() else None
    TARGET.unlink(missing_ok=True)
    try:
        yield TARGET
    finally:
        if before is None:
            TARGET.unlink(missing_ok=True)
        else:
            TARGET.write_bytes(before)
            TARGET.chmod(0o644)


def setup_step() -> str:
    proc = subprocess.run([str(ROOT / "setup/host.sh"), "completion"], cwd=ROOT, capture_output=True, text=True,
                          env=env(HVEXT_VENV=sys.prefix), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_setup_installs_completion_once_and_bash_uses_it(target: Path) -> None:
    assert setup_step() == f"setup: shell completion: {target} installed\n"
    assert setup_step() == f"setup: shell completion: {target} up to date\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".hvext.")]  # no temporary file left
    script = ('source "$1"; fn=$(complete -p hvext | sed -E "s/.* -F ([^ ]+) .*/\\1/"); '
              'COMP_LINE="hvext dirty"; COMP_POINT=${#COMP_LINE}; COMP_WORDS=(hvext dirty); COMP_CWORD=1; '
              '"$fn" "$2" dirty hvext; printf "%s\\n" "${COMPREPLY[@]}"')
    proc = subprocess.run(["bash", "-c", script, "bash", str(target), str(HVEXT)], capture_output=True, text=True,
                          env=env(), timeout=60)
    assert [line.strip() for line in proc.stdout.splitlines()] == ["dirtylog"], proc.stderr


def test_a_fresh_shell_completes_hvext_after_setup(target: Path, tmp_path: Path) -> None:
    """`setup/host.sh packages` installs bash-completion, which loads /etc/bash_completion.d/hvext in every
    interactive login shell and under Debian's default ~/.bashrc; without it the file was never read."""
    proc = subprocess.run([str(ROOT / "setup/host.sh"), "packages"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    setup_step()
    (tmp_path / "login").mkdir()
    (tmp_path / "skel").mkdir()
    skel_bashrc = Path("/etc/skel/.bashrc")
    if skel_bashrc.is_file():
        (tmp_path / "skel" / ".bashrc").write_bytes(skel_bashrc.read_bytes())
    shells = {"login": ["bash", "-il", "-c", "complete -p hvext"]}
    if skel_bashrc.is_file():
        shells["skel"] = ["bash", "-i", "-c", "complete -p hvext"]
    for home, command in shells.items():
        shell = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
                               env={"HOME": str(tmp_path / home), "PATH": os.environ["PATH"], "TERM": "dumb"})
        assert shell.returncode == 0 and re.search(r" -F \S+ hvext$", shell.stdout, re.M), (home, shell.stderr)
