"""Shell completion (argcomplete) for commands, options and domain names.

``python -m hvext.cli.completion [bash|zsh|fish]`` prints the shell code that
``setup/host.sh completion`` installs as ``/etc/bash_completion.d/hvext``. On
TAB the shell runs ``hvext`` with argcomplete's environment (``_ARGCOMPLETE``,
``COMP_LINE``, ``COMP_POINT``) and reads the candidates from file descriptor 8;
:func:`hvext.cli.main.main` hands such a run to argcomplete before anything
else happens.

Domain names come from the connection of ``-c`` (or ``LIBVIRT_DEFAULT_URI``),
listed in a background thread given :data:`TIMEOUT_S`: an unreachable or slow
libvirtd completes nothing instead of hanging the shell, and errors complete
nothing instead of printing.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

#: How long domain-name completion waits for libvirt.
TIMEOUT_S = float(os.environ.get("HVEXT_COMPLETION_TIMEOUT", "3"))
#: Positional arguments (by dest) that name an existing domain.
DOMAIN_DESTS = frozenset({"domain", "domains"})  # "domains": several (`hvext sharing A B`)
URIS = ("qemu:///system", "qemu:///session")
SHELLS = ("bash", "zsh", "fish", "tcsh")


def requested(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether this process was started by the shell to complete a command line."""
    return "_ARGCOMPLETE" in environ


def batch_uri(uri: str) -> str:
    """*uri* made unable to prompt: ssh transports get ``no_tty=1`` (no password prompt on the terminal)."""
    parts = urlsplit(uri)
    if "+ssh" in parts.scheme or "+libssh" in parts.scheme:
        if "no_tty=" not in parts.query:
            return uri + ("&" if parts.query else "?") + "no_tty=1"
    return uri


def list_domains(uri: str | None, timeout: float = TIMEOUT_S) -> list[str]:
    """Names of the domains (all, defined or running) at *uri*; [] on any error or after *timeout*."""
    found: list[str] = []

    def work() -> None:
        try:
            from hvext.host import Host, default_uri

            with Host(batch_uri(default_uri(uri))) as host:
                found.extend(d.name for d in host.domains())
        except Exception:  # completion must never print or fail: no candidates instead
            found.clear()

    thread = threading.Thread(target=work, name="hvext-complete-domains", daemon=True)
    thread.start()
    thread.join(timeout)
    return list(found) if not thread.is_alive() else []


def complete_domains(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """argcomplete completer: the domain names at the connection of ``-c``/LIBVIRT_DEFAULT_URI."""
    return [name for name in list_domains(getattr(parsed_args, "uri", None)) if name.startswith(prefix)]


def complete_uris(prefix: str, **_: Any) -> list[str]:
    return [uri for uri in URIS if uri.startswith(prefix)]


def _actions(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """Every action of *parser* and of its subcommands, recursively."""
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                yield from _actions(sub)


def install_completers(parser: argparse.ArgumentParser,
                       domains: Callable[..., list[str]] = complete_domains) -> None:
    """Attach completers: domain names to every DOMAIN argument, URIs to ``-c``."""
    for action in _actions(parser):
        if action.dest in DOMAIN_DESTS and not action.option_strings:
            action.completer = domains  # type: ignore[attr-defined]
        elif action.dest == "uri":
            action.completer = complete_uris  # type: ignore[attr-defined]


def complete(parser: argparse.ArgumentParser) -> None:
    """Answer a completion request (and exit) when the shell made one; otherwise return at once."""
    if not requested():
        return
    import argcomplete

    install_completers(parser)
    argcomplete.autocomplete(parser)


def shellcode(shell: str = "bash", command: str = "hvext") -> str:
    """The shell code that registers completion of *command*."""
    import argcomplete

    return argcomplete.shellcode([command], shell=shell)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    shell = args[0] if args else "bash"
    if len(args) > 1 or shell not in SHELLS:
        print(f"error: usage: python -m hvext.cli.completion [{'|'.join(SHELLS)}]", file=sys.stderr)
        return 1
    sys.stdout.write(shellcode(shell))
    return 0


if __name__ == "__main__":
    sys.exit(main())
