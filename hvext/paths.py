"""Where hvext keeps things on the host; each overridable by an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

#: The source tree (guest-agent/, qemu-patches/ live next to the package).
SOURCE_DIR = Path(os.environ.get("HVEXT_SOURCE_DIR", Path(__file__).resolve().parents[1]))
#: Built artifacts that can be rebuilt from inputs (guest images, QEMU builds).
CACHE_DIR = Path(os.environ.get("HVEXT_CACHE_DIR", "/var/cache/hvext"))
#: Per-domain state: disk overlays, sockets for hvext's QMP monitor.
STATE_DIR = Path(os.environ.get("HVEXT_STATE_DIR", "/var/lib/hvext"))
#: Guest console logs (written by libvirt's virtlogd).
LOG_DIR = Path(os.environ.get("HVEXT_LOG_DIR", "/var/log/hvext"))
#: Where qemu-patches/build.sh installs the patched emulator.
PATCHED_QEMU = Path(os.environ.get("HVEXT_QEMU", "/usr/local/lib/hvext/qemu-system-x86_64"))


def domain_dir(name: str) -> Path:
    return STATE_DIR / "domains" / name


def console_log(name: str) -> Path:
    return LOG_DIR / "console" / f"{name}.log"
