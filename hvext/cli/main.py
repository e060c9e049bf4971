"""``hvext [-c URI] COMMAND [DOMAIN] [options]``: the virsh-like command line.

One module per command group registers its commands; :func:`main` is the one
error boundary: every :class:`HvextError` becomes ``error: ...`` on stderr and
exit status 1, and so does a ``libvirt.libvirtError`` that escaped a command
module (translated by :func:`hvext.host.translate`, see :func:`run_command`).
Any other exception is a bug in hvext and keeps Python's traceback, as it
should be reported with it; ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import libvirt

from hvext import __version__
from hvext.cli import agentcmd, common, dirty, doctor, domain, lab, memory, migrate, pmem, qmpcmd
from hvext.cli import pools, reclaim
from hvext.cli import pmemsnap, power
from hvext.cli import daemon
from hvext.errors import HvextError
from hvext.host import translate

GROUPS = [doctor, domain, memory, agentcmd, qmpcmd, pmem, lab, dirty, migrate]
GROUPS += [pools, reclaim]
GROUPS += [power, pmemsnap]
GROUPS += [daemon]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors like every other hvext error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise common.CLIUsageError(message)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="hvext", description="hvext: a QEMU/KVM hypervisor extension (virsh-like).")
    parser.add_argument("-c", "--connect", metavar="URI", dest="uri",
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI, then qemu:///system)")
    parser.add_argument("--debug", action="store_true", help="log what hvext does, and show tracebacks")
    parser.add_argument("--version", action="version", version=f"hvext {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True
    for group in GROUPS:
        group.register(commands)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; a libvirtError it let escape becomes the hvext error users can read.

    Command modules should call libvirt through :class:`hvext.host.Host` /
    ``Domain`` (which translate); this is the last resort, so that a missed
    raw call gives ``error: ...``, exit 1, like virsh, never a traceback.
    """
    try:
        return args.func(args) or 0
    except libvirt.libvirtError as err:
        raise translate(err, f"hvext {args.command}") from err


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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


if __name__ == "__main__":
    sys.exit(main())
