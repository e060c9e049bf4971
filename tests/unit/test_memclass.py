"""Host-side checks of the guest's memory classes: untrusted input, judged rather than trusted."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from hvext.errors import AgentProtocolError
from hvext.memory import classes
from hvext.units import MIB

TOTAL = 100_000  # pages


def report(**changes: Any) -> dict[str, Any]:
    """A well-formed agent reply (classes adding up to 99% of the total)."""
    raw: dict[str, Any] = {
        "version": 1, "page_size": 4096, "total": TOTAL,
        "classes": {"free": 60_000, "page_cache_clean": 10_000, "page_cache_dirty": 1_000,
                    "anon_active": 5_000, "anon_inactive": 8_000, "shmem": 500, "swap_cached": 0,
                    "unevictable": 0, "slab_reclaimable": 4_000, "kernel": 10_500, "hugetlb": 0},
        "unaccounted": 1_000,
        "pmem": {"devices": 65536, "dax_fs_used": 100, "dax_mapped": 4},
        "details": {"kernel": {"SUnreclaim": 5000, "vmalloc": 2500, "KernelStack": "lots"},
                    "anon_split": "kpageflags", "kpageflags": {"mode": "full"}},
        "ballooned": 0, "sampled_at": 1.7e9, "age_s": 0.5, "sample_ms": 170.0, "periodic_interval_s": None,
    }
    raw.update(changes)
    return raw


def check(raw: Any, limit: int | None = 512 * MIB) -> classes.MemClasses:
    return classes.validate(raw, domain="vm", host_limit=limit, host_limit_source="balloon actual")


def with_class(name: str, value: Any) -> dict[str, Any]:
    raw = report()
    raw["classes"] = dict(raw["classes"], **{name: value})
    return raw


def test_a_sound_report_is_ok() -> None:
    result = check(report())
    assert result.status == "ok" and result.plausible and result.problems == []
    assert result.unaccounted == 1_000 and result.total == TOTAL
    assert result.pmem == {"devices": 65536, "dax_fs_used": 100, "dax_mapped": 4}
    assert result.kernel_parts == {"SUnreclaim": 5000, "vmalloc": 2500}  # the string is dropped
    rows = {r["name"]: r for r in result.rows()}
    assert rows["free"]["percent"] == 60.0 and rows["free"]["bytes"] == 60_000 * 4096
    assert rows["unaccounted"]["pages"] == 1_000
    data = result.to_dict()
    assert data["status"] == "ok" and data["unaccounted_percent"] == 1.0 and data["tolerance_percent"] == 3.0


def test_the_remainder_is_recomputed_not_taken_from_the_guest() -> None:
    assert check(report(unaccounted=0)).unaccounted == 1_000


@pytest.mark.parametrize("value,problem", [
    (-5, "not a page count"), (True, "not a page count"), (1.5, "not a page count"),
    ("60000", "not a page count"), (2**62, "not a page count"), (TOTAL + 1, "exceeds the total"),
])
def test_bad_class_values_make_the_report_implausible(value: Any, problem: str) -> None:
    result = check(with_class("free", value))
    assert result.status == "implausible" and not result.plausible
    assert any(problem in p for p in result.problems)
    assert "free" not in result.classes  # the bad value is not used


def test_classes_adding_up_to_more_than_the_total_are_implausible() -> None:
    result = check(with_class("free", 64_500))  # 103.5% of the total
    assert result.status == "implausible" and "103.5% of the total" in result.problems[0]
    assert check(with_class("free", 62_500)).status == "ok"  # 101.5%: within the tolerance


def test_a_total_above_the_hosts_figure_is_implausible() -> None:
    result = check(report(), limit=300 * MIB)  # 100000 pages = 390 MiB > 300 MiB actual
    assert result.status == "implausible"
    assert "more than the host's balloon actual of 300 MiB" in result.problems[0]


def test_missing_classes_or_a_large_remainder_are_incomplete_not_trusted_fully() -> None:
    raw = report()
    del raw["classes"]["kernel"]
    result = check(raw)
    assert result.status == "incomplete" and "class kernel missing" in result.problems
    assert "classes cover only 88.5% of the total" in result.problems
    assert result.plausible  # usable: the rest counts as unknown


def test_unknown_classes_are_ignored_and_noted() -> None:
    raw = report()
    raw["classes"]["gift"] = 10
    result = check(raw)
    assert result.status == "ok" and "gift" not in result.classes
    assert "ignored unknown classes: gift" in result.problems


@pytest.mark.parametrize("mutate,message", [
    (lambda r: "not a dict", "not an object"),
    (lambda r: r | {"version": 2}, "schema version 2"),
    (lambda r: r | {"page_size": 1000}, "invalid page size"),
    (lambda r: r | {"page_size": True}, "invalid page size"),
    (lambda r: r | {"total": 0}, "invalid total"),
    (lambda r: r | {"total": -1}, "invalid total"),
    (lambda r: r | {"total": "big"}, "invalid total"),
    (lambda r: r | {"classes": [1, 2]}, "no classes object"),
    (lambda r: r | {"classes": {f"k{i}": 0 for i in range(100)}}, "oversized"),
])
def test_replies_of_the_wrong_shape_are_protocol_errors(mutate: Any, message: str) -> None:
    with pytest.raises(AgentProtocolError, match=message):
        check(mutate(copy.deepcopy(report())))


def test_odd_side_fields_are_dropped_not_fatal() -> None:
    result = check(report(pmem={"devices": -1, "dax_mapped": "x"}, ballooned=-3, sampled_at=float("nan"),
                          age_s=1e99, details={"anon_split": "\x1b[31mred", "kpageflags": "?"}))
    assert result.status == "ok"
    assert result.pmem == {} and result.ballooned is None and result.sampled_at is None and result.age_s is None
    assert result.anon_split is None and result.kpageflags is None
