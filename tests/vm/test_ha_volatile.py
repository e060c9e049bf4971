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
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hvext import aio, lab, paths
from hvext.errors import DomainNotFound, HvextError
from hvext.ha import standby, volatile
from hvext.host import Host, RunState
from hvext.lab import plan
from hvext.memory import ramfile
from hvext.pmem import devices
from tests.vm import test_lab_cluster
from tests.vm.conftest import BOOT_TIMEOUT_S, VMFactory
from tests.vm.helpers import guest_sh
from tests.vm.test_lab_cluster import cluster_paths, wait_for, with_leases
from tests.vm.test_lab_cluster import pytestmark as cluster_marks
from tests.vm.test_mirror import ask, start_program
from tests.vm.test_ramfile import COUNTER

pytestmark = [*cluster_marks[:-1], pytest.mark.timeout(900)]

the_lab = test_lab_cluster.the_lab  # this module's own 3-host cluster lab (a module-scoped fixture)

PAGE = 4096
KNOWN = (1, 4, 9, 20, 33, 63)  # the program's pages the guest rewrites after the baseline


def on_host(host: lab.LabHost, *argv: str) -> subprocess.CompletedProcess[str]:
    """``hvext ARGV`` run on a lab host (its network namespace: the lab's firewall lets only its hosts reach
    the peer port), with this source tree."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(["ip", "netns", "exec", host.netns, sys.executable, "-m", "hvext.cli.main",
                           "-c", host.uri_unix, *argv], capture_output=True, text=True, env=env, timeout=300)


def differing_pages(a: Path, b: Path, size: int) -> set[int]:
    out = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for offset in range(0, size, 1 << 20):
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                out |= {(offset + i) // PAGE for i in range(0, len(x), PAGE) if x[i:i + PAGE] != y[i:i + PAGE]}
    return out


def snapshot(domain) -> dict[str, str]:
    out = guest_sh(domain, "cat /proc/sys/kernel/random/boot_id /run/counter.pid /run/counter; "
                           "kill -0 $(cat /run/counter.pid) && echo alive")["stdout"].split()
    return {"boot_id": out[0], "counter_pid": out[1], "counter": out[2], "alive": out[3]}


def pageset(runs: list[list[int]]) -> set[int]:
    return {p for first, count in runs for p in range(first, first + count)}


def test_recovery_pulls_exactly_the_pages_dirtied_since_the_baseline(
        the_lab: lab.Lab, guest_image: object) -> None:  # noqa: F811
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
        done = on_host(host2, "ha", "recover", name, "--dir", str(shared), *cluster_paths(host2))
        assert done.returncode == 1 and "no baseline" in done.stderr and "nothing was started" in done.stderr, \
            done.stderr
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

        done = on_host(host2, "ha", "recover", name, "--dir", str(shared), "--paused", "--json",
                       *cluster_paths(host2))
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
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
    except BaseException:
        for index in (1, 2):
            log = plan.host_run_dir(plan.RUN_DIR, index) / "hvextd.log"
            with contextlib.suppress(OSError):
                print(f"--- host{index}'s hvextd.log (end)\n" + "".join(log.read_text().splitlines(True)[-60:]))
        raise
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
        forget_host_state([conn1.host_id, conn2.host_id], name)
        client.close()
        conn1.close()
        conn2.close()


def test_failover_to_a_standby_copy_keeps_the_guest_running(the_lab: lab.Lab, guest_image: object) -> None:  # noqa: F811
    """C17: host1's guest protected with --standby host2 (copy refreshed every second by host1's hvextd);
    a planned `ha failover` resumes it on host2; protected again with standby host1, host2 loses power
    (SIGPWR, battery path) and it resumes on host1; protected with standby host3, host3 dies during the
    refreshes and the protection says it stopped. The counter the guest keeps in RAM goes on, its
    process and boot stay the same throughout."""
    hosts = {i: the_lab.host(i) for i in (1, 2, 3)}
    wait_for("3 host leases", with_leases(hosts[1], ["host1", "host2", "host3"]), timeout=3 * plan.LAB_LEASE_TTL_S)
    conns = {i: Host(h.uri_unix) for i, h in hosts.items()}
    ids = {i: c.host_id for i, c in conns.items()}  # the hosts' libvirtds die on the way
    factory = VMFactory(conns[1])
    domain = factory.define(memory_mib=512)
    name = domain.name
    try:
        ram = ramfile.convert(domain)
        ramfile.start(domain)
        aio.run(domain.wait_agent(BOOT_TIMEOUT_S))
        guest_sh(domain, COUNTER)
        first = snapshot(domain)

        def protect(on: int, to: int) -> dict:
            done = on_host(hosts[on], "ha", "protect", name, "--standby", f"host{to}", "--sync-interval", "1",
                           "--json", *cluster_paths(hosts[on]))
            assert done.returncode == 0, done.stderr
            result = json.loads(done.stdout)
            assert result["state"] == "active" and 0 < result["bytes_sent"] <= ram.size
            wait_for(f"host{on}'s hvextd to refresh the copy on host{to}",
                     lambda: (standby.load(ids[on], name) or _never).syncs >= 3, 30)
            return result

        def running_on(i: int):
            dom = conns[i].lookup(name)
            assert dom.state is RunState.RUNNING
            aio.run(dom.wait_agent(60))
            guest_sh(dom, "sleep 1.2")
            return dom, snapshot(dom)

        # 1. planned failover host1 -> host2
        protect(1, 2)
        before = snapshot(domain)
        done = on_host(hosts[1], "ha", "failover", name, "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        print("planned failover:", report)
        assert not domain.is_active() and report["bytes_at_failover"] < ram.size // 10
        assert devices.allocated(ram.path) == 0, "host1 kept the failed-over guest's RAM in /dev/shm"
        dom2, after = running_on(2)
        assert (after["boot_id"], after["counter_pid"], after["alive"]) == \
            (first["boot_id"], first["counter_pid"], "alive")  # no reboot, same process
        assert int(after["counter"]) > int(before["counter"])  # the counter in RAM went on

        # 2. battery path: host2 loses power; its hvextd hands the guest to host1 while on battery
        protect(2, 1)
        before = snapshot(dom2)
        the_lab.fail(2, power_loss=True)
        record = standby.load(ids[2], name)
        assert record is not None and record.state == "failed over", record
        assert record.failover and record.failover["reason"] == "power loss"
        print("battery failover:", record.failover)
        dom1, after = running_on(1)
        assert (after["boot_id"], after["counter_pid"]) == (first["boot_id"], first["counter_pid"])
        assert int(after["counter"]) > int(before["counter"])

        # 3. the standby dies during the refreshes: the protection says it stopped
        protect(1, 3)
        the_lab.fail(3)
        stopped = wait_for("the protection to say it stopped",
                           lambda: (lambda r: r if r and r.state == "stopped" else None)(
                               standby.load(ids[1], name)), 60)
        assert "host3" in (stopped.error or "") and "refresh" in (stopped.error or ""), stopped.error
        done = on_host(hosts[1], "ha", "standby-status", name, "--json")
        assert json.loads(done.stdout)["state"] == "stopped"
        assert dom1.state is RunState.RUNNING  # the guest itself goes on
    except BaseException:
        for index in (1, 2, 3):
            log = plan.host_run_dir(plan.RUN_DIR, index) / "hvextd.log"
            with contextlib.suppress(OSError):
                print(f"--- host{index}'s hvextd.log (end)\n" + "".join(log.read_text().splitlines(True)[-40:]))
        raise
    finally:
        for i in (2, 3):
            with contextlib.suppress(DomainNotFound, HvextError, libvirt_error()):
                dom = conns[i].lookup(name)
                if dom.is_active():
                    dom.destroy()
                dom.undefine(remove_state=False)
        for i in (1, 2, 3):
            with contextlib.suppress(HvextError, OSError):
                ramfile.remove(ramfile.RamFile(ramfile.ram_path(name, ids[i]), 512 << 20))
            with contextlib.suppress(OSError, HvextError):
                standby._path(ids[i], name).unlink(missing_ok=True)
                standby._path(ids[i], name, "standby-copies").unlink(missing_ok=True)
        factory.cleanup()
        forget_host_state(list(ids.values()), name)
        for conn in conns.values():
            with contextlib.suppress(Exception):
                conn.close()


def forget_host_state(host_ids: list[str], name: str) -> None:
    """The lock files the lab hosts' hvextds and commands made for *name* under STATE_DIR/ha (one
    directory per host id, and the lab's ids are new each run): removed, and their directories once empty."""
    for host_id in host_ids:
        for root in (volatile.state_root(host_id), standby._root(host_id), standby._root(host_id, "standby-copies")):
            with contextlib.suppress(OSError):
                (root / f"{name}.lock").unlink(missing_ok=True)
                root.rmdir()  # only when empty: another test's files stay


class _Never:
    syncs = 0


_never = _Never()


def libvirt_error() -> type[BaseException]:
    import libvirt
    return libvirt.libvirtError
