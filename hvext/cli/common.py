"""Pieces every command module shares: host access, output, argument helpers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value
