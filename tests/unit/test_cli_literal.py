"""Text from a guest or QEMU reaches the terminal as itself: no rich markup, no escape sequences."""

from __future__ import annotations

import argparse

import pytest

from hvext.cli import agentcmd, common, main
from hvext.errors import AgentError

HOSTILE = "[bold]kernel[/bold] [link=http://x]y[/link] :warning: \x1b]0;title\x07\x1b[2J\x9b31m\u202eevil\r\n"


def test_literal_escapes_markup_and_shows_control_characters() -> None:
    text = common.literal(HOSTILE, markup=False)
    assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text and "\u202e" not in text
    assert "\r" not in text and "\n" not in text
    assert "\\x1b]0;title\\x07" in text and "\\x1b[2J" in text and "\\x9b" in text and "\\u202e" in text
    assert common.literal("a\tb\nc", markup=False, keep="\n\t") == "a\tb\nc"
    assert common.literal("\ud800", markup=False) == "\\ud800"  # a lone surrogate cannot even be encoded
    assert common.literal(5) == "5"


def test_table_fields_and_lines_print_guest_text_literally(capsys) -> None:
    common.print_table("t", ["kernel"], [[HOSTILE]])
    common.print_fields({"Kernel": HOSTILE})
    common.console.print(f"agent: {common.literal(HOSTILE)}")
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out and "\u202e" not in out
    assert out.count("[bold]kernel[/bold]") == 3 and out.count("[link=http://x]") == 3
    assert out.count(":warning:") == 3  # no emoji substitution either
    assert out.count("\\x1b]0;title\\x07") == 3 and out.count("\\x1b[2J") == 3


def test_error_line_from_the_guest_is_printed_literally(monkeypatch, capsys) -> None:
    def hostile(args: argparse.Namespace) -> int:
        raise AgentError(f"agent command 'info' failed: Evil: {HOSTILE}")
    monkeypatch.setattr(agentcmd, "cmd_agent_ping", hostile)
    assert main.main(["agent-ping", "vm"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: agent command") and err.endswith("\n") and err.count("\n") == 1
    assert "\x1b" not in err and "\x07" not in err and "\\x1b[2J" in err and "[bold]kernel" in err


@pytest.mark.parametrize("raw", [
    {"namespaces": [{"namespace": 5, "size": "big", "mount": "x"}, 7, {"size": 10 ** 30, "mount": {"dax": 1}}]},
    {"namespaces": [{"namespace": "namespace0.0", "mode": "fsdax", "size": 1 << 26, "blockdev": "pmem0",
                     "mount": {"mountpoint": "/mnt/pm", "fstype": "ext4", "dax": True}}]},
])
def test_guest_pmem_namespaces_are_checked_before_printing(raw, capsys) -> None:
    from hvext.agent.client import pmem_namespaces
    from hvext.units import format_size
    namespaces = pmem_namespaces(raw)
    for n in namespaces:
        assert n["size"] is None or isinstance(n["size"], int)
        format_size(n["size"] or 0)
    with pytest.raises(AgentError):
        pmem_namespaces({"namespaces": "none"})
