"""Benchmark: plain vs auto live migration for guests dirtying memory at 0 %, 50 % and 200 % of the link.

Runs on a 2-host lab (`hvext lab`), with the migration bandwidth capped so the
200 % case exists on one machine. One guest is booted and migrated back and
forth; before each migration the agent's stress workload is set to the case's
dirty rate. Reports converged (within --timeout), total time, downtime, bytes
sent, and total time / (RAM / bandwidth), the physical limit.

    .venv/bin/python bench/migrate.py [--quick] [--bandwidth 32] [--timeout 120]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvext import aio, image  # noqa: E402
from hvext.errors import HvextError  # noqa: E402
from hvext.host import Domain, DomainSpec, Host  # noqa: E402
from hvext.lab import Lab  # noqa: E402
from hvext.migrate import orchestrate  # noqa: E402

MIB = 1 << 20


async def set_stress(domain: Domain, rate_mib: float, wss_mib: int) -> None:
    async with domain.agent() as agent:
        await agent.request("stress-stop")
        if rate_mib > 0:
            await agent.request("stress-start", {"rate_mib_s": rate_mib, "wss_mib": wss_mib})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB guest and a 60 s timeout")
    parser.add_argument("--smoke", action="store_true", help="one case (0 %%, auto) as in --quick (tests)")
    parser.add_argument("--bandwidth", type=int, default=32, help="migration bandwidth cap, MiB/s")
    parser.add_argument("--timeout", type=float, default=120.0, help="converged = done within this")
    parser.add_argument("--memory", type=int, default=512, help="guest RAM, MiB")
    args = parser.parse_args(argv)
    memory = 256 if args.quick or args.smoke else args.memory
    timeout = 60.0 if args.quick or args.smoke else args.timeout
    cases = [(0.0, "auto")] if args.smoke else [(f, p) for f in (0.0, 0.5, 2.0) for p in ("plain", "auto")]
    limit_s = memory / args.bandwidth
    name = f"hvext-bench-migrate-{os.getpid()}"
    rows = []
    errors = 0
    existing, lab, hosts = None, None, []
    try:
        # one image for the whole run, even if the guest files change meanwhile
        os.environ["HVEXT_IMAGE"] = str(image.build().directory)
        existing = Lab.load()
        lab = Lab.up(2)
        hosts = [Host(h.uri_unix) for h in lab.hosts]
        uris = [h.uri_tcp for h in lab.hosts]
        domain = hosts[0].define(DomainSpec(name, memory_mib=memory))
        domain.start()
        aio.run(domain.wait_agent(240))
        where = 0
        for fraction in (0.0, 0.5, 2.0):
            for policy in ("plain", "auto"):
                if (fraction, policy) not in cases:
                    continue
                rate = fraction * args.bandwidth
                aio.run(set_stress(domain, rate, int(memory * 0.6)))
                time.sleep(3)
                started = time.monotonic()
                try:
                    result = aio.run(orchestrate.migrate(domain, uris[1 - where], policy=policy,
                                                         bandwidth_mib=args.bandwidth, timeout_s=timeout))
                    where = 1 - where
                    domain = hosts[where].lookup(name)
                    rows.append((f"{fraction:.0%}", policy, "yes", result.total_s, result.downtime_ms,
                                 (result.bytes_sent or 0) / MIB, result.total_s / limit_s,
                                 "post-copy" if result.postcopy_switch else ""))
                except HvextError as err:
                    rows.append((f"{fraction:.0%}", policy, "no", time.monotonic() - started, None, None,
                                 None, "aborted, source kept running" if "did not converge" in str(err)
                                 else str(err)[:80]))
                    domain = hosts[where].lookup(name)
                print(rows[-1], flush=True)
    except Exception as err:  # noqa: BLE001  no lab, no guest, ...: the cases not run are rows saying why
        errors += 1
        for fraction, policy in cases[len(rows):]:
            rows.append((f"{fraction:.0%}", policy, "no", 0.0, None, None, None,
                         f"not run: {type(err).__name__}: {err}"[:100]))
    finally:
        for host in hosts:
            try:
                dom = host.lookup(name)
                if dom.is_active():
                    dom.destroy()
                dom.undefine()
            except HvextError:
                pass
            host.close()
        if lab is not None and existing is None:
            try:
                lab.down()
            except HvextError as err:
                print(f"lab down failed: {err}", file=sys.stderr)
                errors += 1
    print(f"\nguest {memory} MiB, bandwidth cap {args.bandwidth} MiB/s, physical limit RAM/bandwidth "
          f"{limit_s:.1f} s, converged = done within {timeout:.0f} s")
    print(f"{'dirty/bw':>8} {'policy':>6} {'conv':>5} {'total s':>8} {'downtime ms':>11} {'sent MiB':>9} "
          f"{'total/limit':>11}  note")
    for fraction, policy, converged, total, downtime, sent, ratio, note in rows:
        print(f"{fraction:>8} {policy:>6} {converged:>5} {total:8.1f} {downtime if downtime is not None else '-':>11} "
              f"{f'{sent:.0f}' if sent is not None else '-':>9} {f'{ratio:.2f}x' if ratio else '-':>11}  {note}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
