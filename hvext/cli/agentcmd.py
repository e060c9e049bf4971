"""Guest-agent commands: agent-ping, guest-exec."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

from hvext import aio
from hvext.agent.client import ExecResult
from hvext.cli import common
from hvext.errors import UsageError
from hvext.host import Domain


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("agent-ping", help="check that the hvext agent in the guest answers")
    common.add_domain(p)
    p.add_argument("--timeout", type=common.seconds, default=10.0, metavar="SECONDS")
    common.add_json(p)
    p.set_defaults(func=cmd_agent_ping)

    p = commands.add_parser("guest-exec", help="run a program in the guest through the agent (like qemu-ga's guest-exec)")
    common.add_domain(p)
    p.add_argument("--timeout", type=common.seconds, default=60.0, metavar="SECONDS")
    common.add_json(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- PROGRAM [ARGS]")
    p.set_defaults(func=cmd_guest_exec)


async def ping(domain: Domain, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    async with domain.agent(timeout=timeout) as agent:
        synced = time.monotonic()
        await agent.ping()
        done = time.monotonic()
        info = await agent.info()
    return {"agent_version": agent.agent_version, "handshake_ms": round((synced - started) * 1000, 2),
            "ping_ms": round((done - synced) * 1000, 2), "kernel": info.kernel, "uptime_s": info.uptime_s}


def cmd_agent_ping(args: argparse.Namespace) -> int:
    with common.open_domain(args) as dom:
        result = aio.run(ping(dom, args.timeout))
    common.print_result(args.json, result, lambda: (
        f"agent {common.literal(result['agent_version'])} of '{dom.name}' answered in {result['ping_ms']} ms "
        f"(handshake {result['handshake_ms']} ms)"))
    return 0


async def guest_exec(domain: Domain, argv: list[str], timeout: float) -> ExecResult:
    async with domain.agent(timeout=timeout + 10) as agent:
        return await agent.exec(argv, timeout=timeout)


def cmd_guest_exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UsageError("give the program to run after --, e.g. hvext guest-exec vm -- uname -r")
    with common.open_domain(args) as dom:
        result = aio.run(guest_exec(dom, argv, args.timeout))
    status = result.exitcode if 0 <= result.exitcode < 256 else 1
    if args.json:  # exit code, output and whether (and from how many bytes) each stream was cut
        common.print_json(dataclasses.asdict(result))
        return status
    for stream, text in ((sys.stdout, result.stdout), (sys.stderr, result.stderr)):
        # on a terminal, the guest's escape sequences are shown, not acted on; piped output is left as is
        stream.write(common.literal(text, markup=False, keep="\n\t") if stream.isatty() else text)
    for name, cut, kept, total in (("stdout", result.stdout_truncated, result.stdout, result.stdout_bytes),
                                   ("stderr", result.stderr_truncated, result.stderr, result.stderr_bytes)):
        if cut:
            print(f"hvext: {name} truncated to its last {len(kept)} characters of {total} bytes "
                  "(the agent channel's line limit)", file=sys.stderr)
    return status
