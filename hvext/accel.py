"""KVM or TCG, decided once per process.

Rule: KVM only when ``/dev/kvm`` opens read-write **and** ``/proc/cpuinfo``
shows ``vmx`` or ``svm``; otherwise TCG. ``HVEXT_ACCEL=kvm|tcg`` overrides.
A ``/dev/kvm`` without those flags can be a paravirtual nested KVM that
cannot boot a stock guest kernel (it hangs after decompression).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hvext.errors import UsageError


@dataclass(frozen=True)
class Accel:
    """The chosen accelerator and the reason for the choice."""

    name: str  # "kvm" or "tcg"
    reason: str

    @property
    def domain_type(self) -> str:
        """libvirt's ``<domain type=...>``."""
        return "kvm" if self.name == "kvm" else "qemu"

    @property
    def is_kvm(self) -> bool:
        return self.name == "kvm"


def _cpu_flags(cpuinfo: str) -> set[str]:
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


def decide(env: Mapping[str, str] | None = None, kvm_path: Path = Path("/dev/kvm"),
           cpuinfo_path: Path = Path("/proc/cpuinfo")) -> Accel:
    """Apply the rule to the given environment and files (pure enough to test)."""
    if env is None:
        env = os.environ
    forced = env.get("HVEXT_ACCEL", "").strip().lower()
    if forced:
        if forced not in ("kvm", "tcg"):
            raise UsageError(f"HVEXT_ACCEL={forced!r}: use 'kvm' or 'tcg'")
        return Accel(forced, f"forced by HVEXT_ACCEL={forced}")
    try:
        fd = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as err:
        return Accel("tcg", f"{kvm_path} cannot be opened ({err.strerror})")
    try:
        flags = _cpu_flags(cpuinfo_path.read_text())
    except OSError as err:
        return Accel("tcg", f"{cpuinfo_path} unreadable ({err.strerror})")
    if "vmx" in flags or "svm" in flags:
        return Accel("kvm", f"{kvm_path} opens and the CPU has {'vmx' if 'vmx' in flags else 'svm'}")
    return Accel("tcg", f"{kvm_path} opens but the CPU shows neither vmx nor svm "
                        "(a paravirtual nested KVM that cannot boot a stock kernel)")


@functools.cache
def current() -> Accel:
    """The accelerator for this process (decided on first use)."""
    return decide()
