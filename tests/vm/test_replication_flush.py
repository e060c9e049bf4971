"""C16 on one host: a virtio-pmem guest's flush (fsync) makes the owner cut an epoch at once, long before
its timer would, and the replica holds the flushed bytes (real QEMU with the patch series' flush event,
a real etcd member, a replica listener in this process over real TLS). One guest boot."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from hvext.cli.main import main
from hvext.ha import cluster, replication
from hvext.ha.client import Client, Protection
from hvext.ha.etcd import Layout
from hvext.pmem import power
from tests.unit import test_ha_fence
from tests.unit.test_ha_cluster import free_ports
from tests.vm.helpers import guest_exec

member = test_ha_fence.member  # a one-member etcd for the test, torn down after it

pytestmark = [pytest.mark.timeout(600)]

INTERVAL_S = 60.0  # the timer alone would not cut during the test


def test_a_guest_flush_cuts_an_epoch_that_reaches_the_replica_at_once(vm_factory: object, member: Layout,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    url = cluster.require_member(member).client_url
    creds = member.credentials()

    def factory() -> Client:
        return Client([url], creds)
    client = factory()
    lease = client.grant(120)
    port = free_ports(1)[0]
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    client.register_host("f-own", lease.id)
    client.register_host("f-rep", lease.id, peer=f"127.0.0.1:{port}")
    replica = replication.Manager("f-rep", None, creds, factory, INTERVAL_S, port, "127.0.0.1", state)
    replica.start_server()
    domain = vm_factory.define(memory_mib=512)  # type: ignore[attr-defined]
    backing = power.volatile_backing_dir(domain) / "vpmem0.img"
    rep = None
    try:
        assert main(["pmem-attach", domain.name, "--size", "16M", "--type", "virtio-pmem",
                     "--backing", str(backing)]) == 0
        vm_factory.boot(domain)  # type: ignore[attr-defined]
        pmem = replication.pmem_field(domain, "f-own", list(client.hosts()), 1)
        assert pmem["devices"][0]["model"] == "virtio-pmem" and pmem["replicas"] == ["f-rep"]
        record = Protection(domain.name, "<domain/>", "f-own", time.time(), pmem=pmem)
        assert client.claim(domain.name, "f-own", lease.id)
        rep = replication.Replicator(record, "f-own", None, creds, factory, INTERVAL_S, port, state)
        rep.start()
        image = replication.replica_dir("f-rep", domain.name, state, create=False) / f"{pmem['devices'][0]['name']}.img"

        def wait(condition: object, timeout: float, what: str) -> None:
            deadline = time.monotonic() + timeout
            while not condition():  # type: ignore[operator]
                assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
                time.sleep(0.05)
        wait(lambda: rep.acks["f-rep"].get("epoch", 0) >= 1, 60, "the replica's first (full) epoch")
        wait(lambda: rep.watch is not None and not rep.watch.done(), 30, "the owner following flush events")
        offset = 5 * replication.BLOCK_SIZE + 123
        for seed in (1, 2):
            before = rep.epoch
            data = random.Random(seed).randbytes(3000)
            flushed_at = time.monotonic()
            guest_exec(domain, "python3", "-c",
                       "import os, random\n"
                       f"data = random.Random({seed}).randbytes(3000)\n"
                       "fd = os.open('/dev/pmem0', os.O_RDWR)\n"
                       f"os.pwrite(fd, data, {offset})\n"
                       "os.fsync(fd)\n")

            def on_replica() -> bool:
                with open(image, "rb") as f:
                    f.seek(offset)
                    return rep.acks["f-rep"].get("epoch", 0) > before and f.read(len(data)) == data
            wait(on_replica, 20, "the flushed bytes on the replica")
            print(f"flush {seed}: on the replica {time.monotonic() - flushed_at:.2f} s after the guest began "
                  f"(epoch interval {INTERVAL_S:.0f} s)")
        assert rep.flush_cuts >= 2
    finally:
        if rep is not None:
            rep.stop()
        replica.close()
        client.revoke(lease.id)
        client.close()
        if domain.is_active():
            domain.destroy()
        backing.unlink(missing_ok=True)
        replication.remove_state(domain.name, state)
        try:
            os.rmdir(backing.parent)
        except OSError:
            pass
