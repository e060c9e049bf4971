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
#: Volatile (RAM) backings of PMEM devices that hvext saves on power loss.
VOLATILE_DIR = Path(os.environ.get("HVEXT_VOLATILE_DIR", "/dev/shm/hvext"))
#: Where qemu-patches/build.sh installs the patched emulator.
PATCHED_QEMU = Path(os.environ.get("HVEXT_QEMU", "/usr/local/lib/hvext/qemu-system-x86_64"))


def domain_dir(name: str) -> Path:
    """hvext's state for a domain (its disk overlay), shared by the hosts of a lab."""
    return STATE_DIR / "domains" / name


def runtime_dir(name: str, host_id: str) -> Path:
    """Sockets of a domain's QEMU on one host (QMP, agent channel).

    Keyed by host so that during a migration between hosts that share
    STATE_DIR the destination's QEMU does not take over the source's sockets.
    """
    return domain_dir(name) / f"on-{host_id}"


def console_log(name: str, host_id: str) -> Path:
    return LOG_DIR / "console" / f"{name}.{host_id}.log"
