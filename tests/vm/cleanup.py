"""Remove test domains left by interrupted runs (``python -m tests.vm.cleanup``)."""

from __future__ import annotations

import os
import re

from hvext.host import Host

TEST_NAME = re.compile(r"^hvext-test-(\d+)-[A-Za-z0-9_-]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_test_domains(host: Host, *, all_runs: bool = False) -> list[str]:
    """Destroy and undefine ``hvext-test-<pid>-<n>`` domains whose test process is gone."""
    removed = []
    for domain in host.domains():
        match = TEST_NAME.match(domain.name)
        if not match or (not all_runs and _alive(int(match.group(1)))):
            continue
        if domain.is_active():
            domain.destroy()
        domain.undefine()
        removed.append(domain.name)
    return removed


if __name__ == "__main__":
    with Host() as connection:
        for name in remove_stale_test_domains(connection, all_runs=True):
            print(f"removed {name}")
