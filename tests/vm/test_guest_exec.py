"""guest-exec on a real guest: output of any size comes back promptly, cut to the agent channel's
line limit and marked as cut (before, a large output was dropped by the host and the command timed out)."""

from __future__ import annotations

import json
import time


from hvext import aio
from hvext.agent.protocol import MAX_LINE
from hvext.host import Domain
from tests.vm.helpers import cli

TWO_MB = "import sys; sys.stdout.write('x' * 2_000_000); sys.stderr.write('\\x1b[2J' * 100_000)"


def test_two_megabytes_of_output_come_back_cut_and_marked(booted_vm: Domain, capsys) -> None:
    started = time.monotonic()
    status, out, err = cli(capsys, "guest-exec", "--timeout", "60", booted_vm.name, "--", "python3", "-c", TWO_MB)
    assert time.monotonic() - started < 45, "guest-exec waited for a reply the host had dropped"
    assert status == 0, err
    assert 50_000 < len(out) < MAX_LINE and set(out) == {"x"}
    assert "stdout truncated" in err and "stderr truncated" in err, err[-300:]

    async def direct() -> None:
        async with booted_vm.agent(timeout=30) as agent:
            result = await agent.exec(["python3", "-c", TWO_MB], timeout=60)
        assert result.exitcode == 0 and result.stdout_truncated and result.stderr_truncated
        assert result.stdout_bytes == 2_000_000 and result.stderr_bytes == 400_000
        assert len(json.dumps(result.stdout)) + len(json.dumps(result.stderr)) < MAX_LINE  # both fit, escaped
    aio.run(direct())


def test_json_gives_the_exit_code_and_both_streams(booted_vm: Domain, capsys) -> None:
    status, out, err = cli(capsys, "guest-exec", "--json", booted_vm.name, "--",
                           "sh", "-c", "printf 'out\\n'; printf 'err' >&2; exit 3")
    assert status == 3, err
    assert json.loads(out) == {"exitcode": 3, "stdout": "out\n", "stderr": "err",
                               "stdout_truncated": False, "stderr_truncated": False,
                               "stdout_bytes": 4, "stderr_bytes": 3}
