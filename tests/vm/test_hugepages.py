"""Large-page priority on a real guest (C5): the regions a guest workload writes rank above the others,
and ``--apply`` (also with ``--watch``) maps the hottest candidates that were not large with MADV_COLLAPSE.

The guest's stress workload writes a 32 MiB working set; its ``pfn_sample`` gives guest frames of that
set, and guest RAM is one block from guest address 0 (512 MiB, below the PCI hole), so frame // 512 is
the 2 MiB region. Needs the patched QEMU (dirty page lists) and root (kpageflags).
"""

from __future__ import annotations

import json
import os
import statistics
import time

from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from hvext import aio
from hvext.cli.main import main
from hvext.agent.client import AgentClient
from hvext.host import Domain, emulator_path
from hvext.memory import balloon, hugepages, swap
from hvext.memory.sharing_policy import REGION_SIZE

T = TypeVar("T")
patched = pytest.mark.requires(emulator_path() is not None, "needs the patched QEMU (make qemu)")


def _agent(domain: Domain, call: Callable[[AgentClient], Awaitable[T]]) -> T:
    async def run() -> T:
        async with domain.agent(timeout=30) as client:
            return await call(client)
    return aio.run(run())


@patched
def test_hot_set_ranks_first_and_apply_collapses_it(vm_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    domain = vm_factory.boot(vm_factory.define(memory_mib=512, agent_testing=True))
    _agent(domain, lambda c: c.stress_start(32, 32))  # the 32 MiB set rewritten every second
    try:
        deadline = time.monotonic() + 60
        while True:
            status = _agent(domain, lambda c: c.stress_status())
            if (status.pages_written or 0) > 0 and len(status.pfn_sample) >= 32:
                break
            assert time.monotonic() < deadline, "the stress workload never started writing"
            time.sleep(0.5)
        time.sleep(4)
        hot = {pfn // 512 for pfn in status.pfn_sample}
        code = main(["hugepages", domain.name, "--intervals", "4", "--seconds", "2", "--top", "100000", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        data = json.loads(out)
        scores = {c["region"]: c["score"] for c in data["candidates"]}
        cold = [scores.get(r, 0.0) for r in range(data["regions"]) if r not in hot]
        hot_scores = sorted(scores.get(r, 0.0) for r in hot)
        with capsys.disabled():
            print(f"{len(hot)} hot regions (sampled), scores {hot_scores[:5]}..{hot_scores[-5:]}; "
                  f"{sum(1 for s in cold if s)} other regions written, cold median {statistics.median(cold)}, "
                  f"90th pct {statistics.quantiles(cold, n=10)[-1]:.1f}, max {max(cold):.1f}; "
                  f"{data['large_regions']}/{data['regions']} large")
        assert all(s > 0 for s in hot_scores), "a region of the working set has no writes"
        # the working set's regions rank above the rest of guest RAM: the median sampled hot region
        # outscores 90 % of the other regions (some of those are hot too, unsampled)
        assert statistics.median(hot_scores) > statistics.quantiles(cold, n=10)[-1]
        ranked = [c["region"] for c in data["candidates"]]
        top = ranked[:len(hot)]
        assert len(set(top) & hot) >= 0.5 * len(hot), (top, sorted(hot))

        code = main(["hugepages", domain.name, "--intervals", "1", "--top", "3"])
        out, err = capsys.readouterr()
        assert code == 0 and "regions mapped large" in out and "Large-page candidates" in out, err

        code = main(["hugepages", domain.name, "--watch", "1", "--count", "2", "--top", "5", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [line["interval"] for line in lines] == [1, 2] and len(lines[1]["candidates"]) == 5
        assert lines[1]["written_pages"] > 0

        # QEMU asks for large pages on guest RAM (MADV_HUGEPAGE), so the hot set is large already:
        # split one hot region (MADV_PAGEOUT of its first 4 KiB page splits the 2 MiB page) for --apply
        ram = hugepages.GuestRAM(domain.name, swap.qemu_pid(domain.name), balloon.boot_memory(domain))
        target = next(c["region"] for c in data["candidates"] if c["large"] and c["region"] in hot)
        pidfd = os.pidfd_open(ram.pid)
        try:
            swap.pageout(pidfd, [(ram.start + target * REGION_SIZE, 4096)])
        finally:
            os.close(pidfd)
        assert target not in ram.large()
        code = main(["hugepages", domain.name, "--intervals", "3", "--seconds", "2", "--apply", "--budget", "4",
                     "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        applied = json.loads(out)["applied"]
        with capsys.disabled():
            print(json.dumps(applied))
        assert len(applied["collapse"]) <= 4
        assert not set(applied["collapse"]) & set(applied["already_large"])
        assert target in applied["collapse"], applied  # hot and not large: chosen
        assert {"region": target, "error": None, "large": True} in applied["results"], applied
        assert target in ram.large()

        # --watch --apply keeps counting and collapsing, within one budget for the whole run
        again = next(c for c in applied["already_large"] if c in hot and c != target)
        pidfd = os.pidfd_open(ram.pid)
        try:
            swap.pageout(pidfd, [(ram.start + again * REGION_SIZE, 4096)])
        finally:
            os.close(pidfd)
        code = main(["hugepages", domain.name, "--watch", "2", "--count", "3", "--apply", "--budget", "1", "--json"])
        out, err = capsys.readouterr()
        assert code == 0, err
        steps = [json.loads(line)["applied"] for line in out.splitlines()]
        with capsys.disabled():
            print(json.dumps([{k: s[k] for k in ("collapse", "collapsed", "collapsed_in_run", "budget")}
                              for s in steps]))
        assert steps[-1]["collapsed_in_run"] == [again], steps
        assert all(len(s["collapse"]) <= s["budget"] for s in steps) and steps[-1]["budget"] == 0
        assert again in ram.large()
    finally:
        _agent(domain, lambda c: c.stress_stop())
