"""C18 on a 3-host cluster lab: recovery of a guest's RAM from a baseline on shared storage plus the
pages its source lists as dirty since.

host1 runs a RAM-file guest (a counter in RAM, and a program holding 64 random pages whose guest
physical addresses it reports). Before any baseline, recovery on host2 is refused and leaves nothing.
``ha baseline`` copies the RAM to a private directory both hosts reach; host1's hvextd keeps the dirty
set since; the guest rewrites a known set of its pages; host2 then recovers: it fills its RAM file from
the baseline and pulls from host1's hvextd (TLS peer transport) only the pages on host1's dirty lists.
Checked: the known pages are among those pulled, every page that differs between the baseline and the
source's final RAM was pulled (a page changed after the baseline and not pulled fails), nothing beyond
the dirty list moved (bytes on the wire at most 1.05x the dirty bytes), host2's RAM file equals host1's,
and the guest resumes on host2 with the same boot, processes and counter.

One guest boot. Run under ``flock /work/notes/lab.lock`` (one lab per machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from hvext import aio, lab, paths
from hvext.cli.main import main
from hvext.errors import DomainNotFound, HvextError
from hvext.ha import volatile
from hvext.host import Host, RunState
from hvext.lab import plan
from hvext.memory import ramfile
from tests.vm import test_lab_cluster
from tests.vm.conftest import BOOT_TIMEOUT_S, VMFactory
from tests.vm.helpers import guest_sh
from tests.vm.test_lab_cluster import cluster_paths, wait_for, with_leases
from tests.vm.test_lab_cluster import pytestmark as cluster_marks
from tests.vm.test_mirror import ask, start_program
from tests.vm.test_ramfile import COUNTER, snapshot

pytestmark = [*cluster_marks[:-1], pytest.mark.timeout(900)]

the_lab = test_lab_cluster.the_lab  # this module's own 3-host cluster lab (a module-scoped fixture)

PAGE = 4096
KNOWN = (1, 4, 9, 20, 33, 63)  # the program's pages the guest rewrites after the baseline


def differing_pages(a: Path, b: Path, size: int) -> set[int]:
    out = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset in range(0, size, 1 << 20):
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                out |= {(offset + i) // PAGE for i in range(0, len(x), PAGE) if x[i:i + PAGE] != y[i:i + PAGE]}
    return out


def pageset(runs: list[list[int]]) -> set[int]:
    return {p for first, count in runs for p in range(first, first + count)}


def test_recovery_pulls_exactly_the_pages_dirtied_since_the_baseline(
        the_lab: lab.Lab, guest_image: object, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    host1, host2 = the_lab.host(1), the_lab.host(2)
    wait_for("3 host leases", with_leases(host1, ["host1", "host2", "host3"]), timeout=3 * plan.LAB_LEASE_TTL_S)
    conn1, conn2 = Host(host1.uri_unix), Host(host2.uri_unix)
    factory = VMFactory(conn1)
    domain = factory.define(memory_mib=512)
    name = domain.name
    shared = Path(tempfile.mkdtemp(prefix="hvext-baseline-", dir=paths.STATE_DIR))  # 0700, both hosts reach it
    client = the_lab.cluster_client()
    ram2 = ramfile.ram_path(name, conn2.host_id)
    try:
        ram = ramfile.convert(domain)
        ramfile.start(domain)
        aio.run(domain.wait_agent(BOOT_TIMEOUT_S))
        assert ":" in volatile.peer_address_of(client, "host1")  # host1's hvextd serves peers

        # The primary dies before the baseline exists: a clear refusal, nothing made on host2.
        status = main(["-c", host2.uri_unix, "ha", "recover", name, "--dir", str(shared), *cluster_paths(host2)])
        err = capsys.readouterr().err
        assert status == 1 and "no baseline" in err and "nothing was started" in err, err
        with pytest.raises(DomainNotFound):
            conn2.lookup(name)
        assert not ram2.exists()

        guest_sh(domain, COUNTER)
        state = start_program(domain)
        taken = volatile.take_baseline(conn1, name, shared, "host1")
        base_file = Path(taken["file"])
        assert base_file.parent == shared / name and os.stat(base_file).st_mode & 0o777 == 0o600
        assert taken["epoch"] == 1 and taken["valid"] and taken["ram_bytes"] == ram.size

        for n, k in enumerate(KNOWN, start=1):
            state = ask(domain, f"write {k}", n)
        sha = state["sha"]
        refreshed = taken["refreshed_at"]
        wait_for("host1's hvextd to add dirty lists since the baseline",
                 lambda: (volatile.load_state(conn1.host_id, name) or taken).refreshed_at > refreshed + 1, 30)
        before = snapshot(domain)
        known_pages = {state["gpas"][k] // PAGE for k in KNOWN}

        status = main(["-c", host2.uri_unix, "ha", "recover", name, "--dir", str(shared), "--paused", "--json",
                       *cluster_paths(host2)])
        out, err = capsys.readouterr()
        assert status == 0, err
        result = json.loads(out)
        print({k: v for k, v in result.items() if k != "runs"})
        dom2 = conn2.lookup(name)
        assert not domain.is_active() and dom2.state is RunState.PAUSED

        pulled = pageset(result["runs"])
        assert known_pages <= pulled, known_pages - pulled
        changed = differing_pages(base_file, ram.path, ram.size)
        assert known_pages <= changed
        assert changed <= pulled, f"changed after the baseline and not pulled: {sorted(changed - pulled)[:20]}"
        assert result["pulled_bytes"] == len(pulled) * PAGE == result["dirty_bytes"]
        assert result["dirty_bytes"] <= result["wire_bytes"] <= 1.05 * result["dirty_bytes"], result
        assert result["within_goal"] and 0 < result["state_bytes"] < ram.size // 20
        assert differing_pages(ram.path, ram2, ram.size) == set()  # host2's copy is host1's RAM

        dom2.resume()
        aio.run(dom2.wait_agent(60))
        guest_sh(dom2, "sleep 1.5")
        after = snapshot(dom2)
        assert after["boot_id"] == before["boot_id"]  # no reboot
        assert (after["counter_pid"], after["alive"]) == (before["counter_pid"], "alive")
        assert int(after["counter"]) > int(before["counter"])  # the counter in RAM went on
        state = ask(dom2, "sum", len(KNOWN) + 1)
        assert state["now"] == sha == state["sha"]  # the program's pages, as it last wrote them
    finally:
        with contextlib.suppress(DomainNotFound, HvextError):
            dom = conn2.lookup(name)
            if dom.is_active():
                dom.destroy()
            dom.undefine(remove_state=False)
        with contextlib.suppress(HvextError, OSError):
            ramfile.remove(ramfile.RamFile(ram2, 512 << 20))
        with contextlib.suppress(HvextError):
            volatile.forget(conn1, name)
        factory.cleanup()
        with contextlib.suppress(HvextError, OSError):
            ramfile.remove(ramfile.RamFile(ramfile.ram_path(name, conn1.host_id), 512 << 20))
        shutil.rmtree(shared, ignore_errors=True)
        client.close()
        conn1.close()
        conn2.close()
