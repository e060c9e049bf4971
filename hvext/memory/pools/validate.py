"""Checks of the values a pool tree accepts: sizes, limits, shares, flags, domain names, paths.

Each returns the value when it is valid and raises :class:`InvalidValueError`
or :class:`InvalidPathError` otherwise (stored rows go through them too).
"""

from __future__ import annotations

import re
from typing import Final

from hvext.memory.pools.errors import InvalidPathError, InvalidValueError

__all__ = [
    "ROOT",
    "DEFAULT_SHARES",
    "MAX_MIB",
    "MAX_SHARES",
    "MAX_NAME_LEN",
    "check_mib",
    "check_limit",
    "check_shares",
    "check_flag",
    "check_domain_name",
    "normalize_path",
    "split_path",
    "path_depth",
]

ROOT: Final = "/"
DEFAULT_SHARES: Final = 1000
MAX_MIB: Final = 1 << 50  # 1 ZiB: far above any host, far below SQLite's 2**63
MAX_SHARES: Final = 1 << 31
MAX_NAME_LEN: Final = 64

_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]*")


def check_mib(name: str, value: object) -> int:
    """Return *value* if it is a whole, non-negative, sane number of MiB."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(f"{name} must be a whole number of MiB, not {value!r}")
    if value < 0:
        raise InvalidValueError(f"{name} must not be negative, got {value}")
    if value > MAX_MIB:
        raise InvalidValueError(f"{name} {value} MiB is larger than {MAX_MIB} MiB")
    return value


def check_limit(name: str, value: object) -> int | None:
    """Return *value* if it is None (no limit) or a valid MiB count."""
    if value is None:
        return None
    try:
        return check_mib(name, value)
    except InvalidValueError as err:
        raise InvalidValueError(f"{err} (None means no limit)") from err


def check_shares(value: object) -> int:
    """Return *value* if it is a positive integer share count."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValueError(f"shares must be a positive integer, not {value!r}")
    if not 0 < value <= MAX_SHARES:
        raise InvalidValueError(f"shares must be between 1 and {MAX_SHARES}, got {value}")
    return value


def check_flag(value: object) -> bool:
    """Return *value* if it is a bool (no truthiness guessing)."""
    if not isinstance(value, bool):
        raise InvalidValueError(f"expandable must be True or False, not {value!r}")
    return value


def check_domain_name(domain: object) -> str:
    """Return *domain* if it is a usable libvirt domain name (printable, no '/')."""
    if (
        not isinstance(domain, str)
        or not 0 < len(domain) <= 255
        or "/" in domain
        or not domain.isprintable()
        or domain != domain.strip()
    ):
        raise InvalidValueError(
            f"invalid domain name {domain!r}: use 1-255 printable characters without '/'"
        )
    return domain


def normalize_path(path: object) -> str:
    """Return the canonical form of a pool path (``/a/b``; one trailing '/' is dropped).

    Names are 1-64 characters of letters, digits and ``_ . : @ + -`` and do not
    start with a punctuation character other than ``_``.
    """
    if not isinstance(path, str):
        raise InvalidPathError(f"pool path must be a string, not {path!r}")
    if not path.startswith("/"):
        raise InvalidPathError(f"pool path {path!r} must be absolute (start with '/')")
    if path == ROOT:
        return ROOT
    body = path[1:-1] if path.endswith("/") else path[1:]
    names = body.split("/")
    for name in names:
        if not name:
            raise InvalidPathError(f"pool path {path!r} has an empty name")
        if len(name) > MAX_NAME_LEN or not _NAME_RE.fullmatch(name):
            raise InvalidPathError(
                f"invalid pool name {name!r} in {path!r}: use up to {MAX_NAME_LEN} letters, "
                "digits and '_.:@+-', starting with a letter, digit or '_'"
            )
    return "/" + "/".join(names)


def split_path(path: str) -> tuple[str, str]:
    """Split a canonical non-root path into (parent path, name)."""
    head, _, name = path.rpartition("/")
    return (head or ROOT), name


def path_depth(path: str) -> int:
    """Number of names in a canonical path (the root has depth 0)."""
    return 0 if path == ROOT else path.count("/")
