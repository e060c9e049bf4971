"""``hvext hugepages`` refuses inconsistent options before touching any domain (error: ..., exit 1)."""

from __future__ import annotations

import pytest

from hvext.cli.main import main


@pytest.mark.parametrize("argv, message", [
    (["--budget", "3"], "--budget needs --apply"),
    (["--apply"], "--apply needs --budget"),
    (["--watch", "2", "--seconds", "1"], "drop --seconds"),
    (["--count", "2"], "--count needs --watch"),
])
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hugepages", "no-such-domain", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
