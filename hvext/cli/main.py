"""``hvext [-c URI] COMMAND [DOMAIN] [options]``: the virsh-like command line.

One module per command group registers its commands; :func:`main` is the one
error boundary: every :class:`HvextError` becomes ``error: ...`` on stderr and
exit status 1, and so does a ``libvirt.libvirtError`` that escaped a command
module (translated by :func:`hvext.host.libvirt_errors`, see :func:`run_command`).
Any other exception is a bug in hvext and keeps Python's traceback, as it
should be reported with it; ``--debug`` shows the traceback of every error.
Output into a closed pipe (``hvext ... | head``) ends the
command quietly with status 141, as a shell reports a process SIGPIPE killed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Sequence

from hvext import __version__
from hvext.cli import agentcmd, common, dirty, doctor, domain, lab, memory, migrate, pmem, qmpcmd
from hvext.cli import hugepages, nvmram, pools, reclaim, sharing, swapfile
from hvext.cli import placement, pmemsnap, power
from hvext.cli import daemon
from hvext.cli import cluster, ha
from hvext.cli import completion
from hvext.errors import HvextError
from hvext.host import libvirt_errors

GROUPS = [doctor, domain, memory, agentcmd, qmpcmd, pmem, lab, dirty, migrate]
GROUPS += [pools, reclaim, sharing, hugepages, nvmram, swapfile]
GROUPS += [power, pmemsnap, placement]
GROUPS += [daemon]
GROUPS += [cluster, ha]

#: Exit status after output went into a closed pipe: 128 + SIGPIPE, what a shell reports for `yes | head`.
EXIT_BROKEN_PIPE = 141


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors like every other hvext error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise common.CLIUsageError(message)


def version() -> str:
    """The installed distribution's version (package metadata), else the source tree's."""
    try:
        return importlib.metadata.version("hvext")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="hvext", description="hvext: a QEMU/KVM hypervisor extension (virsh-like).")
    parser.add_argument("-c", "--connect", metavar="URI", dest="uri",
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system)")
    parser.add_argument("--debug", action="store_true", help="log what hvext does, and show tracebacks")
    parser.add_argument("--version", action="version", version=f"hvext {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True
    for group in GROUPS:
        group.register(commands)
    _register_help(parser, commands)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; a libvirtError it let escape becomes the hvext error users can read.

    Command modules should call libvirt through :class:`hvext.host.Host` /
    ``Domain`` (which translate); this is the last resort, so that a missed
    raw call gives ``error: ...``, exit 1, like virsh, never a traceback.
    """
    with libvirt_errors(f"hvext {args.command}"):
        return args.func(args) or 0


def subcommand(parser: argparse.ArgumentParser, path: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of ``hvext PATH...`` (e.g. ``["daemon", "start"]``); UsageError for an unknown one."""
    current = parser
    for depth, name in enumerate(path):
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name not in subs[0].choices:
            known = ("`hvext --help` lists the commands" if depth == 0 else
                     f"`hvext help {' '.join(path[:depth])}` lists its subcommands" if subs else
                     f"{' '.join(path[:depth])!r} has no subcommands")
            raise common.CLIUsageError(f"unknown command {' '.join(path[:depth + 1])!r}; {known}")
        current = subs[0].choices[name]
    return current


def _register_help(parser: ArgumentParser, commands: argparse._SubParsersAction) -> None:
    """``hvext help [COMMAND [SUBCOMMAND]]``: what ``hvext COMMAND --help`` prints (like ``virsh help``)."""
    p = commands.add_parser("help", help="show the help of a command (the same as COMMAND --help)")
    action = p.add_argument("topic", nargs="*", metavar="COMMAND", help="a command, and a subcommand of it")
    action.completer = lambda prefix, **_: [c for c in commands.choices if c.startswith(prefix)]  # type: ignore

    def cmd_help(args: argparse.Namespace) -> int:
        sys.stdout.write(subcommand(parser, args.topic).format_help())
        return 0

    p.set_defaults(func=cmd_help)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    completion.complete(parser)  # exits when the shell asked for completions
    try:
        args = parser.parse_args(argv)
    except common.CLIUsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_command(args)
    except HvextError as err:
        if args.debug:
            raise
        print(f"error: {common.literal(err, markup=False)}", file=sys.stderr)  # may quote the guest
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        # The reader is gone (`hvext ... | head`): stop quietly. Point stdout at /dev/null so that
        # the interpreter's flush at exit does not fail on what is still buffered (Python docs,
        # "Note on SIGPIPE").
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stdout without a file descriptor (embedding, tests): nothing to redirect
            pass
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
