"""Page sharing on real guests (C4): the estimate before merging against what KSM really freed after
``hvext sharing --apply --wait``, same guests, same run.

KSM is a host-wide service: the test remembers ``run``, ``pages_to_scan`` and ``sleep_millisecs`` and
restores them, also on failure. It scans faster than KSM's default (100 pages every 20 ms would
take minutes for two guests under TCG on a busy host).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from hvext.cli.main import main
from hvext.memory import sharing

#: The goal, asserted as is: measured +0.01 % (253 MiB both, two idle 512 MiB guests; docs/sharing.md).
#: What can widen it: the guests keep running between the scan and KSM's scans (KSM skips pages that
#: changed between two of its scans).
TOLERANCE = 0.05


@pytest.fixture
def ksm_knobs() -> Iterator[None]:
    saved = {name: sharing.ksm_read(name) for name in ("run", "pages_to_scan", "sleep_millisecs", "smart_scan")}
    try:
        sharing.ksm_write("pages_to_scan", 4000)
        sharing.ksm_write("sleep_millisecs", 20)
        sharing.ksm_write("smart_scan", 0)
        yield
    finally:
        if saved["run"] != 1:
            # run=2 unmerges everything (so the next test starts clean), then the saved value
            sharing.ksm_write("run", 2)
        for name, value in saved.items():
            sharing.ksm_write(name, value)


def test_estimate_matches_what_ksm_frees(vm_factory, ksm_knobs, capsys) -> None:
    first = vm_factory.boot(vm_factory.define(memory_mib=512))
    second = vm_factory.boot(vm_factory.define(memory_mib=512))
    time.sleep(10)  # let both settle after boot (the agent starts, the page cache fills)
    status = main(["sharing", first.name, second.name, "--apply", "--wait", "400", "--json"])
    out, err = capsys.readouterr()
    assert status == 0, err
    report = json.loads(out)
    estimate, real = report["estimated_savings_bytes"], report["ksm_saved_bytes"]
    print(json.dumps({k: v for k, v in report.items() if k != "large_pages_to_break"}, indent=1))
    print(f"estimate {estimate >> 20} MiB, KSM freed {real >> 20} MiB, error {(estimate - real) / real:+.2%}")
    assert report["ksm_settled"], report
    assert estimate > 32 << 20, report  # two guests from one image share a lot
    assert all(d["mergeable"] for d in report["domains"])
    if report["large_pages_left_unsplit"]:
        # Seen in 5 of 10 runs here: 71-80 large pages that hold duplicates stay whole after KSM
        # settled, so their zero pages are not freed and KSM frees ~111 MiB instead of ~253 MiB.
        # Cause not established (thp_split_page_failed rises by 17-19 in those runs, 6-7 in the
        # others); the estimate cannot foresee it (docs/sharing.md, "Accuracy"). What KSM freed
        # must then lie between the estimate that breaks no large page and the one that breaks all.
        low = report["estimated_savings_without_breaking_bytes"]
        assert (1 - TOLERANCE) * low <= real <= (1 + TOLERANCE) * estimate, report
        return
    assert abs(estimate - real) <= TOLERANCE * real, report
