"""Benchmark: failover of a protected guest per failure kind and protection mode: RPO and RTO, beside a cold boot.

Runs on a 3-host cluster lab (`hvext lab up --hosts 3 --cluster`, made and
removed by the run; a lab that is already up is refused, since it may be
someone else's). For each protection mode that this checkout has (restart
only, always; ``--via-shared-store`` when hvext.ha.shared_store exists;
``--replicas 1`` when hvext.ha.replication exists: the run says which it
measured) and each failure kind (``lab fail host1``: abrupt; ``lab fail host1
--power-loss``: the battery path), one run:

* defines a guest on host1 (with a 64 MiB volatile-backed NVDIMM, mounted
  with DAX, for the PMEM modes) and boots it: the **cold boot** (start to
  the agent's answer) of the same guest, measured in the same run;
* PMEM modes: starts the guest's records workload (numbered, checksummed,
  fdatasync'd records, ``hvext_agent.records``) and measures its
  **throughput** for --window s before and after ``hvext ha protect``
  (replication cost: protected / unprotected);
* protects the domain (home host1) and fails host1; until the guest stops,
  reads the last record the guest saw **durable**;
* waits for another host to own the domain and its agent to answer: the
  **RTO**, from the moment the guest stops serving to the agent's answer on
  the new host, split at the claim: the start of the failure (SIGPWR on the
  battery path, where hvextd pauses PMEM guests), but for a guest without
  PMEM on the battery path the host's death at the end of the battery window
  (nothing pauses it before); then reads back the records:
  **recovered** (highest record, all before it intact) and **lost**
  (durable - recovered, the RPO in records);
* unprotects, removes the domain and revives host1 for the next run.

Goals (issue 10): RPO 0 on the battery path; RTO <= lease TTL + cold boot + 5 s;
throughput protected >= 0.85x unprotected. Cases that fail are rows saying why.

    .venv/bin/python bench/ha.py [--quick] [--smoke] [--runs 3] [--modes restart,shared-store,replicas]
        [--kinds abrupt,power-loss] [--battery 8] [--window 5] [--samples FILE] [--plot-dir DIR]

With ``--recovery MIB[,MIB...]`` (C18, ``hvext ha recover``; ``--only-recovery`` skips the failover cases),
per size and run in the same lab: a RAM-file guest on host1, ``ha baseline`` to a private directory
both hosts reach, the guest then writes MIB MiB of fresh random data, and host2 recovers it (fill from
the baseline, pull the pages on host1's dirty lists over the peer transport): **bytes moved vs dirty
bytes** (goal <= 1.05x), the device state apart, and the bytes moved against the guest's RAM.

With ``--failover`` (C17), per run in the same lab: a RAM-file guest's **cold boot** on host1 (start to
the agent's answer), a **live migration** host1 -> host3 (libvirt's downtime, bytes sent), then
``ha protect --standby host2`` on host3 (refresh every second) and a planned ``ha failover``: its
**downtime** (guest paused on host3 to running on host2; and to the agent's answer) and the **bytes sent
at failover** (pages dirtied since the last refresh + device state) against the guest's RAM.

Besides the tables it draws bench/out/ha.png (see bench/plot.py): per mode and
failure kind, the median RTO split into "to the claim" and "claim to agent",
beside the median cold boot.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plot  # noqa: E402  (bench/plot.py, beside this script)
from migrate import spread  # noqa: E402  (bench/migrate.py's min/median/max column)

from hvext import aio, image, paths  # noqa: E402
from hvext.agent import records  # noqa: E402
from hvext.cli.main import main as hvext_main  # noqa: E402
from hvext.errors import DomainNotFound, HvextError  # noqa: E402
from hvext.ha import client as ha_client  # noqa: E402
from hvext.host import Domain, DomainSpec, Host, remove_domain_state  # noqa: E402
from hvext.lab import Lab, LabHost, plan  # noqa: E402
from hvext.lab import cluster as lab_cluster  # noqa: E402
from hvext.memory import ramfile  # noqa: E402
from hvext.pmem import power  # noqa: E402

#: Where a claimer that could not restore a domain's PMEM says so (R2's failover records; None without them).
FAILOVER_PREFIX: str | None = getattr(ha_client, "FAILOVER_PREFIX", None)
MOUNT = "/mnt/pmem"
RECORDS = f"{MOUNT}/records"
KINDS = ("abrupt", "power-loss")
#: Each protection mode: the module that provides it (None: always there) and what protects it.
MODES = {"restart": None, "shared-store": "hvext.ha.shared_store", "replicas": "hvext.ha.replication"}


def available_modes() -> list[str]:
    """The protection modes this checkout has (restart only is always there)."""
    return [m for m, module in MODES.items() if module is None or importlib.util.find_spec(module) is not None]


def member_paths(host: LabHost) -> list[str]:
    """The CLI's (hidden) options that point it at *host*'s etcd member and its certificate."""
    lay = lab_cluster.layout(host)
    return ["--state-dir", str(lay.state_dir), "--run-dir", str(lay.run_dir), "--log-dir", str(lay.log_dir)]


def cli(*argv: str) -> None:
    """hvext's CLI in this process; HvextError when it fails (its `error: ...` is on stderr)."""
    if hvext_main(list(argv)) != 0:
        raise HvextError(f"hvext {' '.join(argv[:4])} ... failed (see stderr)")


