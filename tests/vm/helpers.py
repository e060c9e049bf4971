"""Helpers the real-VM tests share: the CLI run in-process, and programs run in a guest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from hvext import aio
from hvext.cli.main import main
from hvext.host import Domain


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``hvext ARGV`` in this process: (exit status, stdout, stderr)."""
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    status, out, err = cli(capsys, *argv, "--json")
    assert status == 0, err
    return json.loads(out)


def guest_exec(domain: Domain, *argv: str, stdin: str = "", timeout: float = 120) -> dict[str, Any]:
    """Run a program in the guest through the agent; it must exit 0."""
    async def run() -> dict[str, Any]:
        async with domain.agent(timeout=timeout + 10) as agent:
            return asdict(await agent.exec(list(argv), stdin=stdin, timeout=timeout))
    result = aio.run(run())
    assert result["exitcode"] == 0, result
    return result


def guest_sh(domain: Domain, command: str, timeout: float = 120) -> dict[str, Any]:
    return guest_exec(domain, "sh", "-c", command, timeout=timeout)


def protected_pmem_vm(factory: Any, model: str, store: Path) -> Iterator[tuple[Domain, Path]]:
    """A booted guest with a 64 MiB volatile-backed pmem device (*model*) protected by *store*;
    use with ``yield from`` in a fixture: it unprotects and removes the backing afterwards."""
    from hvext.pmem import power
    domain = factory.define(memory_mib=512)
    assert main(["pmem-attach", domain.name, "--size", "64M", "--type", model, "--volatile-backing",
                 "--store", str(store)]) == 0
    (reg,) = [r for r in power.registrations() if r.domain == domain.name]
    factory.boot(domain)
    try:
        yield domain, Path(reg.backing)
    finally:
        power.unprotect(domain.name, Path(reg.backing), remove_store=True, missing_ok=True)
        if domain.is_active():
            domain.destroy()
        Path(reg.backing).unlink(missing_ok=True)
