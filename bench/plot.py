"""The benchmarks' plots: each benchmark passes its data, this draws it into one PNG next to its table.

Headless (matplotlib's Agg backend), one folder for all of them (``--plot-dir``,
else ``$HVEXT_PLOT_DIR``, else ``bench/out``), a title naming the host, the
date and the load. A case that failed is not drawn; it is a note under the
panel it belongs to. Drawing never stops a benchmark: if it fails (no
matplotlib, a full disk) a line on stderr says so and the table stands.
This module is not a benchmark (the Makefile's ``bench`` target skips it).
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # matplotlib is imported only when drawing: a benchmark without it still prints its table
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "bench" / "out"
DPI = 80
COLOURS = 64  # a palette PNG of line charts on white: a third of the size, no visible change
MARKER_POINTS = 20  # series with at most this many points show each point


@dataclass
class Mark:
    """A point worth a label, e.g. the downtime at the end of a migration."""

    x: float
    y: float
    text: str


@dataclass
class Panel:
    """One chart: *series* maps a label to its (x, y) points; *notes* say which cases are missing and why."""

    title: str
    xlabel: str
    ylabel: str
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    marks: dict[str, list[Mark]] = field(default_factory=dict)  # per series label, drawn in its colour
    notes: list[str] = field(default_factory=list)
    logx: bool = False
    logy: bool = False
    vlines: list[tuple[float, str]] = field(default_factory=list)  # (x, label), e.g. the start of a reclaim


def add_option(parser: argparse.ArgumentParser) -> None:
    """``--plot-dir DIR`` (default ``$HVEXT_PLOT_DIR`` or bench/out)."""
    parser.add_argument("--plot-dir", type=Path, default=Path(os.environ.get("HVEXT_PLOT_DIR") or DEFAULT_DIR),
                        help="write the plot (PNG) here (default $HVEXT_PLOT_DIR or bench/out)")


def _subtitle() -> str:
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "n/a"
    return f"{socket.gethostname()}, {time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, load {load}"


def _figure(title: str, rows: int, cols: int, width: float, height: float) -> Figure:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), dpi=DPI, layout="constrained")
    fig.suptitle(f"{title}\n{_subtitle()}", fontsize=10)
    return fig


def _save(fig: Figure, directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    tmp = directory / f".{name}.png.tmp"
    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(COLOURS).save(tmp, format="PNG", optimize=True)
    os.replace(tmp, path)
    return path


def _notes(ax: Axes, notes: list[str], width: int) -> None:
    """The missing cases and why, in red at the bottom of the panel."""
    if notes:
        text = "\n".join(textwrap.fill(textwrap.shorten(n, 2 * width, placeholder=" ..."), width) for n in notes)
        ax.text(0.01, 0.01, text, transform=ax.transAxes, fontsize=7, color="firebrick", va="bottom", ha="left")


def _draw(ax: Axes, panel: Panel, colours: dict[str, str], width: int) -> None:
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(panel.xlabel, fontsize=8)
    ax.set_ylabel(panel.ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    series = {label: [(x, y) for x, y in points if x is not None and y is not None and (y > 0 or not panel.logy)]
              for label, points in panel.series.items()}
    series = {label: points for label, points in series.items() if points}
    xs_all = [x for points in series.values() for x, _ in points]
    ys_all = [y for points in series.values() for _, y in points]
    middle = (min(xs_all) + max(xs_all)) / 2 if xs_all else 0.0
    high = (min(ys_all) + max(ys_all)) / 2 if ys_all else 0.0
    k = 0
    for label, points in series.items():
        xs, ys = zip(*points)
        colour = colours[label]
        ax.plot(xs, ys, marker="o" if len(points) <= MARKER_POINTS else None, markersize=4, linewidth=1.3,
                label=label, color=colour)
        for mark in panel.marks.get(label, []):
            # each label a line further from its mark than the previous one, towards the inside of the panel,
            # so that marks at the same place stay readable
            right, up = mark.x > middle, mark.y <= high
            ax.plot([mark.x], [mark.y], marker="v", markersize=8, color=colour)
            ax.annotate(mark.text, (mark.x, mark.y), textcoords="offset points",
                        xytext=(-4 if right else 4, (8 + 10 * k) * (1 if up else -1)), fontsize=7, color=colour,
                        ha="right" if right else "left", va="bottom" if up else "top")
            k += 1
    drawn = bool(series)
    for x, label in panel.vlines:
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), xytext=(3, -10),
                    textcoords="offset points", fontsize=7, color="grey")
    if drawn:
        if panel.logx:  # few x values (ranges, snapshots): ticks at them, as plain numbers
            from matplotlib.ticker import NullFormatter, ScalarFormatter
            ax.set_xscale("log")
            ax.set_xticks(sorted({x for points in panel.series.values() for x, y in points if x}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        if panel.logy:
            ax.set_yscale("log")
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    _notes(ax, panel.notes, width)


def _write(directory: Path, name: str, draw: Callable[[], Figure]) -> Path | None:
    """Run *draw* (which returns a figure) and save it; on any failure say so on stderr and return None."""
    try:
        path = _save(draw(), directory, name)
    except Exception as err:  # noqa: BLE001  a plot is an extra: the table is the result
        print(f"plot {name}: not written: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    print(f"plot: {path}")
    return path


def lines(directory: Path, name: str, title: str, panels: list[Panel], *, cols: int = 2,
          size: tuple[float, float] = (5.0, 3.4)) -> Path | None:
    """Line charts, one panel each, *cols* to a row, into ``directory/name.png``."""
    def draw() -> Figure:
        n = max(1, len(panels))
        ncols = min(cols, n)
        nrows = -(-n // ncols)
        fig = _figure(title, nrows, ncols, *size)
        axes = fig.subplots(nrows, ncols, squeeze=False).flat
        labels = dict.fromkeys(label for panel in panels for label in panel.series)
        colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per label in every panel
        for ax, panel in zip(axes, panels):
            _draw(ax, panel, colours, int(size[0] * 15))
        for ax in list(axes):  # the unused cells of the last row
            ax.set_axis_off()
        return fig
    return _write(directory, name, draw)


def stacked_bars(directory: Path, name: str, title: str, bars: dict[str, dict[str, float]], segments: list[str],
                 *, xlabel: str, notes: list[str] | None = None) -> Path | None:
    """Horizontal bars, one per key of *bars*, each the sum of its *segments* in order, labelled with the total."""
    def draw() -> Figure:
        fig = _figure(title, 1, 1, 9.0, 1.6 + 0.6 * max(1, len(bars)))
        ax = fig.subplots()
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="x", alpha=0.3)
        labels = list(bars)
        colours = [f"C{i}" for i in range(len(segments))]
        for row, label in enumerate(labels):
            left = 0.0
            for segment, colour in zip(segments, colours):
                value = bars[label].get(segment)
                if value is None or value <= 0:
                    continue
                ax.barh(row, value, left=left, color=colour, label=segment if row == 0 else None, height=0.6)
                if value > 0.04 * sum(v for v in bars[label].values() if v and v > 0):
                    ax.text(left + value / 2, row, f"{value:.1f}", ha="center", va="center", fontsize=7)
                left += value
            ax.text(left, row, f" {left:.1f}", va="center", fontsize=8)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        if labels:
            ax.legend(fontsize=7, ncols=min(len(segments), 7), loc="upper center", bbox_to_anchor=(0.5, -0.25))
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        _notes(ax, notes or [], 120)
        return fig
    return _write(directory, name, draw)
