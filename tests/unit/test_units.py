import pytest

from hvext.errors import UsageError
from hvext.units import GIB, MIB, format_size, parse_size, parse_size_mib


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 * MIB), ("2G", 2 * GIB), ("1.5GiB", 1536 * MIB), ("4096", 4096), ("64k", 64 * 1024),
    ("1 GiB", GIB), ("3MB", 3 * MIB), ("7b", 7),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1G", "12Q", "1.5", "GiB", "1..5G", "5iB", "0x10"])
def test_parse_size_rejects_nonsense(text: str) -> None:
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


def test_parse_size_mib_defaults_to_mib_and_refuses_remainders() -> None:
    assert parse_size_mib("512") == 512
    assert parse_size_mib("1.5G") == 1536
    with pytest.raises(UsageError, match="whole number of MiB"):
        parse_size_mib("1000K")


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536 * MIB) == "1.50 GiB"
