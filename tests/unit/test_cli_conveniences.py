"""What virsh users expect of a CLI: --version, `help COMMAND`, shell completion, a man page, and quiet pipes.

Completion and pipes run the installed console script in a subprocess, the way
a shell does: completion through argcomplete's protocol (``_ARGCOMPLETE``,
``COMP_LINE``, ``COMP_POINT``, candidates on file descriptor 8), output into
a real pipe whose reader is gone. Domain names of real domains are completed
in tests/vm/test_cli_conveniences.py (that needs libvirtd and the image).
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hvext.cli import completion, manpage, watch
from hvext.cli.dirty import sparkline
from hvext.cli.main import EXIT_BROKEN_PIPE, build_parser, main
from tests.clirun import HVEXT, complete, env, into_closed_pipe
from tests.support import require

DEAD_URI = "qemu+unix:///system?socket=/nonexistent/hvext-test/libvirt-sock"


# -- --version and help ---------------------------------------------------


def test_version_is_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"hvext {importlib.metadata.version('hvext')}\n"


def command_paths() -> list[tuple[str, ...]]:
    return [path for path, _, _ in manpage.commands(build_parser())]


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_help_command_prints_what_dash_dash_help_prints(capsys: pytest.CaptureFixture[str],
                                                        path: tuple[str, ...]) -> None:
    assert main(["help", *path]) == 0
    via_help = capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    assert via_help == capsys.readouterr().out and via_help.startswith(f"usage: hvext {' '.join(path)} ")


def test_help_without_a_command_is_the_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hvext ") and "dirtylog" in out and "help" in out


@pytest.mark.parametrize("argv,message", [
    (["help", "frobnicate"], "unknown command 'frobnicate'; `hvext --help` lists the commands"),
    (["help", "daemon", "frob"], "unknown command 'daemon frob'; `hvext help daemon` lists its subcommands"),
    (["help", "list", "more"], "unknown command 'list more'; 'list' has no subcommands"),
])
def test_help_of_an_unknown_command_fails(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and message in err


# -- completion -----------------------------------------------------------


def test_completion_of_a_command_prefix() -> None:
    candidates, err, status = complete("hvext dirty")
    assert (candidates, err, status) == (["dirtylog"], "", 0)
    assert sorted(complete("hvext pmem-snap")[0]) == ["pmem-snapshot", "pmem-snapshot-delete", "pmem-snapshots"]
    assert sorted(complete("hvext daemon st")[0]) == ["start", "status", "stop"]
    assert complete("hvext help memc")[0] == ["memclass"]


def test_completion_of_options() -> None:
    assert complete("hvext dirtylog somevm --wa")[0] == ["--watch"]
    assert complete("hvext --ver")[0] == ["--version"]
    assert set(complete("hvext memclass somevm --")[0]) == {"--help", "--watch", "--count", "--json"}
    assert sorted(complete("hvext -c qemu:///s")[0]) == ["qemu:///session", "qemu:///system"]


def test_domain_completion_on_an_unreachable_libvirt_is_quietly_empty() -> None:
    assert complete(f"hvext -c {DEAD_URI} dominfo hv") == ([], "", 0)
    assert complete("hvext dominfo hv", LIBVIRT_DEFAULT_URI=DEAD_URI) == ([], "", 0)


@pytest.fixture
def silent_libvirtd(tmp_path: Path) -> Iterator[str]:
    """A socket that accepts libvirt's connection and never answers (a hung or very slow libvirtd)."""
    path = tmp_path / "sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    try:
        yield f"qemu+unix:///system?socket={path}"
    finally:
        server.close()


def test_domain_completion_gives_up_on_a_libvirtd_that_does_not_answer(silent_libvirtd: str) -> None:
    started = time.monotonic()
    result = complete(f"hvext -c {silent_libvirtd} dominfo hv", timeout=30, HVEXT_COMPLETION_TIMEOUT="1")
    elapsed = time.monotonic() - started
    assert result == ([], "", 0)
    assert elapsed < 10, f"completion took {elapsed:.1f} s"


def test_ssh_uris_cannot_prompt() -> None:
    assert completion.batch_uri("qemu+ssh://h/system") == "qemu+ssh://h/system?no_tty=1"
    assert completion.batch_uri("qemu+ssh://h/system?keyfile=k") == "qemu+ssh://h/system?keyfile=k&no_tty=1"
    assert completion.batch_uri("qemu+libssh2://h/system?no_tty=0") == "qemu+libssh2://h/system?no_tty=0"
    assert completion.batch_uri("qemu:///system") == "qemu:///system"


def test_every_domain_argument_completes_domain_names() -> None:
    parser = build_parser()
    seen = []
    completion.install_completers(parser, domains=lambda **_: ["d"])
    for path, _, sub in manpage.commands(parser):
        for action in sub._actions:
            if action.metavar == "DOMAIN" and not action.option_strings:
                seen.append(path)
                assert getattr(action, "completer", None) is not None, path
    assert ("dominfo",) in seen and ("dirtylog",) in seen and ("power", "protect") in seen


