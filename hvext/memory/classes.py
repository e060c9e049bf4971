"""Guest memory usage classes (C2), host side: fetch from the agent, validate, judge plausibility.

The guest agent's ``memclass`` command (``guest-agent/hvext_agent/memclass.py``
says how each class is measured) partitions the guest's MemTotal into
classes. All of it is untrusted guest input, so :func:`validate`:

* rejects replies that break the schema (AgentProtocolError);
* keeps only known class names with non-negative integer page counts, each
  at most the total, and bounded (values beyond :data:`MAX_PAGES` and
  booleans or floats are dropped and flagged);
* checks the total against what the host knows: MemTotal can never exceed
  the balloon's ``actual`` (the guest's RAM minus the balloon) or, without
  QMP, the domain's boot memory;
* recomputes ``unaccounted = total - sum(classes)`` itself.

The verdict is ``status``: ``ok`` (|unaccounted| within :data:`TOLERANCE` of
the total), ``incomplete`` (the classes cover less than the total by more
than the tolerance: usable, the rest is unknown) or ``implausible`` (anything
impossible: classes adding up to more than the total plus the tolerance, a
total above the host's figure, out-of-range values).

How the reclaim policy treats them (docs/memory.md): classes only steer
*how* memory is taken from a VM (ballooning when it has free, clean cache and
inactive anon to give; host swapping otherwise) and never raise what it is
entitled to, which comes from host-side facts (pools, reservations, balloon
actual). ``unknown`` memory (unaccounted) counts as not reclaimable by the
balloon. An ``implausible`` report is ignored as a whole and the VM gets the
policy of a VM without an agent. A guest that lies therefore can at worst
get the more disruptive method for itself, never memory from another VM.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from hvext.errors import AgentProtocolError, QMPError
from hvext.host import Domain
from hvext.units import MIB

SCHEMA_VERSION = 1
#: Class names in display order, with labels.
CLASSES: dict[str, str] = {
    "free": "free",
    "page_cache_clean": "clean page cache",
    "page_cache_dirty": "dirty page cache",
    "anon_active": "anonymous, active",
    "anon_inactive": "anonymous, inactive",
    "shmem": "shmem / tmpfs",
    "swap_cached": "swap cached",
    "unevictable": "unevictable (mlocked)",
    "slab_reclaimable": "slab, reclaimable",
    "kernel": "kernel, unreclaimable",
    "hugetlb": "hugetlb pages",
}
PMEM_FIELDS: dict[str, str] = {
    "devices": "pmem devices",
    "dax_fs_used": "used on DAX file systems",
    "dax_mapped": "DAX files mapped",
}
KERNEL_PARTS = ("SUnreclaim", "KernelStack", "PageTables", "SecPageTables", "Percpu", "vmalloc")
#: |unaccounted| allowed, as a fraction of MemTotal (the guest's own page counts are exact;
#: the rest is direct page allocations of drivers, per-CPU free lists, pages in flight).
TOLERANCE = 0.03
MAX_PAGES = 1 << 40  # 4 PiB of 4 KiB pages
PAGE_SIZES = (4096, 8192, 16384, 65536)
MAX_KEYS = 64


@dataclass
class MemClasses:
    """A validated report: page counts per class and the verdict on it."""

    domain: str
    page_size: int
    total: int  # pages: the guest's MemTotal
    classes: dict[str, int]
    unaccounted: int  # total - sum(classes), computed here
    pmem: dict[str, int] = field(default_factory=dict)
    ballooned: int | None = None
    status: str = "ok"  # ok | incomplete | implausible
    problems: list[str] = field(default_factory=list)
    host_limit: int | None = None  # bytes the total was checked against
    host_limit_source: str | None = None
    sampled_at: float | None = None
    age_s: float | None = None
    sample_ms: float | None = None
    periodic_interval_s: float | None = None
    anon_split: str | None = None
    kpageflags: str | None = None
    kernel_parts: dict[str, int] = field(default_factory=dict)

    @property
    def plausible(self) -> bool:
        return self.status != "implausible"

    def mib(self, pages: int) -> float:
        return pages * self.page_size / MIB

    def percent(self, pages: int) -> float:
        return 100.0 * pages / self.total if self.total else 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One row per class plus unaccounted: name, label, pages, bytes, percent of total."""
        items = [(name, CLASSES[name], self.classes.get(name, 0)) for name in CLASSES]
        items.append(("unaccounted", "unaccounted", self.unaccounted))
        return [{"name": name, "label": label, "pages": pages, "bytes": pages * self.page_size,
                 "percent": round(self.percent(pages), 2)} for name, label, pages in items]

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain, "page_size": self.page_size, "total_pages": self.total,
            "total_bytes": self.total * self.page_size, "classes": dict(self.classes),
            "unaccounted": self.unaccounted, "unaccounted_percent": round(self.percent(self.unaccounted), 2),
            "tolerance_percent": TOLERANCE * 100, "status": self.status, "plausible": self.plausible,
            "problems": list(self.problems), "pmem": dict(self.pmem), "ballooned": self.ballooned,
            "host_limit_bytes": self.host_limit, "host_limit_source": self.host_limit_source,
            "sampled_at": self.sampled_at, "age_s": self.age_s, "sample_ms": self.sample_ms,
            "periodic_interval_s": self.periodic_interval_s, "anon_split": self.anon_split,
            "kpageflags": self.kpageflags, "kernel_parts": dict(self.kernel_parts), "rows": self.rows(),
        }


