"""C16 on a 3-host cluster lab: a guest protected ``--replicas 2`` writes durable records on its
DAX-mounted NVDIMM; hvextd replicates its PMEM in epochs to the two other hosts; its owner loses power
(``lab fail OWNER --power-loss``) and its copy of the PMEM is wiped; the domain then runs on a replica host,
restored from that host's replica image, with every record the guest reported durable (RPO 0). After the final
epoch the owner hands the domain to a replica holding it (claimed on battery, not after the owner's lease).

The lab hosts share ``/dev/shm``, so the owner's backing and the new owner's are the same *path*: the owner's
copy is wiped through a descriptor of its own file (inode), never through the path, which may already name the
file the new owner restored (an earlier version unlinked the path after the kill: with the hand-off that
deleted the new owner's backing). ``/hvext/final/<domain>`` is consumed by the new owner once
the domain runs, so the final epoch is read from the owner's log and checked in the failover record.

Two guest boots (the owner's, the survivor's). Run under ``flock /work/notes/lab.lock`` (one lab per machine).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from hvext import lab
from hvext.cli.main import main
from hvext.errors import HvextError
from hvext.ha import replication
from hvext.ha.client import FAILOVER_PREFIX, FINAL_PREFIX
from hvext.host import Host, remove_domain_state
from hvext.lab import plan
from hvext.pmem import power
from tests.vm.conftest import VMFactory
from tests.vm.ha_failover import (member_paths, moved_to, mount_pmem, power_loss, remove_moved, start_records,
                                  survivor)
from tests.vm import test_lab_cluster
from tests.vm.test_lab_cluster import pytestmark as cluster_marks
from tests.vm.test_lab_cluster import wait_for, with_leases

pytestmark = [*cluster_marks[:-1], pytest.mark.timeout(900)]  # two boots under TCG

the_lab = test_lab_cluster.the_lab  # this module's own 3-host cluster lab (a module-scoped fixture)


def test_the_owners_power_loss_moves_the_domain_to_a_replica_with_every_durable_record(
        the_lab: lab.Lab, guest_image: object) -> None:  # noqa: F811
    host1 = the_lab.host(1)
    wait_for("3 host leases", with_leases(host1, ["host1", "host2", "host3"]), timeout=3 * plan.LAB_LEASE_TTL_S)
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
        assert main(["-c", host1.uri_unix, "ha", "protect", name, "--host", "host1", "--replicas", "2",
                     *member_paths(host1)]) == 0
        wait_for("host1's hvextd to own the domain", lambda: client.owners().get(name, ("",))[0] == "host1",
                 timeout=3 * plan.LAB_LEASE_TTL_S)

        def acked_by_both() -> bool:
            progress = client.record(replication.REPLICATION_PREFIX, name) or {}
            acks = progress.get("replicas", {})
            return len(acks) == 2 and all(a.get("epoch", 0) >= 1 for a in acks.values())
        wait_for("both replicas to acknowledge the first (full) epoch", acked_by_both, timeout=120)

        start_records(domain)
        # host1's etcd member leads: the harder case, since its death at the end of the battery window would
        # stall the survivors' renewals (and fence the domain just handed to one) unless it steps down first.

        def leader() -> str:
            lead = str(client.status()["leader"])
            return next(str(m["name"]) for m in client.members() if str(m["ID"]) == lead)
        if leader() != "host1":
            client.move_leader_off(leader(), prefer=["host1"])
        wait_for("host1's etcd member to lead", lambda: leader() == "host1", timeout=30)
        status = subprocess.run([sys.executable, "-m", "hvext.cli.main", "ha", "status", name, "--json",
                                 *member_paths(host1)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        row = json.loads(status.stdout)
        assert row["pmem"] == "replicas" and {r["host"] for r in row["replication"]["replicas"]} == {"host2", "host3"}
        assert row["replication"]["epoch_local"] >= 2, row

        # The owner's own copy (this inode, whatever the path names later), to wipe once its host is dead.
        owner_copy = os.open(backing, os.O_RDWR | os.O_NOFOLLOW)
        owner_inode = os.fstat(owner_copy).st_ino
        # The owner loses power; until its hvextd pauses the guest, keep reading what the guest saw durable.
        failed = True
        loss = power_loss(the_lab, domain)
        # The owner's copy goes with its host (its QEMU is dead now): only a replica can bring it back.
        try:
            size = os.fstat(owner_copy).st_size
            os.ftruncate(owner_copy, 0)
            os.ftruncate(owner_copy, size)
        finally:
            os.close(owner_copy)
        owner_at_kill = client.owners().get(name, ("",))[0]
        assert loss.durable >= 200, loss
        log = loss.owner_log
        assert "SIGPWR: power is failing" in log, log[-3000:]
        battery = re.search(rf"power loss: {re.escape(name)}: final epoch (\d+), acknowledged by (\{{.*\}})", log)
        assert battery is not None, log[-3000:]
        final_epoch = int(battery.group(1))
        assert all(epoch == final_epoch for epoch in json.loads(battery.group(2).replace("'", '"')).values()), \
            battery.group(0)
        assert "power loss: etcd leadership moved from this host's member to" in log, log[-3000:]
        handed = re.search(rf"replicated domain {re.escape(name)}: final epoch {final_epoch} on (host[23]): "
                           "stopped and handed off", log)
        assert handed is not None, log[-3000:]  # the early hand-off: claimed on battery, not after the lease

        new_host = survivor(the_lab, client, name)
        owner = new_host.name
        moved = moved_to(new_host, name, loss.failed_at)
        found, rto, durable = moved.found, moved.rto, loss.durable
        print(f"records durable before the power loss: {durable}, on {owner}: {found.last_valid} "
              f"(contiguous: {found.contiguous}); from the fail to the agent on {owner}: {rto:.1f} s; "
              f"handed off to {handed.group(1)}, owner when the battery ran out: {owner_at_kill or 'none'}")
        assert owner == handed.group(1), (owner, handed.group(0))
        assert found.contiguous and found.last_valid >= durable, (found, durable)
        failover = client.record(FAILOVER_PREFIX, name)
        assert failover is not None and failover["host"] == owner and failover["complete"] is True, failover
        assert failover["final_host"] == "host1" and failover["restored_epoch"] == final_epoch, failover
        assert str(failover["action"]).startswith("restored from this host's replica"), failover
        assert os.stat(backing).st_ino != owner_inode  # the new owner runs on its own restored file
        assert client.record(FINAL_PREFIX, name) is None  # consumed by the new owner once it ran
        # The new owner replicates on (a new stream) to the remaining replica.
        other = ({"host2", "host3"} - {owner}).pop()

        def replicating() -> bool:
            progress = client.record(replication.REPLICATION_PREFIX, name) or {}
            return progress.get("owner") == owner and progress.get("replicas", {}).get(other, {}).get(
                "epoch", 0) > final_epoch
        wait_for(f"{owner} to replicate to {other}", replicating, timeout=120)
    finally:
        try:
            client.unprotect(name)
        except HvextError:
            pass
        client.close()
        remove_moved(new_host, name)
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
        replication.remove_state(name)
        the_lab.state = lab.Lab.load().state  # type: ignore[union-attr]
