"""The reclaim loop's configuration, read through hvextd's config loader, with valid values.

(Refused values and absent sections: tests/unit/test_daemon_config.py.)
"""

from __future__ import annotations

from pathlib import Path

from hvext.daemon import config as daemon_config
from hvext.daemon.reclaim_loop import ReclaimConfig


def load(tmp_path: Path, text: str) -> ReclaimConfig | None:
    path = tmp_path / "hvextd.toml"
    path.write_text(text)
    return daemon_config.load(path).get(ReclaimConfig)


def test_every_key_is_read(tmp_path: Path) -> None:
    config = load(tmp_path, '[reclaim]\ninterval_s = 2.5\nhost_available_min_mib = 4096\nstep_mib = 64\n'
                            'method = "swap"\ndomains = ["web1", "db1"]\n')
    assert config == ReclaimConfig(interval_s=2.5, host_available_min_mib=4096, step_mib=64, method="swap",
                                   domains=("web1", "db1"))


def test_missing_keys_take_the_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "[reclaim]\nstep_mib = 16\n") == ReclaimConfig(step_mib=16)
    assert load(tmp_path, '[power]\nbudget = 2\n') is None  # no section: no reclaim loop
    assert ReclaimConfig() == ReclaimConfig(10.0, 2048, 256, "auto", ())


def test_an_integer_interval_and_an_empty_domain_list_are_valid(tmp_path: Path) -> None:
    config = load(tmp_path, "[reclaim]\ninterval_s = 1\nhost_available_min_mib = 0\ndomains = []\n")
    assert config is not None
    assert (config.interval_s, config.host_available_min_mib, config.domains) == (1, 0, ())
