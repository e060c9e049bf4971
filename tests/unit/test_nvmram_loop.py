"""hvextd's reclaim loop and NVM RAM: off by default, configured under [reclaim], and when on each round
reads the tier, asks the policy and logs why (libvirt's test driver: no VM; the real grow/shrink of a
guest through the same round is tests/vm/test_nvmram.py)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from hvext import aio
from hvext.daemon import config as daemon_config
from hvext.daemon import reclaim_loop
from hvext.daemon.reclaim_loop import ReclaimConfig
from hvext.domxml import HVEXT_NS
from hvext.errors import UsageError
from hvext.memory import nvmram
from hvext.units import MIB
from tests.unit.testdriver import running_domain

XML = (f"<domain type='test'><name>{{name}}</name><metadata><hvext:domain xmlns:hvext='{HVEXT_NS}'/></metadata>"
       "<maxMemory slots='8' unit='MiB'>4096</maxMemory><memory unit='MiB'>512</memory><vcpu>1</vcpu>"
       "<os><type>hvm</type></os><cpu><numa><cell id='0' cpus='0' memory='256' unit='MiB'/></numa></cpu>"
       f"<devices>{nvmram.device_xml(256 * MIB)}</devices></domain>")


def load(tmp_path: Path, text: str) -> ReclaimConfig | None:
    path = tmp_path / "hvextd.toml"
    path.write_text(text)
    return daemon_config.load(path).get(ReclaimConfig)


def test_nvm_ram_is_off_by_default_and_read_from_the_reclaim_section(tmp_path: Path) -> None:
    assert not ReclaimConfig().nvm_ram
    assert not load(tmp_path, "[reclaim]\n").nvm_ram  # type: ignore[union-attr]
    config = load(tmp_path, '[reclaim]\nnvm_ram = true\nnvm_dir = "/dev/shm/nvm"\nnvm_free_min_mib = 10\n'
                            'nvm_free_high_mib = 20\nnvm_step_mib = 32\n')
    assert config == ReclaimConfig(nvm_ram=True, nvm_dir="/dev/shm/nvm", nvm_free_min_mib=10, nvm_free_high_mib=20,
                                   nvm_step_mib=32)


@pytest.mark.parametrize("toml,message", [
    ("nvm_ram = 1", "nvm_ram: must be true or false, not 1"),
    ("nvm_ram = true", "nvm_dir: nvm_ram = true needs the NVM tier's directory"),
    ('nvm_dir = "nvm"', "nvm_dir: must be an absolute directory path"),
    ("nvm_step_mib = 8", "nvm_step_mib: must be an integer from 16 to"),
    ("nvm_free_min_mib = -1", "nvm_free_min_mib: must be an integer from 0 to"),
    ("nvm_free_min_mib = 100\nnvm_free_high_mib = 50", "nvm_free_high_mib: must not be below nvm_free_min_mib"),
])
def test_bad_nvm_keys_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(f"[reclaim] {message}")):
        load(tmp_path, f"[reclaim]\n{toml}\n")


def nvm_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("NVM RAM")]


def test_a_round_decides_about_nvm_ram_only_when_it_is_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With the host short (a floor above anything) the round logs the tier's figures and why nothing moves
    here: the test driver keeps the device but not hvext's file backend, so it is not on the tier."""
    with running_domain(XML, "nvm") as dom, caplog.at_level(logging.DEBUG, "hvextd.reclaim"):
        assert nvmram.parse(dom.xml()) == nvmram.NvmRam(None, 256 * MIB, 2 * MIB, 0, 0)
        off = ReclaimConfig(host_available_min_mib=0, domains=(dom.name,))
        assert aio.run(reclaim_loop.one_round(dom.host, off)) == []
        assert nvm_lines(caplog) == []
        on = ReclaimConfig(host_available_min_mib=1 << 30, domains=(dom.name,), nvm_ram=True, nvm_dir=str(tmp_path),
                           nvm_free_min_mib=0, nvm_free_high_mib=0)
        aio.run(reclaim_loop.one_round(dom.host, on))
        lines = nvm_lines(caplog)
        assert any(f"NVM RAM of {dom.name} is not backed on the NVM tier {tmp_path}" in line for line in lines), lines
        assert any(re.match(r"NVM RAM \(0 VMs\): host short but no VM can take more NVM RAM now: host available "
                            r"\d+ MiB \(floor 1073741824\), NVM tier free \d+ MiB", line) for line in lines), lines


def test_a_tier_that_cannot_be_read_skips_nvm_ram_for_the_round(caplog: pytest.LogCaptureFixture) -> None:
    missing = f"/nonexistent-hvext-nvm-{os.getpid()}"
    config = ReclaimConfig(nvm_ram=True, nvm_dir=missing)
    with running_domain(XML, "nvm2") as dom, caplog.at_level(logging.WARNING, "hvextd.reclaim"):
        assert aio.run(reclaim_loop.nvm_round(dom.host, config, 0)) == []
    assert nvm_lines(caplog) == [f"NVM RAM not managed this round: NVM tier {missing}: No such file or directory"]
