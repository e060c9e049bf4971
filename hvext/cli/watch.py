"""``--watch [SECONDS] [--count N]``: sample every interval and show each sample, until Ctrl-C or N samples.

Shared by the commands that follow something over time (``memclass``,
``dirtylog``): on a terminal the latest sample replaces the previous one in a
rich live display; with ``--json`` each sample is one JSON object on its own
line (for ``jq`` and scripts); otherwise each sample is printed in turn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import RenderableType
from rich.live import Live

from hvext.cli import common
from hvext.errors import UsageError

T = TypeVar("T")
MAX_COUNT = 10**9


def add_arguments(parser: argparse.ArgumentParser, *, default: float | None, source: str) -> None:
    """``--watch [SECONDS]`` (*default* when given without a value) and ``--count N``."""
    every = f"every SECONDS (default {default:g})" if default is not None else "every SECONDS"
    parser.add_argument("--watch", type=common.seconds, nargs="?", const=default, default=None,
                        metavar="SECONDS", help=f"refresh {every} {source} until Ctrl-C")
    parser.add_argument("--count", type=common.count(1, MAX_COUNT), metavar="N",
                        help="with --watch: stop after N samples")


def check(args: argparse.Namespace) -> None:
    """Refuse ``--count`` without ``--watch`` (its range is checked by its argparse type)."""
    if args.count is not None and args.watch is None:
        raise UsageError("--count needs --watch")


@contextmanager
def _live(show: bool) -> Iterator[Live | None]:
    if not show:
        yield None
        return
    with Live(console=common.console, auto_refresh=False, transient=False) as live:
        yield live


def run(sample: Callable[[], T], *, interval: float, count: int | None, as_json: bool,
        to_dict: Callable[[T], dict[str, Any]], render: Callable[[T], RenderableType],
        first_after_interval: bool = False) -> int:
    """Call *sample* every *interval* seconds and show the result; return 0 after *count* samples.

    *first_after_interval*: the first sample too comes one interval after the
    start (for samples that cover the interval before them, like dirty pages).
    Samples keep to a fixed schedule; one that took longer than the interval
    is followed at once by the next, without catching up on those missed.
    """
    live = common.console.is_terminal and not as_json
    samples = 0
    due = time.monotonic() + (interval if first_after_interval else 0.0)
    with _live(live) as screen:
        while count is None or samples < count:
            time.sleep(max(0.0, due - time.monotonic()))
            value = sample()
            samples += 1
            if as_json:
                sys.stdout.write(json.dumps(to_dict(value), sort_keys=True, default=str) + "\n")
                sys.stdout.flush()
            elif screen is not None:
                screen.update(render(value), refresh=True)
            else:
                common.console.print(render(value))
            due = max(due + interval, time.monotonic())
    return 0
