"""hvextd's config file (TOML): one section per concern, each validated into a frozen value.

``[reclaim]`` is :class:`hvext.daemon.reclaim_loop.ReclaimConfig`; ``[power]``
is :class:`PowerConfig`::

    [power]
    budget = 5     # seconds guests may delay their pause in a SIGPWR save (0 to 300)

A bad file or value is a UsageError naming it: hvextd then refuses to start.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvext.errors import UsageError
from hvext.pmem import power


def section(path: Path, name: str, keys: set[str]) -> dict[str, Any]:
    """Section *name* of the TOML file *path* ({} when absent); UsageError for an unreadable file,
    bad TOML or a key not in *keys*."""
    try:
        data = tomllib.loads(path.read_text()).get(name, {})
    except OSError as err:
        raise UsageError(f"cannot read config {path}: {err.strerror}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"config {path} is not valid TOML: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"config {path}: [{name}] must be a section")
    unknown = set(data) - keys
    if unknown:
        raise UsageError(f"config {path}: unknown [{name}] keys {sorted(unknown)}")
    return data


@dataclass(frozen=True)
class PowerConfig:
    """SIGPWR saves: *budget* seconds for the guests' pre-pause work (None: power's default)."""

    budget: float | None = None

    @classmethod
    def load(cls, path: Path) -> PowerConfig:
        data = section(path, "power", {"budget"})
        if "budget" not in data:
            return cls()
        try:
            return cls(power.check_budget(data["budget"]))
        except UsageError as err:
            raise UsageError(f"config {path}: power.budget: {err}") from err
