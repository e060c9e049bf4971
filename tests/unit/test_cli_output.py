"""common.print_result: every command's one way to print its result as JSON (--json) or as text."""

from __future__ import annotations

import json

import pytest
from rich.table import Table

from hvext.cli import common

DATA = {"name": "web-1", "size": 3, "nested": {"b": [1, 2], "a": None}}


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common.console, "width", 200)


def test_json_is_print_json_and_the_text_is_not_made(capsys: pytest.CaptureFixture[str]) -> None:
    made = []
    common.print_result(True, DATA, lambda: made.append(1))
    out = capsys.readouterr().out
    common.print_json(DATA)
    assert out == capsys.readouterr().out == json.dumps(DATA, indent=2, sort_keys=True) + "\n"
    assert made == []


def test_text_returned_is_printed_on_the_console_with_markup(capsys: pytest.CaptureFixture[str]) -> None:
    common.print_result(False, DATA, lambda: f"[bold]{common.literal(DATA['name'])}[/] has {DATA['size']} [red]MiB")
    assert capsys.readouterr().out == "web-1 has 3 MiB\n"


def test_text_that_prints_by_itself_adds_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    def text() -> None:
        common.print_fields({"Name": DATA["name"], "Size": DATA["size"]})

    common.print_result(False, DATA, text)
    out = capsys.readouterr().out
    text()
    assert out == capsys.readouterr().out == "Name: web-1\nSize: 3\n"


def test_a_returned_renderable_is_rendered(capsys: pytest.CaptureFixture[str]) -> None:
    def table() -> Table:
        t = Table("name", "size")
        t.add_row("web-1", "3")
        return t

    common.print_result(False, DATA, table)
    out = capsys.readouterr().out
    common.console.print(table())
    assert out == capsys.readouterr().out and "web-1" in out
