"""The guest agent's memory classes: the partition from meminfo, vmallocinfo, kpageflags, the sampler."""

from __future__ import annotations

import array
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "guest-agent"))
from hvext_agent import memclass

# /proc/meminfo of a 512 MiB guest (kB), as measured on the hvext image (kernel 6.1)
MEMINFO = """\
MemTotal:         402096 kB
MemFree:          334636 kB
MemAvailable:     353680 kB
Buffers:            1080 kB
Cached:            16884 kB
SwapCached:            0 kB
Active:             5916 kB
Inactive:          23896 kB
Active(anon):          8 kB
Inactive(anon):    11972 kB
Active(file):       5908 kB
Inactive(file):    11924 kB
Unevictable:           0 kB
Mlocked:               0 kB
Dirty:               260 kB
Writeback:             0 kB
AnonPages:         11856 kB
Mapped:             5948 kB
Shmem:               124 kB
KReclaimable:      12200 kB
Slab:              22280 kB
SReclaimable:      12200 kB
SUnreclaim:        10080 kB
KernelStack:        1264 kB
PageTables:          160 kB
SecPageTables:         0 kB
WritebackTmp:          0 kB
VmallocTotal:   34359738367 kB
VmallocUsed:       10916 kB
Percpu:              260 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
Hugetlb:               0 kB
"""

VMALLOCINFO = """\
0x000000000de2e610-0x00000000aca1d120   20480 irq_init_percpu_irqstack+0xf0/0x120 vmap
0x00000000aca1d120-0x000000001ef6070e    8192 acpi_os_map_iomem+0x1b6/0x1d0 phys=0x000000001ffe1000 ioremap
0xffffc90000000000-0xffffc90000005000   20480 kernel_clone+0xbf/0x430 pages=4 vmalloc N0=4
0xffffc90000005000-0xffffc9000000a000   20480 kernel_clone+0xbf/0x430 pages=4 vmalloc N0=4
0xffffc9000000a000-0xffffc9000010b000 1052672 load_module+0xbb7/0x21a0 pages=256 vmalloc N0=256
0xffffc9000010b000-0xffffc9000020c000 1052672 bpf_prog_pack_alloc+0x292/0x3b0 pages=256 vmalloc vpages N0=256
"""


@pytest.fixture
def meminfo(tmp_path: Path) -> dict[str, int]:
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    return memclass.read_kv(str(path))


def test_partition_uses_explicit_fields_and_leaves_a_small_remainder(meminfo: dict[str, int]) -> None:
    result = memclass.compute(meminfo, 4096, vmalloc=(2725, 316), anon_flags=None)
    c = result["classes"]
    assert set(c) == set(memclass.CLASSES)
    assert result["total"] == 402096 // 4
    assert c["free"] == 334636 // 4
    assert c["page_cache_dirty"] == 65 and c["page_cache_clean"] == (5908 + 11924) // 4 - 65
    assert c["shmem"] == 31 and c["swap_cached"] == 0
    assert c["anon_active"] + c["anon_inactive"] == (8 + 11972) // 4 - 31
    assert c["slab_reclaimable"] == 12200 // 4
    parts = result["details"]["kernel"]
    assert parts == {"SUnreclaim": 2520, "KernelStack": 316, "PageTables": 40, "SecPageTables": 0,
                     "Percpu": 65, "vmalloc": 2725 - 316}
    assert c["kernel"] == sum(parts.values())
    # the remainder is computed, not the partition's filler: here about 1% of MemTotal
    assert result["unaccounted"] == result["total"] - sum(c.values())
    assert 0 < result["unaccounted"] < 0.03 * result["total"]
    assert result["details"]["anon_split"] == "proportional"


def test_free_includes_per_cpu_lists(meminfo: dict[str, int], tmp_path: Path) -> None:
    zoneinfo = tmp_path / "zoneinfo"
    zoneinfo.write_text("Node 0, zone DMA32\n  pages free 81730\n  pagesets\n    cpu: 0\n"
                        "              count: 340\n              high:  378\n    cpu: 1\n"
                        "              count: 12\n")
    pcp = memclass.pcp_free_pages(str(zoneinfo))
    assert pcp == 352 and memclass.pcp_free_pages(str(tmp_path / "absent")) == 0
    without = memclass.compute(meminfo, 4096, vmalloc=None, anon_flags=None)
    with_pcp = memclass.compute(meminfo, 4096, vmalloc=None, anon_flags=None, pcp_free=pcp)
    assert with_pcp["classes"]["free"] == without["classes"]["free"] + 352
    assert with_pcp["unaccounted"] == without["unaccounted"] - 352


