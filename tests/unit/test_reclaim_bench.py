"""bench/reclaim.py decides from figures the host's scheduling does not move, and says so per state."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def load_bench(monkeypatch: Any) -> Any:
    spec = importlib.util.spec_from_file_location("hvext_bench_reclaim", ROOT / "bench" / "reclaim.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", [str(ROOT / "bench"), *sys.path])  # as when run: bench/plot.py importable
    monkeypatch.setitem(sys.modules, spec.name, mod)  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def case(method: str, faults: list[int], out: list[float], state: str = "free") -> list[dict[str, Any]]:
    return [{"state": state, "method": method, "chosen": method, "seconds": 2.0, "still_out_mib": o,
             "faults": f, "guest_majflt": f, "host_swapins": 0, "stall_ms": 0.0, "ops_ratio": 1.0,
             "base_ops_s": 20000.0, "window_s": 30.0}
            for f, o in zip(faults, out)]


def test_host_majflt_counts_this_process_faults(monkeypatch: Any) -> None:
    bench = load_bench(monkeypatch)
    mine = bench.host_majflt(os.getpid())
    assert isinstance(mine, int) and mine >= 0
    assert bench.host_majflt(os.getpid()) >= mine


def test_medians_decide_and_the_spread_is_shown(monkeypatch: Any) -> None:
    bench = load_bench(monkeypatch)
    rows = case("auto", [10, 12, 5000], [300, 301, 299]) + case("swap", [2000, 2100, 1900], [300, 290, 310]) \
        + case("mom", [0, 3, 9], [120, 125, 118])
    auto, swap, mom = (bench.summarise(rows, "free", m) for m in ("auto", "swap", "mom"))
    assert bench.spread(auto["faults"]) == "12 [10, 5000]"  # one bad repetition moves the range, not the median
    # fewer faults by the medians, but one repetition as bad as the baseline's: no lead claimed
    assert bench.verdict(auto, swap)[0] == "not worse"
    clean = bench.summarise(case("auto", [10, 12, 15], [300, 301, 299]), "free", "auto")
    assert bench.verdict(clean, swap)[0] == "ahead"
    assert bench.verdict(auto, mom)[0] == "ahead"  # as few faults (within the floor), more memory out


def test_auto_with_more_faults_for_the_same_memory_is_worse(monkeypatch: Any) -> None:
    bench = load_bench(monkeypatch)
    rows = case("auto", [3000, 3100, 2900], [300, 300, 300]) + case("swap", [2000, 2000, 2000], [300, 300, 300])
    word, why = bench.verdict(bench.summarise(rows, "free", "auto"), bench.summarise(rows, "free", "swap"))
    assert word == "worse" and "faults 3000 vs 2000" in why
    # within 5 % plus the floor: not worse
    rows = case("auto", [2300], [290]) + case("swap", [2000], [300])
    assert bench.verdict(bench.summarise(rows, "free", "auto"), bench.summarise(rows, "free", "swap"))[0] \
        == "not worse"


def test_a_refused_baseline_counts_as_auto_ahead(monkeypatch: Any) -> None:
    bench = load_bench(monkeypatch)
    rows = case("auto", [100], [300], "hot") + [{"state": "hot", "method": "balloon", "refused": "floor"}]
    assert bench.verdict(bench.summarise(rows, "hot", "auto"), bench.summarise(rows, "hot", "balloon")) \
        == ("ahead", "balloon refused")


def test_the_goal_needs_no_worse_state_and_a_lead_over_each_baseline(monkeypatch: Any) -> None:
    bench = load_bench(monkeypatch)
    assert bench.goal({("free", "swap"): "ahead", ("hot", "mom"): "ahead", ("hot", "swap"): "not worse"}) \
        .startswith("goal met")
    missed = bench.goal({("free", "swap"): "not worse", ("hot", "mom"): "ahead", ("cache", "swap"): "worse"})
    assert missed == "goal missed: auto is behind in cache vs swap (worse); never ahead of swap"


def test_a_saved_run_prints_its_table_and_plot_again(tmp_path: Path) -> None:
    import json
    import subprocess

    from tests.unit.test_bench_smoke import assert_png

    rows = [{**r, "rss_series": [(0.0, 500.0), (1.0, 300.0)], "swap_series": [(0.0, 0.0), (1.0, 0.0)],
             "ops_series": [(0.0, 100.0), (1.0, 90.0)]}
            for r in case("auto", [1], [300]) + case("swap", [900], [300])]
    saved = tmp_path / "reclaim.json"
    saved.write_text(json.dumps({"run": {"memory": 768, "reps": 1, "window": 30, "argv": []}, "rows": rows}))
    done = subprocess.run([sys.executable, "bench/reclaim.py", "--rows", str(saved), "--plot-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| free | auto | auto | 1/1 |" in done.stdout and "| 100% |" in done.stdout
    assert "free auto vs    swap:     ahead" in done.stdout
    assert_png(tmp_path / "reclaim.png")
    saved.write_text("{}")
    bad = subprocess.run([sys.executable, "bench/reclaim.py", "--rows", str(saved)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_overlapping_repetitions_are_no_lead_and_more_memory_for_more_faults_is_a_trade_off(monkeypatch: Any) -> None:
    bench = load_bench(monkeypatch)
    # the same method twice: medians apart, ranges overlapping (the hot state's auto and swap)
    rows = case("auto", [52000, 60000, 70000], [88, 80, 60], "hot") + case("swap", [65000, 58000, 66000],
                                                                           [70, 90, 75], "hot")
    assert bench.verdict(bench.summarise(rows, "hot", "auto"), bench.summarise(rows, "hot", "swap"))[0] \
        == "not worse"
    rows = case("auto", [52000], [88], "hot") + case("mom", [0], [-16], "hot")
    assert bench.verdict(bench.summarise(rows, "hot", "auto"), bench.summarise(rows, "hot", "mom"))[0] \
        == "trade-off"
