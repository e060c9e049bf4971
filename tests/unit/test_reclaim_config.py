"""The reclaim loop's configuration loader (ReclaimConfig.load) with valid values.

(Refused values: tests/unit/test_daemon.py.)
"""

from __future__ import annotations

from pathlib import Path

from hvext.daemon.reclaim_loop import ReclaimConfig


def load(tmp_path: Path, text: str) -> ReclaimConfig:
    path = tmp_path / "hvextd.toml"
    path.write_text(text)
    return ReclaimConfig.load(path)


def test_every_key_is_read(tmp_path: Path) -> None:
    config = load(tmp_path, '[reclaim]\ninterval_s = 2.5\nhost_available_min_mib = 4096\nstep_mib = 64\n'
                            'method = "swap"\ndomains = ["web1", "db1"]\n')
    assert config == ReclaimConfig(interval_s=2.5, host_available_min_mib=4096, step_mib=64, method="swap",
                                   domains=("web1", "db1"))


def test_missing_keys_and_a_missing_section_take_the_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "[reclaim]\nstep_mib = 16\n") == ReclaimConfig(step_mib=16)
    assert load(tmp_path, '[power]\nbudget = 2\n') == ReclaimConfig()
    assert ReclaimConfig() == ReclaimConfig(10.0, 2048, 256, "auto", ())


def test_an_integer_interval_and_an_empty_domain_list_are_valid(tmp_path: Path) -> None:
    config = load(tmp_path, "[reclaim]\ninterval_s = 1\nhost_available_min_mib = 0\ndomains = []\n")
    assert (config.interval_s, config.host_available_min_mib, config.domains) == (1, 0, ())
