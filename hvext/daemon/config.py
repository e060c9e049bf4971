"""hvextd's config file (TOML): one section per concern, each validated into a frozen value.

``[reclaim]`` is :class:`hvext.daemon.reclaim_loop.ReclaimConfig`; ``[power]``
is :class:`PowerConfig`; ``[metrics]`` is :class:`MetricsConfig`::

    [power]
    budget = 5     # seconds guests may delay their pause in a SIGPWR save (0 to 300)

    [metrics]      # Prometheus endpoint (docs/metrics.md); absent: none is served
    enabled = true
    address = "127.0.0.1"   # an IP address; a non-loopback one needs allow_remote
    port = 9177             # 0: any free port (logged)
    allow_remote = false
    domains = ["web1"]      # optional: export only these domains (default: every running one)

A bad file or value is a UsageError naming it: hvextd then refuses to start.
"""

from __future__ import annotations

import ipaddress
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


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: served on *address*:*port* when *enabled* (hvext.daemon.metrics).

    Loopback only unless *allow_remote*: the metrics name every guest and its
    memory, and the endpoint has no authentication.
    """

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9177
    allow_remote: bool = False
    domains: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> MetricsConfig:
        """The ``[metrics]`` section; without one, no endpoint (enabled defaults to true inside it)."""
        data = section(path, "metrics", {"enabled", "address", "port", "allow_remote", "domains"})
        if not data:
            return cls()
        domains = data.get("domains", [])
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise UsageError(f'config {path}: metrics.domains must be a list of domain names, e.g. ["web1"]')
        try:
            return cls(**{"enabled": True, **data, "domains": tuple(domains)}).validate()
        except UsageError as err:
            raise UsageError(f"config {path}: {err}") from err

    def validate(self) -> MetricsConfig:
        """This config, or UsageError naming the first bad value."""
        for key in ("enabled", "allow_remote"):
            if not isinstance(getattr(self, key), bool):
                raise UsageError(f"metrics.{key} must be true or false")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise UsageError("metrics.port must be an integer from 0 (any free port) to 65535")
        try:
            ip = ipaddress.ip_address(self.address) if isinstance(self.address, str) else None
        except ValueError:
            ip = None
        if ip is None:
            raise UsageError(f"metrics.address must be an IP address such as \"127.0.0.1\" or \"::1\", "
                             f"not {str(self.address)[:64]!r}")
        if not ip.is_loopback and not self.allow_remote:
            raise UsageError(f"metrics.address {self.address} is reachable from other hosts and the endpoint has "
                             "no authentication; set metrics.allow_remote = true to serve it there anyway")
        return self
