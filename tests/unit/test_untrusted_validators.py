"""Hostile shapes that crashed validators of guest and QEMU data with something other than an HvextError."""

from __future__ import annotations

from typing import Any, Callable

import pytest

from hvext.agent import client
from hvext.dirty import pages, rate
from hvext.errors import HvextError, QMPError
from hvext.memory import balloon, classes, stats

DEEP: Any = 0
for _ in range(5000):
    DEEP = [DEEP]
HUGE = 10 ** 5000

GOOD_CLASSES = {"version": 1, "page_size": 4096, "total": 1000, "classes": {name: 10 for name in classes.CLASSES}}


def _block(**change: Any) -> dict[str, Any]:
    block = {"id": "pc.ram", "length": 65536, "migratable": True, "pages": 16, "dirty": 1, "runs": [0, 1]}
    block.update(change)
    return block


def _pages(*blocks: Any, **change: Any) -> dict[str, Any]:
    reply = {"page-size": 4096, "generation": 1, "interval-ms": 10, "blocks": list(blocks)}
    reply.update(change)
    return reply


CASES: list[tuple[str, Callable[[], Any]]] = [
    ("memclass class value: huge int", lambda: classes.validate(
        {**GOOD_CLASSES, "classes": {**GOOD_CLASSES["classes"], "free": HUGE}}, domain="vm")),
    ("memclass class value: deep list", lambda: classes.validate(
        {**GOOD_CLASSES, "classes": {**GOOD_CLASSES["classes"], "free": DEEP}}, domain="vm")),
    ("memclass version: huge int", lambda: classes.validate({**GOOD_CLASSES, "version": HUGE}, domain="vm")),
    ("memclass total: deep", lambda: classes.validate({**GOOD_CLASSES, "total": DEEP}, domain="vm")),
    ("dirty pages: block is a list", lambda: pages.decode(_pages(["id", "x"]))),
    ("dirty pages: run is infinite", lambda: pages.decode(_pages(_block(runs=[0, float("inf")])))),
    ("dirty pages: id deep", lambda: pages.decode(_pages(_block(id=DEEP)))),
    ("dirty pages: page size 0", lambda: pages.decode(_pages(_block(), **{"page-size": 0}))),
    ("dirty pages: blocks is a dict", lambda: pages.decode(_pages(**{"blocks": {"a": 1}}))),
    ("query-commands: not objects", lambda: pages.command_names([1, 2])),
    ("query-balloon: no actual", lambda: balloon.actual_bytes({})),
    ("query-balloon: text actual", lambda: balloon.actual_bytes({"actual": "1e9"})),
    ("guest-stats: text value", lambda: stats.guest_stats({"stats": {"stat-free-memory": "abc"}})),
    ("guest-stats: not an object", lambda: stats.guest_stats([])),
    ("query-dirty-rate: text rate", lambda: rate.parse_result({"dirty-rate": "fast"}, "page-sampling", 1, 0)),
    ("query-dirty-rate: infinite rate", lambda: rate.parse_result({"dirty-rate": float("inf")},
                                                                  "page-sampling", 1, 0)),
    ("exec: exit code text", lambda: client.exec_result({"exitcode": "0", "stdout": "", "stderr": ""})),
]


@pytest.mark.parametrize("case", CASES, ids=[name for name, _ in CASES])
def test_hostile_shape_gives_a_value_or_an_hvext_error(case: tuple[str, Callable[[], Any]]) -> None:
    try:
        case[1]()
    except HvextError:
        pass


def test_dirty_pages_still_decode_good_replies_and_refuse_bad_ones() -> None:
    decoded = pages.decode(_pages(_block(), _block(id="pmem0", runs=[], dirty=0)))
    assert decoded.dirty == 1 and set(decoded.blocks) == {"pc.ram", "pmem0"}
    with pytest.raises(QMPError):
        pages.decode(_pages(_block(), _block()))  # one block twice
    assert pages.command_names([{"name": "a"}, {"name": "b"}]) == {"a", "b"}


def test_memclass_problems_describe_hostile_values_briefly() -> None:
    report = classes.validate({**GOOD_CLASSES, "classes": {**GOOD_CLASSES["classes"], "free": HUGE, "kernel": DEEP}},
                              domain="vm")
    assert report.status == "implausible" and all(len(p) < 200 for p in report.problems)


def test_balloon_and_guest_stats_keep_good_values() -> None:
    assert balloon.actual_bytes({"actual": 1 << 30}) == 1 << 30
    assert stats.guest_stats({"stats": {"stat-free-memory": 5, "stat-x": 2 ** 64 - 1}, "last-update": 7}) \
        == ({"stat-free-memory": 5}, 7)


@pytest.mark.parametrize("raw", ["[" * 5000, "[1, 2]", '{"error": "bad"}', "not json", '{"return": ' + "9" * 5000 + "}",
                                 '{"error": {"desc": ' + "[" * 5000 + "}}"],
                         ids=["deep", "list", "error-text", "not-json", "huge-int", "deep-error"])
def test_libvirt_passthrough_reply_is_checked(raw: str) -> None:
    import asyncio

    from hvext.qmp import PassthroughQMP
    with pytest.raises(QMPError):
        asyncio.run(PassthroughQMP(lambda command, request: raw).execute("query-status"))
