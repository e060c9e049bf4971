"""The failover steps the HA lab tests share (tests/vm/test_ha_*.py): a guest writing durable records on
its DAX-mounted PMEM, the owner's power loss while the durable count is followed, and the domain found
running on a survivor with its records read back."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from hvext import aio, lab
from hvext.agent import records
from hvext.cli.main import main
from hvext.errors import DomainNotFound, HvextError
from hvext.ha.client import Client
from hvext.host import Domain, Host
from hvext.lab import cluster as lab_cluster
from hvext.lab import plan
from tests.vm.conftest import BOOT_TIMEOUT_S
from tests.vm.test_lab_cluster import wait_for

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


def active(conn: Host, name: str) -> Domain | None:
    """Domain *name* on *conn* if it has a QEMU process, else None."""
    try:
        dom = conn.lookup(name)
    except DomainNotFound:
        return None
    return dom if dom.is_active() else None


def read_durable(domain: Domain) -> int:
    """The last record the guest's records writer reported durable."""
    async def read() -> int:
        async with domain.agent(timeout=3) as agent:
            return (await records.status(agent)).last_durable
    return aio.run(read())


def start_records(domain: Domain, at_least: int = 200) -> None:
    """Start the guest's records writer on MOUNT and wait until *at_least* records are durable."""
    async def start() -> None:
        async with domain.agent() as agent:
            await records.start(agent, RECORDS)
    aio.run(start())

    def progressed() -> bool:
        try:
            return read_durable(domain) >= at_least
        except HvextError:  # no status file yet: the writer is starting
            return False
    wait_for(f"{at_least} durable records", progressed, timeout=120)


@dataclass
class PowerLoss:
    durable: int       # the last record the guest reported durable before it stopped
    failed_at: float   # time.monotonic() when the fail began
    owner_log: str     # the failed host's hvextd log, read after the kill


def power_loss(the_lab: lab.Lab, domain: Domain, host: int = 1, battery: float = 8) -> PowerLoss:
    """``lab fail HOST --power-loss --battery B`` (returns after the kill); until the owner's hvextd pauses
    the guest, the durable count is read."""
    durable = [0]
    failing = subprocess.Popen([sys.executable, "-m", "hvext.cli.main", "lab", "fail", f"host{host}",
                                "--power-loss", "--battery", str(battery), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failed_at = time.monotonic()
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                durable[0] = max(durable[0], read_durable(domain))
            except (HvextError, OSError):
                return  # paused (or its host is gone): what it reported last is the bound
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        _, err = failing.communicate(timeout=120)
    finally:
        stop.set()
        poller.join(30)
    assert failing.returncode == 0, err
    log = (plan.host_run_dir(the_lab.state.run_dir, host) / "hvextd.log").read_text()
    return PowerLoss(durable[0], failed_at, log)


@dataclass
class Moved:
    rto: float                 # from the fail to the agent answering on the new host, s
    found: records.RecordsCheck


def survivor(the_lab: lab.Lab, client: Client, name: str, survivors: tuple[str, ...] = ("host2", "host3")
             ) -> lab.LabHost:
    """The survivor that owns domain *name* (waited for)."""
    def owner() -> str | None:
        found = client.owners().get(name, ("",))[0]
        return found if found in survivors else None
    return the_lab.host(wait_for("a survivor to own the domain", owner, timeout=60))


def moved_to(new_host: lab.LabHost, name: str, failed_at: float) -> Moved:
    """Wait for domain *name* to run on *new_host* and its agent to answer; mount its PMEM and read its
    records back."""
    with Host(new_host.uri_unix) as conn:
        dom = wait_for(f"the domain to run on {new_host.name}", lambda: active(conn, name), timeout=120)
        aio.run(dom.wait_agent(BOOT_TIMEOUT_S))
        rto = time.monotonic() - failed_at
        mount_pmem(new_host.uri_unix, name, format=False)

        async def check() -> records.RecordsCheck:
            async with dom.agent(timeout=60) as agent:
                return await records.verify(agent, RECORDS)
        found = aio.run(check())
    return Moved(rto, found)


def remove_moved(host: lab.LabHost | None, name: str) -> None:
    """Destroy and undefine domain *name* on *host* (a survivor), keeping hvext's shared state."""
    if host is None:
        return
    with Host(host.uri_unix) as conn:
        try:
            dom = conn.lookup(name)
            if dom.is_active():
                dom.destroy()
            dom.undefine(remove_state=False)
        except DomainNotFound:
            pass
