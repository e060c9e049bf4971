"""Parsing and formatting of memory sizes as users write them (``512M``, ``1.5GiB``)."""

from __future__ import annotations

import re
from fractions import Fraction

from hvext.errors import UsageError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE | re.ASCII)
_MULTIPLIER = {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": TIB}
#: The largest size hvext accepts (1 EiB): far above any host, yet every size fits a signed 64-bit field.
MAX_SIZE = 1 << 60
#: Longer size strings are refused before any arithmetic (a size has no business being longer).
MAX_SIZE_TEXT = 64


def parse_size(text: str, *, default_unit: str = "") -> int:
    """Return the number of bytes in *text*.

    Units are binary, as in virsh and QEMU: ``K``/``KiB``/``KB`` mean 1024.
    A bare number is in *default_unit* (``""`` bytes, ``"M"`` MiB, ...).
    The number is parsed exactly (no float rounding), and at most
    :data:`MAX_SIZE` bytes are accepted. Raises :class:`UsageError` for
    anything else, negative or fractional bytes.
    """
    if not isinstance(text, str):
        text = str(text)
    if len(text) > MAX_SIZE_TEXT:
        raise UsageError(f"invalid size {text[:20]!r}...: longer than {MAX_SIZE_TEXT} characters")
    match = _SIZE_RE.match(text)
    if not match:
        raise UsageError(
            f"invalid size {text!r}: use a number with an optional unit, e.g. 512M, 2G, 1.5GiB"
        )
    number, unit, suffix = match.groups()
    if not unit and suffix.lower() in ("i", "ib"):
        raise UsageError(f"invalid size {text!r}: unit missing before {suffix!r}")
    unit = (unit or default_unit).lower()
    if unit not in _MULTIPLIER:
        raise UsageError(f"invalid default unit {default_unit!r}")
    value = Fraction(number) * _MULTIPLIER[unit]
    if value.denominator != 1:
        raise UsageError(f"invalid size {text!r}: not a whole number of bytes")
    if value > MAX_SIZE:
        raise UsageError(f"invalid size {text!r}: larger than the maximum of {format_size(MAX_SIZE)}")
    return int(value)


def parse_size_mib(text: str) -> int:
    """Parse *text* (bare numbers are MiB) and return whole MiB; refuse remainders."""
    nbytes = parse_size(text, default_unit="M")
    if nbytes % MIB:
        raise UsageError(f"invalid size {text!r}: must be a whole number of MiB")
    return nbytes // MIB


def format_size(nbytes: int | float) -> str:
    """Format *nbytes* with a binary unit, e.g. ``1.50 GiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} EiB"
