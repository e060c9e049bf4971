"""What QEMU answers is untrusted: hvext's QMP callers validate replies into values or QMPError."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hvext import aio
from hvext.pmem import power


class ScriptedQMP:
    """A QMP session that answers each command with a fixed (possibly malformed) reply."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.executed: list[str] = []

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        self.executed.append(command)
        return self.replies[command]


class QMPDomain:
    name = "vm"

    def __init__(self, session: ScriptedQMP) -> None:
        self.session = session

    @contextlib.asynccontextmanager
    async def qmp(self) -> AsyncIterator[ScriptedQMP]:
        yield self.session


@pytest.mark.parametrize("reply", [None, {"name": "x"}, [{"nam": "x"}], [{"name": 5}], ["x"], [[]]])
def test_a_malformed_query_commands_reply_means_no_dirty_log(reply: Any) -> None:
    session = ScriptedQMP({"query-commands": reply})
    assert aio.run(power._start_log(QMPDomain(session))) is None  # type: ignore[arg-type]
    assert session.executed == ["query-commands"]
