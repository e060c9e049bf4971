from pathlib import Path

import pytest

from hvext.accel import decide
from hvext.errors import UsageError

VMX = "processor : 0\nflags : fpu vme vmx sse\n"
NONE = "processor : 0\nflags : fpu vme sse hypervisor\n"


@pytest.fixture
def kvm(tmp_path: Path) -> Path:
    path = tmp_path / "kvm"
    path.write_bytes(b"")
    return path


def cpuinfo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_kvm_needs_both_device_and_cpu_flags(tmp_path: Path, kvm: Path) -> None:
    acc = decide({}, kvm, cpuinfo(tmp_path, VMX))
    assert (acc.name, acc.domain_type) == ("kvm", "kvm")
    svm = decide({}, kvm, cpuinfo(tmp_path, "flags : svm\n"))
    assert svm.name == "kvm" and "svm" in svm.reason


def test_device_without_flags_is_tcg(tmp_path: Path, kvm: Path) -> None:
    acc = decide({}, kvm, cpuinfo(tmp_path, NONE))
    assert (acc.name, acc.domain_type) == ("tcg", "qemu")
    assert "neither vmx nor svm" in acc.reason


def test_missing_device_is_tcg(tmp_path: Path) -> None:
    acc = decide({}, tmp_path / "absent", cpuinfo(tmp_path, VMX))
    assert acc.name == "tcg" and "cannot be opened" in acc.reason


def test_environment_overrides(tmp_path: Path, kvm: Path) -> None:
    assert decide({"HVEXT_ACCEL": "kvm"}, tmp_path / "absent", cpuinfo(tmp_path, NONE)).name == "kvm"
    assert decide({"HVEXT_ACCEL": "TCG"}, kvm, cpuinfo(tmp_path, VMX)).name == "tcg"
    with pytest.raises(UsageError, match="HVEXT_ACCEL"):
        decide({"HVEXT_ACCEL": "xen"}, kvm, cpuinfo(tmp_path, VMX))