def _count(value: Any) -> TypeGuard[int]:
    """A page count: a non-negative int (not a bool) within MAX_PAGES."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PAGES


def _number(value: Any, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if low <= value <= high else None


def _preview(value: Any, limit: int = 40) -> str:
    """A short, safe description of an untrusted value for a message (never repr() of a deep or huge one)."""
    if isinstance(value, str):
        return repr(value[:limit])
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value) if -10**limit < value < 10**limit else f"an integer of about {value.bit_length()} bits"
    return f"a {type(value).__name__}"


def _word(value: Any) -> str | None:
    return value[:32] if isinstance(value, str) and value.isprintable() else None


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def validate(raw: Any, *, domain: str, host_limit: int | None = None,
             host_limit_source: str | None = None) -> MemClasses:
    """Check an agent ``memclass`` result; raise AgentProtocolError if it is not even shaped right.

    *host_limit* (bytes) bounds the total: the balloon's actual, or the boot memory.
    """
    if not isinstance(raw, dict):
        raise AgentProtocolError("memclass reply is not an object")
    if raw.get("version") != SCHEMA_VERSION:
        raise AgentProtocolError(f"memclass reply has schema version {_preview(raw.get('version'))}, "
                                 f"hvext reads {SCHEMA_VERSION}")
    page_size_raw, total_raw, reported = raw.get("page_size"), raw.get("total"), raw.get("classes")
    if page_size_raw not in PAGE_SIZES or isinstance(page_size_raw, bool):
        raise AgentProtocolError(f"memclass reply has an invalid page size {_preview(page_size_raw)}")
    if not _count(total_raw) or total_raw == 0:
        raise AgentProtocolError(f"memclass reply has an invalid total {_preview(total_raw)}")
    if not isinstance(reported, dict) or len(reported) > MAX_KEYS:
        raise AgentProtocolError("memclass reply has no classes object (or an oversized one)")
    page_size, total = int(page_size_raw), int(total_raw)

    problems: list[str] = []
    classes: dict[str, int] = {}
    for name in CLASSES:
        value = reported.get(name)
        if value is None:
            problems.append(f"class {name} missing")
        elif not _count(value):
            problems.append(f"class {name} is not a page count ({_preview(value)})")
        elif value > total:
            problems.append(f"class {name} ({value} pages) exceeds the total ({total} pages)")
        else:
            classes[name] = value
    unknown = sorted(k[:32] if isinstance(k, str) else _preview(k) for k in reported if k not in CLASSES)
    implausible = any("not a page count" in p or "exceeds" in p for p in problems)
    if total * page_size > (host_limit or MAX_PAGES * page_size):
        implausible = True
        problems.append(f"total {total * page_size // MIB} MiB is more than the host's "
                        f"{host_limit_source or 'limit'} of {(host_limit or 0) // MIB} MiB")
    covered = sum(classes.values())
    unaccounted = total - covered
    allowed = TOLERANCE * total
    if -unaccounted > allowed:
        implausible = True
        problems.append(f"classes add up to {100 * covered / total:.1f}% of the total "
                        f"(more than {100 + TOLERANCE * 100:.0f}%)")
    status = "implausible" if implausible else "ok"
    if status == "ok" and (unaccounted > allowed or len(classes) < len(CLASSES)):
        status = "incomplete"
        if unaccounted > allowed:
            problems.append(f"classes cover only {100 * covered / total:.1f}% of the total")
    if unknown:
        problems.append(f"ignored unknown classes: {', '.join(unknown[:8])}")

    pmem_raw = _section(raw, "pmem")
    pmem: dict[str, int] = {k: v for k in PMEM_FIELDS if _count(v := pmem_raw.get(k))}
    details = _section(raw, "details")
    kernel_raw = _section(details, "kernel")
    kpf = _section(details, "kpageflags")
    ballooned = raw.get("ballooned")
    return MemClasses(
        domain=domain, page_size=page_size, total=total, classes=classes, unaccounted=unaccounted,
        pmem=pmem, ballooned=ballooned if _count(ballooned) else None, status=status, problems=problems,
        host_limit=host_limit, host_limit_source=host_limit_source,
        sampled_at=_number(raw.get("sampled_at"), 0, 1e11), age_s=_number(raw.get("age_s"), 0, 1e7),
        sample_ms=_number(raw.get("sample_ms"), 0, 1e7),
        periodic_interval_s=_number(raw.get("periodic_interval_s"), 0, 1e5),
        anon_split=_word(details.get("anon_split")), kpageflags=_word(kpf.get("mode")),
        kernel_parts={k: v for k in KERNEL_PARTS if _count(v := kernel_raw.get(k))},
    )


async def host_limit(domain: Domain) -> tuple[int, str]:
    """What the guest's MemTotal cannot exceed: the balloon's actual, else the boot memory.

    (Linux takes inflated pages out of MemTotal, except with deflate-on-OOM,
    where only the boot memory bounds it.)
    """
    from hvext.memory import balloon
    if await asyncio.to_thread(balloon.autodeflate, domain):
        return await asyncio.to_thread(balloon.boot_memory, domain), "boot memory"
    try:
        async with domain.qmp() as qmp:
            return balloon.actual_bytes(await qmp.execute("query-balloon")), "balloon actual"
    except QMPError:
        return await asyncio.to_thread(balloon.boot_memory, domain), "boot memory"


async def fetch(domain: Domain, *, interval: float | None = None, cached: bool = False,
                max_age: float | None = None, timeout: float = 30.0) -> MemClasses:
    """Ask the agent for the classes and validate them.

    *interval* starts (or retimes) the agent's periodic sampler; *cached* takes
    its last sample when not older than *max_age* seconds.
    """
    limit, source = await host_limit(domain)
    async with domain.agent(timeout=timeout) as agent:
        raw = await agent.memclass(interval=interval, cached=cached, max_age=max_age)
    limit = max(limit, (await host_limit(domain))[0])  # the balloon may have deflated meanwhile
    return validate(raw, domain=domain.name, host_limit=limit, host_limit_source=source)
