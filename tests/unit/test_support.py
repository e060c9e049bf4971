"""tests/support.py: a missing installed part skips locally and fails under CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import in_ci

ROOT = Path(__file__).resolve().parents[2]

TINY = '''
import pytest
from tests.support import require

def test_call_form():
    require(False, "the frobnicator is not installed")

@pytest.mark.requires(False, "the widget daemon is not running")
def test_marker_form():
    pass

@pytest.mark.requires(True, "never shown")
def test_present():
    require(1, "never shown either")

def test_hardware_skip_stays_a_skip():
    pytest.skip("no vmx/svm on this CPU")
'''


def run_tiny(tmp_path: Path, ci: str | None, source: str = TINY, plugin: str = "tests.support",
             **extra_env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_tiny.py").write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "HVEXT_EXPECT_KVM")}
    env.update(extra_env, PYTHONPATH=str(ROOT))
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-p", plugin, "-p", "no:cacheprovider",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", "-rA", "--rootdir", str(tmp_path),
                           str(tmp_path / "test_tiny.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_missing_parts_skip_locally(tmp_path: Path) -> None:
    result = run_tiny(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed, 3 skipped" in result.stdout, result.stdout
    assert "the frobnicator is not installed" in result.stdout
    assert "the widget daemon is not running" in result.stdout


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_missing_parts_fail_under_ci(tmp_path: Path, value: str) -> None:
    result = run_tiny(tmp_path, value)
    assert result.returncode == 1, result.stdout + result.stderr
    # a requirement checked during setup (marker, fixture) reports as an error, in the test as a failure
    assert "1 failed, 1 passed, 1 skipped, 1 error" in result.stdout, result.stdout
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    assert any("test_call_form" in f and "the frobnicator is not installed" in f for f in failed), failed
    assert any("test_marker_form" in f and "the widget daemon is not running" in f for f in failed), failed
    assert "no vmx/svm on this CPU" in result.stdout  # a skip setup cannot fix stays a skip


KVM_TEST = '''
import pytest

@pytest.mark.kvm
def test_needs_kvm():
    pass
'''


@pytest.mark.parametrize(("env", "outcome"), [
    ({}, "1 skipped"),
    ({"CI": "true"}, "1 skipped"),  # a CPU without vmx/svm is not a broken install
    ({"HVEXT_EXPECT_KVM": "1"}, "1 error"),  # but where KVM is known to exist, TCG is
])
def test_kvm_marker_skips_under_tcg_unless_kvm_is_expected(tmp_path: Path, env: dict[str, str],
                                                            outcome: str) -> None:
    result = run_tiny(tmp_path, env.pop("CI", None), KVM_TEST, "tests.conftest", HVEXT_ACCEL="tcg", **env)
    assert f"== {outcome} in" in result.stdout, result.stdout
    assert "needs KVM: forced by HVEXT_ACCEL=tcg" in result.stdout


@pytest.mark.parametrize(("env", "expected"), [
    ({}, False), ({"CI": ""}, False), ({"CI": "false"}, False), ({"CI": "0"}, False),
    ({"CI": "true"}, True), ({"CI": " True "}, True), ({"CI": "1"}, True), ({"CI": "yes"}, True),
])
def test_in_ci(env: dict[str, str], expected: bool) -> None:
    assert in_ci(env) is expected


def test_ci_entry_points_set_ci() -> None:
    """.ci/run and the GitHub workflow both run the suite with CI=true."""
    assert "CI=true" in (ROOT / ".ci/run").read_text()
    workflow = (ROOT / ".github/workflows/ci.yml").read_text()
    assert 'CI: "true"' in workflow


@pytest.mark.parametrize("target", ["unit", "test", "vm"])
def test_make_targets_print_skip_reasons(target: str) -> None:
    """Every pytest run of the Makefile reports why tests skipped (-ra)."""
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    runs = [line.split() for line in dry.stdout.splitlines() if "-m pytest" in line]
    assert runs and all("-ra" in run for run in runs), dry.stdout


#: Files allowed to skip outright, and why: only what setup cannot provide.
PLAIN_SKIPS_ALLOWED = {
    "tests/support.py": "the helper itself (skips locally, fails under CI)",
    "tests/conftest.py": "the kvm marker: a CPU without vmx/svm (fails where HVEXT_EXPECT_KVM=1)",
    "tests/unit/test_region.py": "a file system that cannot report or punch holes",
    "tests/unit/test_doctor.py": "a kernel without vm.unprivileged_userfaultfd",
    "tests/vm/test_dirty.py": "the CPU picks which of the KVM and TCG complements runs (tcg_only)",
}
SKIP_CALLS = {"skip", "skipif", "importorskip"}


def plain_skips(path: Path) -> list[int]:
    """Lines of ``pytest.skip(...)``, ``pytest.mark.skip[if](...)``, ``pytest.importorskip(...)`` in *path*."""
    import ast
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = node.func if isinstance(node, ast.Call) else node
        if isinstance(target, ast.Attribute) and target.attr in SKIP_CALLS:
            base = ast.unparse(target.value)
            if base in ("pytest", "pytest.mark"):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_every_plain_skip_is_one_setup_cannot_fix() -> None:
    """A skip for something setup installs must go through tests.support.require (fails under CI=true)."""
    found = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative not in PLAIN_SKIPS_ALLOWED and (lines := plain_skips(path)):
            found[relative] = lines
    assert not found, f"plain skips outside {sorted(PLAIN_SKIPS_ALLOWED)}: {found}; use tests.support.require " \
                      "for parts setup installs, or add the file with the reason setup cannot fix it"