def test_vmalloc_fallback_subtracts_kernel_stacks(meminfo: dict[str, int]) -> None:
    result = memclass.compute(meminfo, 4096, vmalloc=None, anon_flags=None)
    assert result["details"]["kernel"]["vmalloc"] == (10916 - 1264) // 4
    assert result["details"]["vmalloc_source"] == "VmallocUsed-KernelStack"


def test_kpageflags_split_of_private_anon(meminfo: dict[str, int]) -> None:
    flags = {"private_anon_active": 1000, "private_anon_inactive": 3000, "mode": "full"}
    result = memclass.compute(meminfo, 4096, vmalloc=None, anon_flags=flags)
    c = result["classes"]
    private = (8 + 11972) // 4 - 31
    assert c["anon_active"] == round(private / 4) and c["anon_active"] + c["anon_inactive"] == private
    assert result["details"]["anon_split"] == "kpageflags"


def test_dirty_pages_and_shmem_are_capped_by_their_lists() -> None:
    kb = {"MemTotal": 4000, "Active(file)": 40, "Inactive(file)": 0, "Dirty": 400, "Writeback": 40,
          "Active(anon)": 0, "Inactive(anon)": 8, "Shmem": 80, "SwapCached": 80}
    c = memclass.compute(kb, 4096, vmalloc=(0, 0), anon_flags=None)["classes"]
    assert c["page_cache_dirty"] == 10 and c["page_cache_clean"] == 0
    assert c["shmem"] == 2 and c["swap_cached"] == 0 and c["anon_active"] == c["anon_inactive"] == 0


def test_vmallocinfo_counts_vmalloc_pages_and_stacks(tmp_path: Path) -> None:
    path = tmp_path / "vmallocinfo"
    path.write_text(VMALLOCINFO)
    assert memclass.vmalloc_pages(str(path)) == (4 + 4 + 256 + 256, 8)
    assert memclass.vmalloc_pages(str(tmp_path / "absent")) is None


def _flags(*bits: int) -> int:
    return sum(1 << b for b in bits)


def test_kpageflags_scan_counts_private_anon_only(tmp_path: Path) -> None:
    anon = (memclass.KPF_LRU, memclass.KPF_ANON, memclass.KPF_SWAPBACKED)
    pages = ([_flags(*anon, memclass.KPF_ACTIVE)] * 3 + [_flags(*anon)] * 5
             + [_flags(*anon, memclass.KPF_SWAPCACHE)] * 7          # swap cache: not private anon
             + [_flags(memclass.KPF_LRU, memclass.KPF_SWAPBACKED)] * 11  # shmem
             + [_flags(memclass.KPF_LRU, memclass.KPF_ACTIVE)] * 13      # file
             + [_flags(*anon, memclass.KPF_UNEVICTABLE)] * 17 + [0] * 19)
    path = tmp_path / "kpageflags"
    path.write_bytes(array.array("Q", pages).tobytes())
    result = memclass.scan_kpageflags(str(path), frames=len(pages))
    assert result == {"mode": "full", "frames": len(pages), "scanned": len(pages),
                      "private_anon_active": 3, "private_anon_inactive": 5}


def test_kpageflags_scan_samples_large_guests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memclass, "KPAGEFLAGS_FULL_SCAN", 1000)
    monkeypatch.setattr(memclass, "KPAGEFLAGS_SAMPLES", 10)
    monkeypatch.setattr(memclass, "KPAGEFLAGS_BLOCK", 4)
    active = _flags(memclass.KPF_LRU, memclass.KPF_ANON, memclass.KPF_ACTIVE)
    path = tmp_path / "kpageflags"
    path.write_bytes(array.array("Q", [active] * 5000).tobytes())
    result = memclass.scan_kpageflags(str(path), frames=5000)
    assert result["mode"] == "sampled" and result["scanned"] == 40 and result["private_anon_active"] == 40


def test_sample_on_this_machine_is_consistent() -> None:
    """The real /proc of the machine running the tests (kpageflags needs root; without it the
    sample says why and splits proportionally)."""
    result = memclass.sample()
    assert result["version"] == memclass.SCHEMA_VERSION and result["total"] > 0
    assert result["unaccounted"] == result["total"] - sum(result["classes"].values())
    assert result["details"]["kpageflags"]["mode"] in ("full", "sampled", "unavailable", "unused")
    assert set(result["pmem"]) == {"devices", "dax_fs_used", "dax_mapped"}


