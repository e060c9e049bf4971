"""``setup/host.sh completion`` (run by ``make setup`` and the Ansible role) installs working bash completion.

The step writes /etc/bash_completion.d/hvext only when its content changed;
a real bash sources the file and its completion function completes a command.
The file as it was before the test is restored afterwards.
"""

from __future__ import annotations

import os
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
