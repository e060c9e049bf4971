import pytest

from hvext.errors import UsageError
from hvext.units import GIB, MAX_SIZE, MIB, format_size, parse_size, parse_size_mib


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


def test_parse_size_is_exact_above_2_53() -> None:
    """Float parsing rounded 2**53 + 1 to 2**53: sizes are parsed exactly."""
    assert parse_size(str(2**53 + 1)) == 2**53 + 1


@pytest.mark.parametrize("text", ["9" * 400, "9" * 400 + "G", "1" + "0" * 30, "2E", "1048577T"])
def test_parse_size_refuses_huge_sizes(text: str) -> None:
    """400 digits raised OverflowError (a traceback); anything above MAX_SIZE is a UsageError."""
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


def test_parse_size_bounds() -> None:
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    with pytest.raises(UsageError, match="larger than the maximum"):
        parse_size(str(MAX_SIZE + 1))
    with pytest.raises(UsageError, match="whole number of bytes"):
        parse_size("1.0000000000000001K")  # a float would have rounded this to 1024


def test_parse_size_refuses_non_ascii_digits() -> None:
    with pytest.raises(UsageError, match="invalid size"):
        parse_size("\u0661\u0662M")  # Arabic-Indic digits