def cli_json(*argv: str) -> Any:
    done = subprocess.run([sys.executable, "-m", "hvext.cli.main", *argv], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        raise HvextError(f"hvext {' '.join(argv[:4])} ...: {done.stderr.strip()[:200]}")
    return json.loads(done.stdout)


def mount_pmem(uri: str, name: str, *, format: bool) -> None:
    """Mount the guest's fsdax namespace at MOUNT with DAX (found again after a failover)."""
    if format:
        cli("-c", uri, "pmem-mount", name, "pmem0", MOUNT, "--format")
        return
    listing = cli_json("-c", uri, "pmem-list", name, "--json")
    (blockdev,) = [ns["blockdev"] for ns in listing["guest"] if ns["mode"] == "fsdax"]
    cli("-c", uri, "pmem-mount", name, blockdev, MOUNT)


def wait_for(what: str, probe: Any, timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except HvextError as err:
            last = err
            if time.monotonic() + every >= deadline:
                break
        else:
            if last:
                return last
        time.sleep(every)
    raise HvextError(f"no {what} within {timeout:.0f} s (last: {str(last)[:100]})")


def durable_now(domain: Domain) -> int:
    async def read() -> int:
        async with domain.agent(timeout=3) as agent:
            return (await records.status(agent)).last_durable
    return aio.run(read())


def throughput(domain: Domain, window: float) -> float:
    """Durable records per second the guest's workload makes over *window* s."""
    first, t0 = durable_now(domain), time.monotonic()
    time.sleep(window)
    last, t1 = durable_now(domain), time.monotonic()
    return (last - first) / (t1 - t0)


def _row(mode: str, kind: str, run: int, note: str = "") -> dict[str, Any]:
    return {"mode": mode, "kind": kind, "run": run + 1, "ok": False, "note": note, "boot_s": None,
            "rate_unprotected": None, "rate_protected": None, "durable": None, "recovered": None, "lost": None,
            "rto_s": None, "claim_s": None, "new_host": None}


def run_case(lab: Lab, mode: str, kind: str, run: int, args: argparse.Namespace, memory: int) -> dict[str, Any]:
    """One failover of a freshly booted guest; the row (``ok`` False and a note when it failed)."""
    row = _row(mode, kind, run)
    host1 = lab.host(1)
    name = f"hvext-bench-ha-{os.getpid()}-{mode}-{kind}-{run + 1}"
    conn1 = Host(host1.uri_unix)
    client = lab.cluster_client()
    pmem = mode != "restart"
    shared = paths.STATE_DIR / f"ha-bench-{os.getpid()}"  # the lab hosts share /var/lib/hvext
    backing: Path | None = None
    failed = False
    new_host: LabHost | None = None
    try:
        domain = conn1.define(DomainSpec(name=name, memory_mib=memory))
        if pmem:
            backing = power.volatile_backing_dir(domain) / "nvdimm0.img"
            cli("-c", host1.uri_unix, "pmem-attach", name, "--size", "64M", "--type", "nvdimm",
                "--backing", str(backing))
        started = time.monotonic()
        domain.start()
        aio.run(domain.wait_agent(args.timeout))
        row["boot_s"] = time.monotonic() - started
        protect = ["-c", host1.uri_unix, "ha", "protect", name, "--host", "host1", *member_paths(host1)]
        if pmem:
            mount_pmem(host1.uri_unix, name, format=True)

            async def start_writer() -> None:
                async with domain.agent() as agent:
                    await records.start(agent, RECORDS)
            aio.run(start_writer())
            wait_for("durable records", lambda: durable_now(domain) > 0, 60)
            time.sleep(args.window)  # past the writer's start (Python's imports, the first allocations)
            row["rate_unprotected"] = throughput(domain, args.window)
            if mode == "shared-store":
                shared.mkdir(mode=0o700, exist_ok=True)
                protect += ["--via-shared-store", str(shared)]
            else:
                protect += ["--replicas", "1"]
        cli(*protect)
        wait_for("host1's hvextd to own the domain", lambda: client.owners().get(name, ("",))[0] == "host1",
                 3 * plan.LAB_LEASE_TTL_S)
        if pmem:
            row["rate_protected"] = throughput(domain, args.window)

        fail = [sys.executable, "-m", "hvext.cli.main", "lab", "fail", "host1", "--json"]
        if kind == "power-loss":
            fail += ["--power-loss", "--battery", str(args.battery)]
        durable = [durable_now(domain) if pmem else 0]
        failing = subprocess.Popen(fail, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        failed, failed_at = True, time.monotonic()
        # When the guest stops serving: at once, except a guest without PMEM on the battery path, which
        # nothing pauses: it runs through the battery window and stops when the host dies.
        down_at = failed_at + (args.battery if kind == "power-loss" and not pmem else 0.0)
        stop = threading.Event()

        def poll() -> None:  # until the guest stops: the last record it saw durable
            while pmem and not stop.is_set():
                try:
                    durable[0] = max(durable[0], durable_now(domain))
                except (HvextError, OSError):
                    return
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()

        def survivor() -> str | None:
            owner = client.owners().get(name, ("",))[0]
            return owner if owner in ("host2", "host3") else None
        owner = wait_for("other host owning the domain", survivor, args.battery + 60, every=0.1)
        row["claim_s"] = time.monotonic() - down_at
        new_host = lab.host(owner)
        row["new_host"] = owner
        conn_new = Host(new_host.uri_unix)
        try:
            def running() -> Domain | None:
                failover = client.record(FAILOVER_PREFIX, name) if FAILOVER_PREFIX else None
                if failover and failover.get("error"):  # the claimer could not restore: it will not start it
                    raise RuntimeError(f"{owner} did not start it: {str(failover['error'])[:80]}")
                try:
                    dom = conn_new.lookup(name)
                except DomainNotFound:
                    return None
                return dom if dom.is_active() else None
            moved = wait_for(f"the domain running on {owner}", running, args.timeout)
            aio.run(moved.wait_agent(args.timeout))
            row["rto_s"] = time.monotonic() - down_at
            out, err = failing.communicate(timeout=max(10.0, args.battery + 30))
            stop.set()
            poller.join(30)
            if failing.returncode != 0:
                raise HvextError(f"lab fail: {err.strip()[:120]}")
            if pmem:
                row["durable"] = durable[0]
                try:
                    mount_pmem(new_host.uri_unix, name, format=False)

                    async def check() -> records.RecordsCheck:
                        async with moved.agent(timeout=60) as agent:
                            return await records.verify(agent, RECORDS)
                    found = aio.run(check())
                    row["recovered"] = found.last_valid if found.contiguous else 0
                except HvextError as err:  # nothing usable on the new host's PMEM: every record is lost
                    row["recovered"] = 0
                    row["note"] = f"records unreadable on {owner}: {str(err)[:60]}"
                row["lost"] = max(0, durable[0] - row["recovered"])
        finally:
            conn_new.close()
        row["ok"] = True
    except Exception as err:  # noqa: BLE001  one failed case is a row, the others still run
        row["note"] = f"{type(err).__name__}: {err}"[:120]
    finally:
        try:
            client.unprotect(name)
        except HvextError:
            pass
        client.close()
        for host in ([new_host] if new_host else []) + ([] if failed else [host1]):
            try:
                with Host(host.uri_unix) as conn:
                    dom = conn.lookup(name)
                    if dom.is_active():
                        dom.destroy()
                    dom.undefine(remove_state=False)
            except HvextError:
                pass
        if backing is not None:
            power.unprotect(name, backing, missing_ok=True)
            backing.unlink(missing_ok=True)
            try:
                backing.parent.rmdir()
            except OSError:
                pass
        remove_domain_state(name)
        if mode == "replicas":  # every lab host's replication log and replica image (they share STATE_DIR)
            from hvext.ha import replication
            replication.remove_state(name)
        conn1.close()
        shutil.rmtree(shared, ignore_errors=True)
        if failed:
            lab.revive("host1")
    return row


def _recovery_row(mib: int, run: int, note: str = "") -> dict[str, Any]:
    return {"case": "recovery", "mib": mib, "run": run + 1, "ok": False, "note": note}


def run_recovery(lab: Lab, mib: int, run: int, args: argparse.Namespace) -> dict[str, Any]:
    """C18 once: baseline on host1, *mib* MiB written by the guest, recovery on host2; the row."""
    from hvext.ha import volatile
    row = _recovery_row(mib, run)
    host1, host2 = lab.host(1), lab.host(2)
    name = f"hvext-bench-ha-{os.getpid()}-recovery-{mib}-{run + 1}"
    conn1, conn2 = Host(host1.uri_unix), Host(host2.uri_unix)
    shared = paths.STATE_DIR / f"ha-bench-baseline-{os.getpid()}"  # the lab hosts share /var/lib/hvext
    try:
        domain = conn1.define(DomainSpec(name=name, memory_mib=args.memory))
        ramfile.convert(domain)
        ramfile.start(domain)
        aio.run(domain.wait_agent(args.timeout))
        shared.mkdir(mode=0o700, exist_ok=True)
        volatile.take_baseline(conn1, name, shared, "host1")
        write = ("python3 -c \"import os,time\nb = bytearray(os.urandom(%d << 20))\nopen('/run/w.done','w').write('1')\n"
                 "time.sleep(1e6)\" </dev/null >/dev/null 2>&1 &" % mib)

        async def guest(command: str) -> None:
            async with domain.agent(timeout=120) as agent:
                result = await agent.exec(["sh", "-c", command], timeout=110)
            if result.exitcode != 0:
                raise HvextError(f"the guest's writer did not finish: {result.stderr[:100]}")
        aio.run(guest(write + " for i in $(seq 200); do [ -s /run/w.done ] && exit 0; sleep 0.5; done; exit 1"))
        time.sleep(1.5)  # a refresh of host1's dirty set
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run(["ip", "netns", "exec", host2.netns, sys.executable, "-m", "hvext.cli.main",
                               "-c", host2.uri_unix, "ha", "recover", name, "--dir", str(shared), "--json",
                               *member_paths(host2)], capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise HvextError(done.stderr.strip()[:200])
        result = json.loads(done.stdout)
        row.update({k: result[k] for k in ("dirty_bytes", "pulled_bytes", "wire_bytes", "state_bytes", "ratio",
                                           "fill_s", "pull_s", "start_s", "seconds")})
        row["ram_bytes"] = args.memory << 20
        row["ok"] = True
    except Exception as err:  # noqa: BLE001  one failed case is a row, the others still run
        row["note"] = f"{type(err).__name__}: {err}"[:120]
    finally:
        for conn in (conn2, conn1):
            try:
                dom = conn.lookup(name)
                if dom.is_active():
                    dom.destroy()
                dom.undefine(remove_state=False)
            except HvextError:
                pass
            try:
                ramfile.remove(ramfile.RamFile(ramfile.ram_path(name, conn.host_id), args.memory << 20))
            except (HvextError, OSError):
                pass
        try:
            volatile.forget(conn1, name)
        except HvextError:
            pass
        remove_domain_state(name)
        shutil.rmtree(shared, ignore_errors=True)
        conn1.close()
        conn2.close()
    return row


def _in_host(host: LabHost, *argv: str, timeout: float = 600) -> Any:
    """``hvext ARGV --json`` in a lab host's network namespace (the peer port is open to the lab's hosts
    only), with this source tree; its JSON output."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(["ip", "netns", "exec", host.netns, sys.executable, "-m", "hvext.cli.main",
                           "-c", host.uri_unix, *argv, "--json"], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if done.returncode != 0:
        print(f"hvext {' '.join(argv[:2])} on {host.name} failed:\n{done.stderr}", file=sys.stderr, flush=True)
        raise HvextError(f"hvext {' '.join(argv[:2])}: {done.stderr.strip().splitlines()[-1][:160]}")
    return json.loads(done.stdout)


def run_failover(lab: Lab, run: int, args: argparse.Namespace) -> dict[str, Any]:
    """C17 once: cold boot on host1, live migration to host3, standby host2 and a planned failover; the row."""
    from hvext.ha import standby
    from hvext.migrate import orchestrate
    row: dict[str, Any] = {"case": "failover", "run": run + 1, "ok": False, "note": "", "ram_bytes": args.memory << 20}
    hosts = {i: lab.host(i) for i in (1, 2, 3)}
    conns = {i: Host(h.uri_unix) for i, h in hosts.items()}
    ids = {i: c.host_id for i, c in conns.items()}
    name = f"hvext-bench-ha-{os.getpid()}-failover-{run + 1}"
    try:
        domain = conns[1].define(DomainSpec(name=name, memory_mib=args.memory))
        ramfile.convert(domain)
        started = time.monotonic()
        ramfile.start(domain)
        aio.run(domain.wait_agent(args.timeout))
        row["boot_s"] = time.monotonic() - started
        time.sleep(3)
        result = aio.run(orchestrate.migrate(domain, hosts[3].uri_tls, timeout_s=300))
        row["migration_downtime_s"] = (result.downtime_ms or 0) / 1000
        row["migration_bytes"] = result.bytes_sent or 0
        row["migration_total_s"] = result.total_s
        protected = _in_host(hosts[3], "ha", "protect", name, "--standby", "host2", "--sync-interval", "1",
                             *member_paths(hosts[3]))
        assert protected["state"] == "active"

        def synced() -> bool:
            record = standby.load(ids[3], name)
            return record is not None and record.syncs >= 3
        wait_for("refreshes of the standby copy", synced, 60)
        report = _in_host(hosts[3], "ha", "failover", name)
        returned = time.monotonic()
        moved = conns[2].lookup(name)
        aio.run(moved.wait_agent(args.timeout))
        row["failover_downtime_s"] = report["downtime_s"]  # paused on host3 -> running on host2
        row["failover_agent_s"] = report["downtime_s"] + time.monotonic() - returned  # -> the agent answers
        row["failover_bytes"] = report["bytes_at_failover"]
        row["failover_state_bytes"] = report["state_bytes"]
        row["ok"] = True
    except Exception as err:  # noqa: BLE001  one failed case is a row, the others still run
        row["note"] = f"{type(err).__name__}: {err}"[:120]
    finally:
        for i in (2, 3, 1):
            try:
                dom = conns[i].lookup(name)
                if dom.is_active():
                    dom.destroy()
                dom.undefine(remove_state=False)
            except HvextError:
                pass
            try:
                ramfile.remove(ramfile.RamFile(ramfile.ram_path(name, ids[i]), args.memory << 20))
            except (HvextError, OSError):
                pass
        for path in (standby._path(ids[3], name), standby._path(ids[2], name, "standby-copies")):
            path.unlink(missing_ok=True)
        remove_domain_state(name)
        for conn in conns.values():
            conn.close()
    return row


def report_failover(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    done = [r for r in rows if r["ok"]]
    notes = "; ".join(sorted({r["note"] for r in rows if r["note"]}))
    ram = args.memory << 20
    print(f"\nC17 failover to a standby copy vs a live migration vs a cold boot, guest {args.memory} MiB, "
          f"{len(done)}/{len(rows)} runs; min/median/max{'; ' + notes if notes else ''}")
    print(f"{'':>34} {'downtime s':>18} {'to agent s':>18} {'bytes MiB':>18} {'bytes/RAM':>18}")
    print(f"{'failover (planned, standby)':>34} {spread([r['failover_downtime_s'] for r in done]):>18} "
          f"{spread([r['failover_agent_s'] for r in done]):>18} "
          f"{spread([r['failover_bytes'] / 2**20 for r in done], '{:.1f}'):>18} "
          f"{spread([r['failover_bytes'] / ram for r in done], '{:.4f}x'):>18}")
    print(f"{'live migration (libvirt)':>34} {spread([r['migration_downtime_s'] for r in done]):>18} {'n/a':>18} "
          f"{spread([r['migration_bytes'] / 2**20 for r in done], '{:.1f}'):>18} "
          f"{spread([r['migration_bytes'] / ram for r in done], '{:.4f}x'):>18}")
    print(f"{'cold boot':>34} {spread([r['boot_s'] for r in done]):>18} {spread([r['boot_s'] for r in done]):>18} "
          f"{'n/a':>18} {'n/a':>18}")
    ratios = [r["failover_downtime_s"] / r["boot_s"] for r in done if r["boot_s"]]
    mig = [r["failover_downtime_s"] / r["migration_downtime_s"] for r in done if r["migration_downtime_s"]]
    print(f"failover downtime / cold boot: {spread(ratios, '{:.2f}x')}; / migration downtime: {spread(mig, '{:.1f}x')}")


def report_recovery(rows: list[dict[str, Any]], sizes: list[int], args: argparse.Namespace) -> None:
    print(f"\nC18 recovery (ha baseline on host1, the guest writes N MiB, ha recover on host2): bytes moved vs dirty "
          f"bytes (goal <= 1.05x; device state apart), guest {args.memory} MiB")
    print(f"{'written MiB':>12} {'ok':>4} {'dirty MiB':>18} {'moved MiB':>18} {'moved/dirty':>18} "
          f"{'state MiB':>10} {'moved/RAM':>16} {'pull s':>16} {'total s':>16}  note")
    for mib in sizes:
        case = [r for r in rows if r["mib"] == mib]
        done = [r for r in case if r["ok"]]
        notes = "; ".join(sorted({r["note"] for r in case if r["note"]}))
        print(f"{mib:>12} {len(done)}/{len(case):<2} {spread([r['dirty_bytes'] / 2**20 for r in done], '{:.1f}'):>18} "
              f"{spread([r['wire_bytes'] / 2**20 for r in done], '{:.1f}'):>18} "
              f"{spread([r['ratio'] for r in done], '{:.3f}x'):>18} "
              f"{spread([r['state_bytes'] / 2**20 for r in done], '{:.2f}'):>10} "
              f"{spread([r['wire_bytes'] / r['ram_bytes'] for r in done], '{:.3f}x'):>16} "
              f"{spread([r['pull_s'] for r in done]):>16} {spread([r['seconds'] for r in done]):>16}  {notes}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run per case")
    parser.add_argument("--smoke", action="store_true",
                        help="one case as --quick (tests): the last mode, power-loss (restart only: abrupt)")
    parser.add_argument("--runs", type=int, help="runs per case (default 3, 1 with --quick)")
    parser.add_argument("--modes", help=f"protection modes to measure (default: every one this checkout has, "
                                        f"of {', '.join(MODES)})")
    parser.add_argument("--kinds", default=",".join(KINDS), help="failure kinds: abrupt, power-loss")
    parser.add_argument("--battery", type=float, default=8.0, help="battery window of power-loss, s")
    parser.add_argument("--window", type=float, default=5.0, help="throughput measurement, s")
    parser.add_argument("--memory", type=int, default=512, help="guest RAM, MiB")
    parser.add_argument("--timeout", type=float, default=240.0, help="per boot, s")
    parser.add_argument("--samples", help="write every run's row here (JSON)")
    parser.add_argument("--recovery", default="", metavar="MIB[,MIB...]",
                        help="also C18 recoveries after the guest wrote each of these MiB (bytes moved vs dirty)")
    parser.add_argument("--failover", action="store_true",
                        help="also C17: failover to a standby copy vs a live migration vs a cold boot")
    parser.add_argument("--only-recovery", action="store_true", help="only the --recovery (and --failover) cases")
    plot.add_option(parser)
    args = parser.parse_args(argv)
    have = available_modes()
    modes = args.modes.split(",") if args.modes else have
    kinds = args.kinds.split(",")
    if args.smoke:
        # the richest mode this checkout has, on the failure it is for (restart only: abrupt)
        modes = [modes[-1]]
        kinds = ["abrupt" if modes[0] == "restart" else "power-loss"]
    runs = args.runs or (1 if args.quick or args.smoke else 3)
    sizes = [int(x) for x in args.recovery.split(",") if x]
    if args.only_recovery:
        if not sizes and not args.failover:
            parser.error("--only-recovery needs --recovery MIB[,MIB...] or --failover")
        modes = []
    recovery: list[dict[str, Any]] = []
    failovers: list[dict[str, Any]] = []
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    rows: list[dict[str, Any]] = []
    errors = 0
    lab = None
    print(f"protection modes in this checkout: {', '.join(have)}; measuring: {', '.join(modes)}", flush=True)
    try:
        for mode in modes:
            if mode not in have:
                raise HvextError(f"protection mode {mode!r} is not in this checkout (it has {', '.join(have)})")
            for kind in kinds:
                if kind not in KINDS:
                    raise HvextError(f"failure kind {kind!r}: use {', '.join(KINDS)}")
        os.environ["HVEXT_IMAGE"] = str(image.build().directory)
        if Lab.load() is not None:
            raise HvextError("a lab is already up (maybe someone else's); `hvext lab down` first")
        lab = Lab.up(3, cluster=True)
        for run in range(runs):
            for mode in modes:
                for kind in kinds:
                    row = run_case(lab, mode, kind, run, args, args.memory)
                    errors += not row["ok"]
                    rows.append(row)
                    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            for mib in sizes:
                row = run_recovery(lab, mib, run, args)
                errors += not row["ok"]
                recovery.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            if args.failover:
                row = run_failover(lab, run, args)
                errors += not row["ok"]
                failovers.append(row)
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    except Exception as err:  # noqa: BLE001  no lab, no image, ...: the cases not run are rows saying why
        errors += 1
        done = {(r["mode"], r["kind"], r["run"]) for r in rows}
        rows += [_row(m, k, r, f"not run: {type(err).__name__}: {err}"[:120])
                 for r in range(runs) for m in modes for k in kinds if (m, k, r + 1) not in done]
    finally:
        if lab is not None:
            try:
                lab.down()
            except HvextError as err:
                print(f"lab down failed: {err}", file=sys.stderr)
                errors += 1
    if args.samples:
        Path(args.samples).write_text(json.dumps(rows + recovery + failovers, indent=1))
    if modes:
        report(rows, modes, kinds, runs, args, load_before)
        plot_rto(args.plot_dir, rows, modes, kinds, args.memory)
    if sizes:
        recovery += [_recovery_row(m, r, "not run") for r in range(runs) for m in sizes
                     if not any(x["mib"] == m and x["run"] == r + 1 for x in recovery)]
        report_recovery(recovery, sizes, args)
    if args.failover:
        report_failover(failovers, args)
    return 1 if errors else 0


def report(rows: list[dict[str, Any]], modes: list[str], kinds: list[str], runs: int, args: argparse.Namespace,
           load_before: list[str]) -> None:
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    ttl = plan.LAB_LEASE_TTL_S
    print(f"\n3-host cluster lab, lease TTL {ttl} s, guest {args.memory} MiB (PMEM modes: 64 MiB NVDIMM, DAX), "
          f"battery window {args.battery:.0f} s, {runs} run(s) per case, min/median/max over the runs that "
          f"finished; load average {' '.join(load_before)} before, {' '.join(load_after)} after")
    print("RTO: from the guest's stop (the failure's start; restart on the battery path: the host's death at the "
          "end of the battery window, the guest runs until then) to the agent answering on the new host (claim: "
          "to the new owner's key); cold boot: the same guest's boot on host1 in the same run; goal RTO <= TTL + cold boot + 5 s")
    print("durable: the last record the guest saw durable before it stopped; recovered: the highest record on "
          "the new host with all before it intact; lost = durable - recovered (goal 0 on the battery path)")
    print(f"{'mode':>12} {'failure':>10} {'ok':>4} {'durable':>16} {'recovered':>16} {'lost':>10} "
          f"{'claim s':>15} {'RTO s':>16} {'cold boot s':>16} {'RTO goal':>9}  note")
    for mode in modes:
        for kind in kinds:
            case = [r for r in rows if r["mode"] == mode and r["kind"] == kind]
            done = [r for r in case if r["ok"]]
            goal = [r["rto_s"] <= ttl + r["boot_s"] + 5 for r in done]
            notes = "; ".join(sorted({r["note"] for r in case if r["note"]}))
            pm = mode != "restart"
            print(f"{mode:>12} {kind:>10} {len(done)}/{len(case):<2} "
                  f"{spread([r['durable'] for r in done if pm], '{:.0f}') if pm else 'n/a':>16} "
                  f"{spread([r['recovered'] for r in done if pm], '{:.0f}') if pm else 'n/a':>16} "
                  f"{spread([r['lost'] for r in done if pm], '{:.0f}') if pm else 'n/a':>10} "
                  f"{spread([r['claim_s'] for r in done]):>15} {spread([r['rto_s'] for r in done]):>16} "
                  f"{spread([r['boot_s'] for r in done]):>16} {f'{sum(goal)}/{len(goal)}':>9}  {notes}")
    print("\nreplication cost: the records workload's durable records/s for "
          f"{args.window:.0f} s before and after `ha protect` (goal protected >= 0.85x)")
    print(f"{'mode':>12} {'unprotected/s':>20} {'protected/s':>20} {'ratio':>18}")
    for mode in modes:
        if mode == "restart":
            print(f"{mode:>12} {'n/a: no PMEM workload':>20}")
            continue
        case = [r for r in rows if r["mode"] == mode and r["rate_protected"] is not None]
        ratios = [r["rate_protected"] / r["rate_unprotected"] for r in case if r["rate_unprotected"]]
        print(f"{mode:>12} {spread([r['rate_unprotected'] for r in case]):>20} "
              f"{spread([r['rate_protected'] for r in case]):>20} {spread(ratios, '{:.2f}x'):>18}")


def plot_rto(directory: Path, rows: list[dict[str, Any]], modes: list[str], kinds: list[str], memory: int) -> None:
    """Stacked bars: per case the median time to the claim and from the claim to the agent; the cold boot."""
    bars: dict[str, dict[str, float]] = {}
    notes = []
    for mode in modes:
        for kind in kinds:
            done = [r for r in rows if r["mode"] == mode and r["kind"] == kind and r["ok"]]
            if done:
                claim = statistics.median(r["claim_s"] for r in done)
                bars[f"{mode}, {kind} ({len(done)})"] = {
                    "failure to claim": claim, "claim to agent": statistics.median(r["rto_s"] for r in done) - claim}
            notes += [f"{r['mode']} {r['kind']} run {r['run']}: {r['note']}" for r in rows
                      if r["mode"] == mode and r["kind"] == kind and not r["ok"]]
    boots = [r["boot_s"] for r in rows if r["ok"]]
    if boots:  # last: the legend names the segments of the first bar
        bars[f"cold boot ({len(boots)})"] = {"cold boot": statistics.median(boots)}
    plot.stacked_bars(directory, "ha", f"Failover of a protected {memory} MiB guest: RTO (medians)", bars,
                      ["failure to claim", "claim to agent", "cold boot"],
                      xlabel="seconds from the failure to the guest agent's answer on the new host", notes=notes)


if __name__ == "__main__":
    sys.exit(main())
