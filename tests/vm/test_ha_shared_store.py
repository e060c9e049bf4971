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
from pathlib import Path

import pytest

from hvext import lab, paths
from hvext.cli.main import main
from hvext.errors import HvextError
from hvext.ha.client import FAILOVER_PREFIX, FINAL_PREFIX
from hvext.host import Host, remove_domain_state
from hvext.lab import plan
from hvext.pmem import power
from hvext.pmem.store import Store
from tests.vm.conftest import VMFactory
from tests.vm.ha_failover import (member_paths, moved_to, mount_pmem, power_loss, remove_moved, start_records,
                                  survivor)
from tests.vm import test_lab_cluster
from tests.vm.test_lab_cluster import pytestmark as cluster_marks
from tests.vm.test_lab_cluster import wait_for, with_leases

pytestmark = [*cluster_marks[:-1], pytest.mark.timeout(900)]  # two boots under TCG

the_lab = test_lab_cluster.the_lab  # this module's own 3-host cluster lab (a module-scoped fixture)

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

        start_records(domain)

        # The owner loses power; until its hvextd pauses the guest, keep reading what the guest saw durable.
        # (The lab's hosts share one /dev/shm: the new owner must write the backing anew from the store,
        # which its new inode shows, rather than use the file host1's QEMU left.)
        inode_before = backing.stat().st_ino
        failed = True
        loss = power_loss(the_lab, domain)
        assert loss.durable >= 200, loss
        log = loss.owner_log
        assert "SIGPWR: power is failing" in log and "handed off to" in log, log[-3000:]

        # Another host claims it, restores the PMEM from the shared store and starts it.
        new_host = survivor(the_lab, client, name)
        owner = new_host.name
        moved = moved_to(new_host, name, loss.failed_at)
        found = moved.found
        print(f"records durable before the power loss: {loss.durable}, on {owner}: {found.last_valid} "
              f"(contiguous: {found.contiguous}); from the fail to the agent on {owner}: {moved.rto:.1f} s")
        assert found.contiguous and found.last_valid >= loss.durable, (found, loss.durable)
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
        remove_moved(new_host, name)
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

