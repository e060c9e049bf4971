"""Pieces every command module shares: host access, output, argument helpers."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

from hvext.errors import UsageError
from hvext.host import Domain, Host

console = Console(highlight=False)


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


def print_table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if cell is None else str(cell) for cell in row))
    console.print(table)


def print_fields(fields: dict[str, Any]) -> None:
    """``key: value`` lines, like virsh dominfo."""
    width = max((len(k) for k in fields), default=0) + 1
    for key, value in fields.items():
        console.print(f"{key + ':':<{width}} {'-' if value is None else value}")


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
