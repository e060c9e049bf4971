"""Running the installed ``hvext`` console script as a shell does: completion requests and pipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import require

ROOT = Path(__file__).resolve().parents[1]
HVEXT = Path(sys.executable).parent / "hvext"


def env(**extra: str) -> dict[str, str]:
    """The environment of a console-script run that imports this checkout's hvext."""
    return {k: v for k, v in os.environ.items() if k not in ("_ARGCOMPLETE", "COMP_LINE", "COMP_POINT")} | {
        "PYTHONPATH": str(ROOT), "COLUMNS": "80"} | extra


def complete(line: str, timeout: float = 60, **extra: str) -> tuple[list[str], str, int]:
    """Candidates the shell would get for *line* (cursor at its end), stderr, and exit status."""
    require(HVEXT.is_file(), f"{HVEXT} missing: the console script comes with `make venv`")
    # As argcomplete's bash function runs it: candidates on fd 8, fd 9 for debugging, stdout discarded.
    proc = subprocess.run(["bash", "-c", '"$0" 8>&1 9>/dev/null >/dev/null', str(HVEXT)], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=env(_ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
                                  _ARGCOMPLETE_IFS="\n", **extra))
    return [c.strip() for c in proc.stdout.split("\n") if c.strip()], proc.stderr, proc.returncode


def into_closed_pipe(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run hvext with stdout into a pipe nobody reads any more (`hvext ... | head` after head exited)."""
    require(HVEXT.is_file(), f"{HVEXT} missing: the console script comes with `make venv`")
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([str(HVEXT), *argv], stdout=write, stderr=subprocess.PIPE, text=True, env=env(),
                              timeout=60)
    finally:
        os.close(write)
