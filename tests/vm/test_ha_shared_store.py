"""C13 on a 3-host cluster lab: a guest protected ``--via-shared-store`` writes durable records on its
DAX-mounted, volatile-backed NVDIMM; its owner loses power (``lab fail OWNER --power-loss``); the domain
then runs on another host, whose copy of the PMEM holds every record the guest reported durable (RPO 0).

Two guest boots (the owner's, the survivor's). Run under ``flock /work/notes/lab.lock`` (one lab per machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hvext import aio, lab, paths
from hvext.agent import records
from hvext.cli.main import main
from hvext.errors import DomainNotFound, HvextError
from hvext.ha.client import FAILOVER_PREFIX, FINAL_PREFIX
from hvext.host import Host, remove_domain_state
from hvext.lab import cluster as lab_cluster
from hvext.lab import plan
from hvext.pmem import power
from hvext.pmem.store import Store
from tests.vm.conftest import BOOT_TIMEOUT_S, VMFactory
from tests.vm import test_lab_cluster
from tests.vm.test_lab_cluster import pytestmark as cluster_marks
from tests.vm.test_lab_cluster import wait_for, with_leases

pytestmark = [*cluster_marks[:-1], pytest.mark.timeout(900)]  # two boots under TCG

the_lab = test_lab_cluster.the_lab  # this module's own 3-host cluster lab (a module-scoped fixture)

MOUNT = "/mnt/pmem"
RECORDS = f"{MOUNT}/records"


def member_paths(host: lab.LabHost) -> list[str]:
    """The CLI's (hidden) options that point it at *host*'s etcd member and its certificate."""
    lay = lab_cluster.layout(host)
    return ["--state-dir", str(lay.state_dir), "--run-dir", str(lay.run_dir), "--log-dir", str(lay.log_dir)]


def mount_pmem(uri: str, name: str, *, format: bool) -> None:
    """Mount the guest's fsdax namespace (found again: block device names can change) at MOUNT with DAX."""
    if format:
        assert main(["-c", uri, "pmem-mount", name, "pmem0", MOUNT, "--format"]) == 0
        return
    status = subprocess.run([sys.executable, "-m", "hvext.cli.main", "-c", uri, "pmem-list", name, "--json"],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    (blockdev,) = [ns["blockdev"] for ns in json.loads(status.stdout)["guest"] if ns["mode"] == "fsdax"]
    assert main(["-c", uri, "pmem-mount", name, blockdev, MOUNT]) == 0


def test_the_owners_power_loss_moves_the_domain_with_every_durable_record(the_lab: lab.Lab,  # noqa: F811
                                                                          guest_image: object) -> None:
    host1 = the_lab.host(1)
    wait_for("3 host leases", with_leases(host1, ["host1", "host2", "host3"]), timeout=3 * plan.LAB_LEASE_TTL_S)
    shared = paths.STATE_DIR / f"ha-shared-test-{os.getpid()}"
    shared.mkdir(mode=0o700)
    conn1 = Host(host1.uri_unix)
    factory = VMFactory(conn1)
    client = the_lab.cluster_client()
    domain = factory.define(memory_mib=512)
    name = domain.name
    backing = power.volatile_backing_dir(domain) / "nvdimm0.img"
    new_host: lab.LabHost | None = None
    failed = False
    try:
        assert main(["-c", host1.uri_unix, "pmem-attach", name, "--size", "64M", "--type", "nvdimm",
                     "--backing", str(backing)]) == 0
        factory.boot(domain)
        mount_pmem(host1.uri_unix, name, format=True)
        # Refusals first: a directory others can read, and a relative one (nothing registered by them).
        (shared.parent / f"ha-open-{os.getpid()}").mkdir(mode=0o755)
        try:
            for bad in [str(shared.parent / f"ha-open-{os.getpid()}"), "relative/dir"]:
                done = subprocess.run([sys.executable, "-m", "hvext.cli.main", "-c", host1.uri_unix, "ha",
                                       "protect", name, "--host", "host1", "--via-shared-store", bad,
                                       *member_paths(host1)], capture_output=True, text=True, timeout=60)
                assert done.returncode == 1 and done.stderr.startswith("error: "), done.stderr
        finally:
            (shared.parent / f"ha-open-{os.getpid()}").rmdir()
        assert not [r for r in power.registrations() if r.domain == name]
        assert main(["-c", host1.uri_unix, "ha", "protect", name, "--host", "host1", "--via-shared-store",
                     str(shared), *member_paths(host1)]) == 0
        (reg,) = [r for r in power.registrations() if r.domain == name]
        assert Path(reg.store) == shared / name / "nvdimm0" and reg.backing == str(backing)
        wait_for("host1's hvextd to own the domain", lambda: client.owners().get(name, ("",))[0] == "host1",
                 timeout=3 * plan.LAB_LEASE_TTL_S)

        async def start() -> None:
            async with domain.agent() as agent:
                await records.start(agent, RECORDS)
        aio.run(start())
        durable = [0]

        def read_durable() -> int:
            async def read() -> int:
                async with domain.agent(timeout=3) as agent:
                    return (await records.status(agent)).last_durable
            return aio.run(read())
        def progressed() -> bool:
            try:
                return read_durable() >= 200
            except HvextError:  # no status file yet: the writer is starting
                return False
        wait_for("200 durable records", progressed, timeout=120)

        # The owner loses power; until its hvextd pauses the guest, keep reading what the guest saw durable.
        # (The lab's hosts share one /dev/shm: the new owner must write the backing anew from the store,
        # which its new inode shows, rather than use the file host1's QEMU left.)
        inode_before = backing.stat().st_ino
        failing = subprocess.Popen([sys.executable, "-m", "hvext.cli.main", "lab", "fail", "host1", "--power-loss",
                                    "--battery", "8", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        failed = True
        failed_at = time.monotonic()
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                try:
                    durable[0] = max(durable[0], read_durable())
                except (HvextError, OSError):
                    return  # paused (or its host is gone): what it reported last is the bound
        poller = threading.Thread(target=poll)
        poller.start()
        out, err = failing.communicate(timeout=120)
        stop.set()
        poller.join(30)
        assert failing.returncode == 0, err
        assert durable[0] >= 200, durable
        log = (plan.host_run_dir(the_lab.state.run_dir, 1) / "hvextd.log").read_text()
        assert "SIGPWR: power is failing" in log and "handed off to" in log, log[-3000:]

        # Another host claims it, restores the PMEM from the shared store and starts it.
        def survivor() -> str | None:
            owner = client.owners().get(name, ("",))[0]
            return owner if owner in ("host2", "host3") else None
        owner = wait_for("another host to own the domain", survivor, timeout=60)
        new_host = the_lab.host(owner)
        conn_new = Host(new_host.uri_unix)
        try:
            moved = wait_for(f"the domain to run on {owner}", lambda: _active(conn_new, name), timeout=120)
            aio.run(moved.wait_agent(BOOT_TIMEOUT_S))
            rto = time.monotonic() - failed_at
            mount_pmem(new_host.uri_unix, name, format=False)

            async def check() -> records.RecordsCheck:
                async with moved.agent(timeout=60) as agent:
                    return await records.verify(agent, RECORDS)
            found = aio.run(check())
        finally:
            conn_new.close()
        print(f"records durable before the power loss: {durable[0]}, on {owner}: {found.last_valid} "
              f"(contiguous: {found.contiguous}); from the fail to the agent on {owner}: {rto:.1f} s")
        assert found.contiguous and found.last_valid >= durable[0], (found, durable[0])
        failover = client.record(FAILOVER_PREFIX, name)
        assert failover is not None and failover["host"] == owner and failover["complete"] is True, failover
        assert failover["final_host"] == "host1" and str(backing) in failover["restored_generation"], failover
        assert client.record(FINAL_PREFIX, name) is None  # consumed by the start
        assert backing.stat().st_ino != inode_before  # written from the store on the new owner
        # the new owner saves it on power loss now, to the same store
        (reg,) = [r for r in power.registrations() if r.domain == name]
        assert reg.store == str(shared / name / "nvdimm0") and reg.pending is None
        assert Store.open(Path(reg.store)).generation >= failover["restored_generation"][str(backing)]
        status = subprocess.run([sys.executable, "-m", "hvext.cli.main", "ha", "status", name, "--json",
                                 *member_paths(new_host)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        row = json.loads(status.stdout)
        assert row["owner"] == owner and row["pmem"] == "shared-store" and row["failover"]["complete"] is True
    finally:
        try:
            client.unprotect(name)
        except HvextError:
            pass
        client.close()
        if new_host is not None:
            with Host(new_host.uri_unix) as conn:
                try:
                    moved_dom = conn.lookup(name)
                    if moved_dom.is_active():
                        moved_dom.destroy()
                    moved_dom.undefine(remove_state=False)
                except DomainNotFound:
                    pass
        power.unprotect(name, backing, missing_ok=True)
        if failed:  # host1's definition went with its host; hvext's shared state of it stays
            remove_domain_state(name)
            factory.domains.clear()
        else:
            factory.cleanup()
        conn1.close()
        backing.unlink(missing_ok=True)
        try:
            backing.parent.rmdir()
        except OSError:
            pass
        for store in (shared / name).glob("*"):
            Store.remove(store)
        shutil.rmtree(shared, ignore_errors=True)
        the_lab.state = lab.Lab.load().state  # type: ignore[union-attr]


def _active(conn: Host, name: str) -> object | None:
    try:
        dom = conn.lookup(name)
    except DomainNotFound:
        return None
    return dom if dom.is_active() else None
