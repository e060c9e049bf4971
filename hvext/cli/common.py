"""Pieces every command module shares: host access, output, argument helpers."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hvext.errors import UsageError
from hvext.host import Domain, Host

console = Console(highlight=False, emoji=False)  # no ":name:" emoji codes taken from data either

#: What a terminal could act on or that hides text: C0 and C1 controls, DEL, bidirectional and
#: zero-width formatting, line/paragraph separators, lone surrogates (they cannot even be encoded).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
                          "\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff]")


def _show(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def literal(value: object, *, markup: bool = True, keep: str = "") -> str:
    """*value* as text that prints as itself: the one way untrusted text (guest, QEMU) reaches the terminal.

    Control and formatting characters become visible escapes (ESC as ``\\x1b``),
    except those in *keep* (e.g. ``"\\n\\t"`` for program output); with *markup*
    (text for the rich console) rich markup is escaped too, so ``[red]`` prints as is.
    """
    text = value if isinstance(value, str) else str(value)
    text = _UNPRINTABLE.sub(lambda m: m.group() if m.group() in keep else _show(m), text)
    return escape(text) if markup else text


class CLIUsageError(UsageError):
    """A command line argparse could not parse."""


@contextmanager
def open_host(args: argparse.Namespace) -> Iterator[Host]:
    host = Host(args.uri)
    try:
        yield host
    finally:
        host.close()


@contextmanager
def open_domain(args: argparse.Namespace) -> Iterator[Domain]:
    with open_host(args) as host:
        yield host.lookup(args.domain)


def add_domain(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def print_result(as_json: bool, data: Any, text: Callable[[], object]) -> None:
    """A command's result: *data* as JSON (``--json``), else the text form *text* makes.

    *text* runs only for the text form, so it may rely on being needed; what it
    returns (markup text, a rich renderable) is printed on the console, or it
    prints by itself and returns None.
    """
    if as_json:
        print_json(data)
        return
    shown = text()
    if shown is not None:
        console.print(shown)


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> Table:
    """A table of *rows*; every cell goes through :func:`literal` (cells may hold guest or peer text)."""
    made = Table(title=literal(title) if title else None, title_justify="left")
    for column in columns:
        made.add_column(column)
    for row in rows:
        made.add_row(*("" if cell is None else literal(cell) for cell in row))
    return made


def print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    console.print(table(title, columns, rows))


def print_fields(fields: dict[str, Any]) -> None:
    """``key: value`` lines, like virsh dominfo."""
    width = max((len(k) for k in fields), default=0) + 1
    for key, value in fields.items():
        console.print(f"{key + ':':<{width}} {'-' if value is None else literal(value)}")


#: The longest wait or interval a command accepts (a week): beyond it is a typo, not a plan.
MAX_SECONDS = 7 * 24 * 3600.0


def seconds(text: str) -> float:
    """argparse type of every SECONDS option: a finite positive number up to :data:`MAX_SECONDS`.

    ``nan`` and ``inf`` parse as floats but would wait forever (or never).
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number of seconds: {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text!r} seconds is more than the maximum of {MAX_SECONDS:.0f} (a week)")
    return value


def count(low: int, high: int) -> Callable[[str], int]:
    """argparse type of every count option (N): a whole number from *low* to *high*."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text[:40]!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} out of range: use {low} to {high}")
        return value
    parse.__name__ = "count"  # argparse names the type in its messages
    return parse
