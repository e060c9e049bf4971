"""Lab processes: identified by PID, start time and name from /proc; never a root-namespace process."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from hvext.lab import procs
from hvext.lab.plan import LabError, ProcessRef

STAT = "1234 (lib virtd) S 1 1234 1234 0 -1 4194624 100 0 0 0 5 3 0 0 20 0 18 0 987654 123 45 rest"


def test_parse_stat() -> None:
    assert procs.parse_stat(STAT) == ("lib virtd", "S", 987654)


def test_parse_stat_comm_with_parentheses() -> None:
    assert procs.parse_stat(STAT.replace("(lib virtd)", "(a) (b)"))[0] == "a) (b"


@pytest.mark.parametrize("text", ["", "1234 libvirtd S", "1 (x) S 1 2"])
def test_parse_stat_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        procs.parse_stat(text)


def test_identify_this_process() -> None:
    ref = procs.identify(os.getpid())
    assert ref is not None and ref.pid == os.getpid() and ref.start_ticks > 0
    assert procs.is_alive(ref)
    assert not procs.is_alive(ProcessRef(ref.pid, ref.start_ticks + 1, ref.comm))  # a reused PID
    assert not procs.is_alive(ProcessRef(ref.pid, ref.start_ticks, "libvirtd"))


def test_pid_files(tmp_path: Path) -> None:
    assert procs.read_pid_file(tmp_path / "absent.pid") is None
    (tmp_path / "empty.pid").write_text("")
    assert procs.read_pid_file(tmp_path / "empty.pid") is None
    (tmp_path / "ok.pid").write_text("4242\n")
    assert procs.read_pid_file(tmp_path / "ok.pid") == 4242
    for name, text in (("junk.pid", "hello"), ("init.pid", "1"), ("neg.pid", "-5")):
        (tmp_path / name).write_text(text)
        with pytest.raises(LabError):
            procs.read_pid_file(tmp_path / name)


def test_kill_all_refuses_root_namespace_processes() -> None:
    """The machine's own libvirtd runs in the root netns: a stale record must never hit it."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        ref = procs.identify(child.pid)
        assert ref is not None
        with pytest.raises(LabError, match="root network namespace"):
            procs.kill_all([ref])
        assert child.poll() is None  # not signalled
    finally:
        child.kill()
        child.wait()


def test_kill_all_skips_processes_that_are_gone() -> None:
    child = subprocess.Popen(["true"])
    ref = procs.identify(child.pid)
    child.wait()
    assert ref is None or procs.kill_all([ref]) == []


def test_kill_now_and_signal_one_refuse_root_namespace_processes() -> None:
    import signal
    child = subprocess.Popen(["sleep", "30"])
    try:
        ref = procs.identify(child.pid)
        assert ref is not None
        for attempt in (lambda: procs.kill_now([ref]), lambda: procs.signal_one(ref, signal.SIGPWR)):
            with pytest.raises(LabError, match="root network namespace"):
                attempt()
        assert child.poll() is None
        with pytest.raises(LabError, match="root network namespace"):
            procs.in_netns(procs.netns_inode("self"))  # type: ignore[arg-type]
    finally:
        child.kill()
        child.wait()
    with pytest.raises(LabError, match="is not running"):
        procs.signal_one(ref, signal.SIGPWR)


@pytest.mark.requires(os.geteuid() == 0, "a network namespace needs root")
def test_in_netns_finds_every_process_of_a_namespace_and_kill_now_kills_them() -> None:
    """A shell and its child in their own network namespace are found by the namespace alone
    (nobody recorded the child's PID) and both die at once."""
    shell = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", "sleep 60 & echo ready; wait"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert shell.stdout is not None and shell.stdout.readline().strip() == "ready"
        inode = procs.netns_inode(shell.pid)
        assert inode is not None and inode != procs.netns_inode("self")
        deadline = time.monotonic() + 10
        found = procs.in_netns(inode)
        while sorted(r.comm for r in found) != ["sh", "sleep"]:
            assert time.monotonic() < deadline, found  # the child may not have exec'd sleep yet
            time.sleep(0.02)
            found = procs.in_netns(inode)
        killed = procs.kill_now(found)
        assert sorted(r.comm for r in killed) == ["sh", "sleep"]
        assert not any(procs.is_alive(r) for r in found)
    finally:
        shell.kill()
        shell.wait()