def test_completion_shell_code_registers_hvext() -> None:
    out = subprocess.run([sys.executable, "-m", "hvext.cli.completion", "bash"], capture_output=True, text=True,
                         env=env(), check=True).stdout
    assert "complete " in out and " hvext" in out and "_ARGCOMPLETE" in out
    bash = subprocess.run(["bash", "-c", 'source /dev/stdin && complete -p hvext'], input=out, capture_output=True,
                          text=True)
    assert bash.returncode == 0 and bash.stdout.strip().endswith(" hvext"), bash.stderr
    bad = subprocess.run([sys.executable, "-m", "hvext.cli.completion", "csh"], capture_output=True, text=True,
                         env=env())
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")


# -- output into a closed pipe ----------------------------------------------


@pytest.mark.parametrize("argv", [["help", "memclass"], ["help"]])
def test_output_into_a_closed_pipe_ends_quietly(argv: list[str]) -> None:
    proc = into_closed_pipe(*argv)
    assert (proc.returncode, proc.stderr) == (EXIT_BROKEN_PIPE, "")


def test_argparse_help_into_a_closed_pipe_has_no_traceback() -> None:
    proc = into_closed_pipe("--help")
    assert proc.returncode in (0, EXIT_BROKEN_PIPE) and proc.stderr == ""


def test_help_piped_to_head() -> None:
    require(HVEXT.is_file(), f"{HVEXT} missing: the console script comes with `make venv`")
    proc = subprocess.run(["bash", "-c", 'set -o pipefail; for _ in 1 2 3; do "$0" help dirtylog | head -c 10; '
                           '"$0" --help | head -1; done', str(HVEXT)], capture_output=True, text=True, env=env(),
                          timeout=120)
    assert proc.stderr == "" and proc.returncode in (0, EXIT_BROKEN_PIPE)
    assert proc.stdout.startswith("usage: hve")


# -- man page ---------------------------------------------------------------


@pytest.fixture(scope="module")
def page() -> str:
    return subprocess.run([sys.executable, "-m", "hvext.cli.manpage"], capture_output=True, text=True, check=True,
                          env=env()).stdout


def test_man_page_covers_every_command(page: str) -> None:
    paths = command_paths()
    assert len(paths) > 30
    for path in paths:
        assert f'.SS "{manpage.escape(" ".join(path))}"\n' in page, path
    assert "\\fB\\-\\-watch\\fR" not in page  # options are shown with their arguments
    assert "\\fB\\-\\-watch [SECONDS]\\fR" in page and ".SH EXIT STATUS" in page


def test_man_page_renders(page: str, tmp_path: Path) -> None:
    require(shutil.which("groff"), "groff missing (package groff-base, setup/host.sh packages)")
    source = tmp_path / "hvext.1"
    source.write_text(page)
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(source)], capture_output=True, text=True,
                          env=env(LC_ALL="C.UTF-8"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = subprocess.run(["col", "-bx"], input=proc.stdout, capture_output=True, text=True).stdout \
        if shutil.which("col") else proc.stdout
    for path in command_paths():
        assert " ".join(path) in text
    assert "hvext dirtylog [-h] [--seconds SECONDS] [--watch [SECONDS]]" in text
    if shutil.which("man"):
        man = subprocess.run(["man", "-l", str(source)], capture_output=True, text=True,
                             env=env(MANPAGER="cat", PAGER="cat", MANWIDTH="100", LC_ALL="C.UTF-8"))
        assert man.returncode == 0 and "HVEXT(1)" in man.stdout, man.stderr


def test_roff_escaping() -> None:
    assert manpage.escape(".rm x\n'x\na-b\\c") == "\\&.rm x\n\\&'x\na\\-b\\ec"


# -- --watch ------------------------------------------------------------------


def test_watch_takes_count_samples_one_interval_apart(capsys: pytest.CaptureFixture[str]) -> None:
    taken: list[float] = []

    def sample() -> int:
        taken.append(time.monotonic())
        return len(taken)

    started = time.monotonic()
    assert watch.run(sample, interval=0.1, count=3, as_json=True, to_dict=lambda n: {"n": n}, render=str,
                     first_after_interval=True) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [{"n": 1}, {"n": 2}, {"n": 3}]
    # sample i is never taken before its slot (started + (i + 1) intervals); a late one (a busy machine)
    # may be followed sooner, since the schedule does not drift
    assert all(t - started >= 0.1 * (i + 1) - 0.001 for i, t in enumerate(taken)), taken


def test_count_needs_watch(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["dirtylog", "x", "--count", "2"], ["memclass", "x", "--count", "2"]):
        assert main(["-c", DEAD_URI, *argv]) == 1
        assert "error: --count needs --watch" in capsys.readouterr().err
    for argv in (["dirtylog", "x", "--watch", "--count", "0"], ["dirtylog", "x", "--watch", "nan"]):
        assert main(["-c", DEAD_URI, *argv]) == 1
        assert capsys.readouterr().err.splitlines()[-1].startswith("error: argument --")
    assert main(["-c", DEAD_URI, "dirtylog", "x", "--watch", "2", "--seconds", "3"]) == 1
    assert "error: --watch SECONDS sets the interval" in capsys.readouterr().err


def test_sparkline() -> None:
    assert sparkline((0, 1, 2, 5, 10)) == "▁▂▂▅█"
    assert sparkline((0, 0)) == "▁▁" and sparkline(()) == ""