def test_sample_reads_again_while_pages_are_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read taken while 29,249 free pages were off the free lists (free page reporting: in no counter)
    covers 70% of MemTotal, as one CI sample did; the agent reads again and reports the settled one.
    A guest that stays inconsistent is reported as it is, after CONSISTENT_READS reads."""
    path = tmp_path / "meminfo"
    in_flight = MEMINFO.replace("MemFree:          334636 kB", f"MemFree:          {334636 - 29249 * 4} kB")
    path.write_text(in_flight)
    monkeypatch.setattr(memclass, "MEMINFO", str(path))
    monkeypatch.setattr(memclass, "vmalloc_pages", lambda: None)  # the fixture's, not this machine's
    monkeypatch.setattr(memclass, "pcp_free_pages", lambda: 0)
    pauses: list[float] = []

    def settle(seconds: float) -> None:  # the reporting ends while the agent pauses
        pauses.append(seconds)
        path.write_text(MEMINFO)
    monkeypatch.setattr(memclass.time, "sleep", settle)
    result = memclass.sample(kpageflags=False)
    assert result["details"]["reads"] == 2 and pauses == [memclass.REREAD_PAUSE_S]
    assert abs(result["unaccounted"]) <= memclass.CONSISTENT_SHARE * result["total"], result
    assert result["classes"]["free"] >= 334636 // 4

    path.write_text(in_flight)
    monkeypatch.setattr(memclass.time, "sleep", pauses.append)  # it never settles
    result = memclass.sample(kpageflags=False)
    assert result["details"]["reads"] == memclass.CONSISTENT_READS
    assert result["unaccounted"] > 0.25 * result["total"]  # reported as it is, not hidden


def test_command_arguments_are_checked() -> None:
    for bad in ({"interval": -1}, {"interval": 0.1}, {"interval": True}, {"interval": "2"},
                {"max_age": -3}, {"cached": "yes"}, {"kpageflags": 1}):
        with pytest.raises((ValueError, TypeError)):
            memclass.cmd_memclass(bad)


def test_periodic_sampler_caches_and_stops_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the sampler does, not when: every wait is for a condition (with a deadline far above any
    scheduling delay), so a loaded machine makes the test slower, never wrong."""
    taken: list[float] = []
    sampled = threading.Condition()

    def fake_sample(*, kpageflags: bool = True) -> dict[str, Any]:
        with sampled:
            taken.append(time.monotonic())
            sampled.notify_all()
            return {"classes": {}, "n": len(taken), "sampled_monotonic": taken[-1]}

    def wait_for(condition: Callable[[], bool]) -> None:
        with sampled:
            assert sampled.wait_for(condition, timeout=30), "the sampler did not get there within 30 s"

    monkeypatch.setattr(memclass, "sample", fake_sample)
    monkeypatch.setattr(memclass, "IDLE_STOP_INTERVALS", 10**6)  # no idle stop until the test allows it
    monkeypatch.setattr(memclass, "MIN_INTERVAL_S", 0.05)
    sampler = memclass.Sampler()
    monkeypatch.setattr(memclass, "SAMPLER", sampler)
    first = memclass.cmd_memclass({"interval": 0.1, "cached": True})
    assert first["periodic_interval_s"] == 0.1 and "sampled_monotonic" not in first
    wait_for(lambda: len(taken) >= 4)  # the sampler kept sampling on its own
    cached = memclass.cmd_memclass({"cached": True})
    assert cached["n"] >= 3 and cached["periodic_interval_s"] == 0.1
    assert 0 <= cached["age_s"] <= time.monotonic() - taken[cached["n"] - 1] + 0.001  # the age of that sample
    stale = memclass.cmd_memclass({"cached": True, "max_age": 0})
    assert stale["n"] > cached["n"] and stale["age_s"] <= 0.001 + (time.monotonic() - taken[stale["n"] - 1])
    thread = sampler.thread
    assert thread is not None
    monkeypatch.setattr(memclass, "IDLE_STOP_INTERVALS", 4)  # now 0.4 s without a request stop it
    thread.join(timeout=30)
    assert not thread.is_alive() and sampler.thread is None and sampler.interval is None  # idle: stopped
    count = len(taken)
    assert memclass.cmd_memclass({"cached": True})["n"] <= count and len(taken) == count  # cached, no restart
    monkeypatch.setattr(memclass, "IDLE_STOP_INTERVALS", 10**6)
    memclass.cmd_memclass({"interval": 0.1})
    thread = sampler.thread
    assert thread is not None and thread.is_alive()
    memclass.cmd_memclass({"interval": 0})  # stop at once (not after an idle time)
    thread.join(timeout=30)
    assert not thread.is_alive() and sampler.thread is None
