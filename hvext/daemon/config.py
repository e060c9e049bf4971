"""hvextd's configuration file (TOML; ``hvextd --config FILE``, /etc/hvext/hvextd.toml from the role).

This docstring is the reference for every section and key. A section that is
absent means its feature's default (said per section); a file with no
sections is valid. ``hvextd --check-config --config FILE`` checks a file
without starting anything (the Ansible role runs it before installing one).

``[reclaim]`` -- keep the host's available memory above a floor
(:class:`hvext.daemon.reclaim_loop.ReclaimConfig`). Absent: no reclaim loop.
Present (even empty): the loop runs with these keys' defaults::

    [reclaim]
    interval_s = 10                # seconds between checks, 1 to 86400
    host_available_min_mib = 2048  # floor for the host's MemAvailable, an integer >= 0
    step_mib = 256                 # at most this much per VM per round, an integer >= 16
    method = "auto"                # "auto", "balloon" or "swap" (as `hvext reclaim --method`)
    domains = ["web1", "db1"]      # only these domains (default: every running hvext VM)
    nvm_ram = false                # true: also grow/shrink VMs' NVM RAM (`hvext nvm-ram`, docs/memory.md)
    nvm_dir = "/dev/shm/hvext-nvm" # the NVM tier (needed with nvm_ram): only NVM RAM backed there is moved
    nvm_free_min_mib = 1024        # tier free below this: VMs give NVM RAM back (largest first)
    nvm_free_high_mib = 2048       # >= nvm_free_min_mib: give back up to this; grow only while it stays free
    nvm_step_mib = 256             # at most this much NVM RAM per VM per round, an integer >= 16

``[power]`` -- SIGPWR saves of protected PMEM (:class:`PowerConfig`,
docs/power.md). Absent: the default budget (5 s)::

    [power]
    budget = 5     # seconds guests may delay their pause in a SIGPWR save, 0 to 300

``[metrics]`` -- the Prometheus endpoint (:class:`MetricsConfig`,
hvext.daemon.metrics, docs/metrics.md). Absent (or empty): none is served.
A reload with other settings serves anew (one it cannot bind is refused)::

    [metrics]
    enabled = true          # false: keep the section but serve nothing
    address = "127.0.0.1"   # an IP address; a non-loopback one needs allow_remote
    port = 9177             # 0 to 65535; 0: any free port (logged)
    allow_remote = false    # true: serve on a non-loopback address (no authentication!)
    domains = ["web1"]      # export only these domains (default: every running one)

``[ha]`` -- cluster membership for high availability (:class:`HAConfig`,
docs/ha.md). Absent: no cluster. Present: hvextd holds this host's lease in
the cluster's etcd and fences its VMs when it cannot renew it::

    [ha]
    cluster = "lab"                               # the cluster's name (informational)
    etcd_endpoints = ["https://192.0.2.1:2379"]   # https:// URLs of members (TLS, client certificates)
    host = "node1"                                # this host's name in the cluster (default: short hostname)
    lease_ttl = 5                                 # seconds, 2 to 300: the host's lease lives this long unrenewed
    fence_margin = 1.0                            # seconds, 0 <= margin < lease_ttl: fence at least this long
                                                  # before (longer when the fence's path is measured slow)
    credentials = "/var/lib/hvext/ha/pki"         # dir with ca.pem, membercert.pem, memberkey.pem
    epoch_interval = 1.0                          # C16: seconds between epoch cuts of replicated PMEM
    peer_port = 2390                              # C16: TLS port other hosts send epochs to
    peer_address = ""                             # C16: this host's address for peers (default: the
                                                  # host of the first etcd endpoint)

``[placement]`` -- hot PMEM ranges in host DRAM (:class:`hvext.daemon.placement_loop.PlacementConfig`,
docs/memory.md). Absent, or ``enabled = false`` (the default): no placement loop::

    [placement]
    enabled = true          # default false: the section alone does not start it
    interval_s = 30         # seconds between rounds, 1 to 86400
    budget_mib = 1024       # host DRAM for all VMs' hot PMEM ranges, split max-min fairly, 0 to 2**30
    cold = "cold"           # how cold ranges go back to their tier: "cold" (MADV_COLD) or "pageout"
    linger_rounds = 2       # rounds a range stays kept after it stops being hot, 0 to 1000
    domains = ["db1"]       # only these domains (default: every running hvext VM with pmem)

On SIGHUP, ``lease_ttl``, ``fence_margin`` and ``cluster`` take effect at once
(a new TTL: the host's keys move to a new lease at the next renewal);
``host``, ``etcd_endpoints`` and ``credentials``, and adding or removing the
section, need an hvextd restart (the log says which; the running values stay).

Errors name the file, the section, the key and what is allowed: an unknown
section or key, a value of the wrong type or out of range, or a key outside
any section is a :class:`UsageError`. At start hvextd then refuses to start
(exit 1); on SIGHUP it logs the error and keeps the configuration in force.

Adding a section is one entry in :data:`SECTIONS` (a frozen class with
``KEYS`` and ``from_table``) plus its paragraph here.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit
from typing import Any, ClassVar, Protocol, TypeVar

from hvext import paths
from hvext.daemon.placement_loop import PlacementConfig
from hvext.daemon.reclaim_loop import ReclaimConfig
from hvext.errors import UsageError
from hvext.pmem import power

T = TypeVar("T")


class SectionValue(Protocol):
    """What a section's class provides: its allowed keys and a checked constructor.

    ``from_table`` gets the section's table with known keys only and raises
    UsageError("KEY: what is allowed, not VALUE") for a bad value.
    """

    KEYS: ClassVar[tuple[str, ...]]

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class PowerConfig:
    """SIGPWR saves: *budget* seconds for the guests' pre-pause work (None: power's default)."""

    KEYS: ClassVar[tuple[str, ...]] = ("budget",)
    budget: float | None = None

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> PowerConfig:
        if "budget" not in table:
            return cls()
        try:
            return cls(power.check_budget(table["budget"]))
        except UsageError as err:
            raise UsageError(f"budget: {err}") from err


ENDPOINT = re.compile(r"https://[^\s/]+(/\S*)?")
#: Where `hvext cluster init/join` puts this host's member credentials (hvext.ha.etcd.Layout.pki_dir).
HA_CREDENTIALS = paths.STATE_DIR / "ha" / "pki"


@dataclass(frozen=True)
class HAConfig:
    """Cluster membership: where the cluster's etcd is, who this host is, its lease (hvext.ha)."""

    KEYS: ClassVar[tuple[str, ...]] = ("cluster", "etcd_endpoints", "host", "lease_ttl", "fence_margin",
                                       "credentials", "epoch_interval", "peer_port", "peer_address")
    cluster: str = ""
    etcd_endpoints: tuple[str, ...] = field(default=())
    host: str = ""
    lease_ttl: int = 5
    fence_margin: float = 1.0
    credentials: Path = HA_CREDENTIALS
    #: C16 replication: seconds between epoch cuts; the port and address hvextd serves peers on
    #: ("" address: the host part of the first etcd endpoint, this host's own member in the lab).
    epoch_interval: float = 1.0
    peer_port: int = 2390
    peer_address: str = ""

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> HAConfig:
        cluster = table.get("cluster", "")
        if not isinstance(cluster, str) or len(cluster) > 253 or not cluster.isprintable():
            raise UsageError(f"cluster: must be a name (a string of at most 253 printable characters), "
                             f"not {cluster!r:.80}")
        endpoints = table.get("etcd_endpoints", [])
        if not isinstance(endpoints, list) or \
                not all(isinstance(e, str) and ENDPOINT.fullmatch(e) for e in endpoints):
            raise UsageError('etcd_endpoints: must be a list of https:// URLs (the cluster uses TLS with client '
                             f'certificates), e.g. ["https://192.0.2.1:2379"], not {endpoints!r:.80}')
        host = table.get("host", "")
        if not isinstance(host, str) or len(host) > 253 or not host.isprintable() or "/" in host:
            raise UsageError(f"host: must be a host name (printable, no '/', at most 253), not {host!r:.80}")
        ttl = table.get("lease_ttl", 5)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 2 <= ttl <= 300:
            raise UsageError(f"lease_ttl: must be a whole number of seconds from 2 to 300, not {ttl!r:.40}")
        margin = table.get("fence_margin", 1.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not 0 <= margin < ttl:
            raise UsageError(f"fence_margin: must be seconds from 0 to less than lease_ttl ({ttl}), "
                             f"not {margin!r:.40}")
        credentials = table.get("credentials", str(HA_CREDENTIALS))
        if not isinstance(credentials, str) or not credentials.startswith("/"):
            raise UsageError(f"credentials: must be an absolute directory path, not {credentials!r:.80}")
        interval = table.get("epoch_interval", 1.0)
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not 0.05 <= interval <= 3600:
            raise UsageError(f"epoch_interval: must be seconds from 0.05 to 3600, not {interval!r:.40}")
        port = table.get("peer_port", 2390)
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise UsageError(f"peer_port: must be a TCP port (1 to 65535), not {port!r:.40}")
        address = table.get("peer_address", "")
        if not isinstance(address, str) or len(address) > 253 or any(c.isspace() or c in "/[]" for c in address):
            raise UsageError(f"peer_address: must be this host's address for peers (IP or name), not {address!r:.80}")
        return cls(cluster, tuple(endpoints), host, ttl, float(margin), Path(credentials), float(interval), port,
                   address)

    def peer_host(self) -> str:
        """The address other hosts reach this hvextd's peer listener on."""
        if self.peer_address:
            return self.peer_address
        return urlsplit(self.etcd_endpoints[0]).hostname or "127.0.0.1" if self.etcd_endpoints else "127.0.0.1"


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: served on *address*:*port* when *enabled* (hvext.daemon.metrics).

    Loopback only unless *allow_remote*: the metrics name every guest and its
    memory, and the endpoint has no authentication.
    """

    KEYS: ClassVar[tuple[str, ...]] = ("enabled", "address", "port", "allow_remote", "domains")
    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9177
    allow_remote: bool = False
    domains: tuple[str, ...] = ()

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> MetricsConfig:
        """The ``[metrics]`` section: enabled defaults to true inside it, but an empty one is as absent."""
        if not table:
            return cls()
        domains = table.get("domains", [])
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise UsageError(f'domains: must be a list of domain names, e.g. ["web1"], not {domains!r:.80}')
        return cls(**{"enabled": True, **table, "domains": tuple(domains)}).validate()

    def validate(self) -> MetricsConfig:
        """This config, or UsageError naming the first bad value."""
        for key in ("enabled", "allow_remote"):
            if not isinstance(getattr(self, key), bool):
                raise UsageError(f"{key}: must be true or false, not {getattr(self, key)!r:.80}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise UsageError(f"port: must be an integer from 0 (any free port) to 65535, not {self.port!r:.80}")
        try:
            ip = ipaddress.ip_address(self.address) if isinstance(self.address, str) else None
        except ValueError:
            ip = None
        if ip is None:
            raise UsageError(f"address: must be an IP address such as \"127.0.0.1\" or \"::1\", "
                             f"not {str(self.address)[:64]!r}")
        if not ip.is_loopback and not self.allow_remote:
            raise UsageError(f"address: {self.address} is reachable from other hosts and the endpoint has "
                             "no authentication; set allow_remote = true to serve it there anyway")
        return self


@dataclass(frozen=True)
class Section:
    """One entry of :data:`SECTIONS`: the section's class, and its value when the file has no such section."""

    cls: type[SectionValue]
    absent: object


#: Every section hvextd accepts: name -> (class, value when absent). Nothing else is allowed.
SECTIONS: Mapping[str, Section] = MappingProxyType({
    "reclaim": Section(ReclaimConfig, absent=None),     # no [reclaim]: no reclaim loop
    "power": Section(PowerConfig, absent=PowerConfig()),
    "metrics": Section(MetricsConfig, absent=MetricsConfig()),  # no [metrics]: no endpoint
    "ha": Section(HAConfig, absent=None),
    "placement": Section(PlacementConfig, absent=PlacementConfig()),  # enabled = false: no placement loop
})


@dataclass(frozen=True)
class Config:
    """A checked configuration: one value per section of :data:`SECTIONS` (its ``absent`` value when absent)."""

    path: Path | None
    values: Mapping[str, object]

    def get(self, cls: type[T]) -> T | None:
        """The value of the section whose class is *cls* (None when that section is off)."""
        for name, spec in SECTIONS.items():
            if spec.cls is cls:
                value = self.values[name]
                assert value is None or isinstance(value, cls)
                return value
        raise KeyError(f"no config section has class {cls.__name__}")

    def summary(self) -> str:
        """One line for the log: each section's value (``off`` when absent and off)."""
        return "; ".join(f"[{name}] {'off' if value is None else value}" for name, value in self.values.items())


def defaults() -> Config:
    """The configuration of an hvextd started without ``--config``: every section absent."""
    return Config(None, MappingProxyType({name: spec.absent for name, spec in SECTIONS.items()}))


def _names(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


def load(path: Path) -> Config:
    """The checked configuration in *path*; UsageError naming file, section, key and what is allowed."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise UsageError(f"cannot read config {path}: {err.strerror}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"config {path} is not valid TOML: {err}") from err
    known = _names(f"[{n}]" for n in SECTIONS)
    values = {}
    for name, table in data.items():
        if name not in SECTIONS:
            what = "unknown section" if isinstance(table, dict) else "key outside any section"
            raise UsageError(f"config {path}: {what} {f'[{name}]' if isinstance(table, dict) else repr(name)}; "
                             f"the sections are {known} (hvext/daemon/config.py documents them)")
        if not isinstance(table, dict):
            raise UsageError(f"config {path}: [{name}] must be a section (a table), not {type(table).__name__} "
                             f"{name} = ...")
    for name, spec in SECTIONS.items():
        if name not in data:
            values[name] = spec.absent
            continue
        table = data[name]
        unknown = sorted(set(table) - set(spec.cls.KEYS))
        if unknown:
            raise UsageError(f"config {path}: [{name}] unknown key{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(unknown)}; allowed: {_names(spec.cls.KEYS)}")
        try:
            values[name] = spec.cls.from_table(table)
        except UsageError as err:
            raise UsageError(f"config {path}: [{name}] {err}") from err
    return Config(path, MappingProxyType(values))
