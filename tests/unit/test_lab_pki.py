"""The lab's CA and certificates (hvext.lab.pki), made with the real openssl in a temporary dir."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hvext.lab import pki, plan

pytestmark = [pytest.mark.requires(os.geteuid() == 0, "the lab's PKI is root's"),
              pytest.mark.requires(shutil.which("openssl"), "openssl is not installed (setup/host.sh installs it)")]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def verify(ca: Path, cert: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca), str(cert)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def lab_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("lab")
    pki.make_lab_authorities(data)
    plan.host_data_dir(data, 2).mkdir()
    pki.make_host_credentials(data, 2)
    return data


def test_ca_keys_and_roots_client_key_are_root_only(lab_pki: Path) -> None:
    root = plan.pki_dir(lab_pki)
    for directory in (root, root / "libvirt-ca", plan.client_pki_dir(lab_pki),
                      plan.host_tls_dir(lab_pki, 2)):
        assert mode(directory) == 0o700 and os.lstat(directory).st_uid == 0, directory
    for key in (root / "libvirt-ca" / "ca-key.pem", plan.client_pki_dir(lab_pki) / "clientkey.pem", plan.host_tls_dir(lab_pki, 2) / "serverkey.pem"):
        assert mode(key) == 0o600 and os.lstat(key).st_uid == 0, key
    assert sorted(p.name for p in plan.client_pki_dir(lab_pki).iterdir()) == [
        "cacert.pem", "clientcert.pem", "clientkey.pem"]  # what libvirt's pkipath wants


def test_certificates_chain_to_the_lab_ca_only(lab_pki: Path, tmp_path: Path) -> None:
    root = plan.pki_dir(lab_pki)
    libvirt_ca = root / "libvirt-ca" / "ca-cert.pem"
    client = plan.client_pki_dir(lab_pki) / "clientcert.pem"
    server = plan.host_tls_dir(lab_pki, 2) / "servercert.pem"
    assert verify(libvirt_ca, client, "sslclient").returncode == 0
    assert verify(libvirt_ca, server, "sslserver").returncode == 0
    assert verify(libvirt_ca, server, "sslclient").returncode != 0  # a server cert is no client cert
    other = tmp_path / "other-lab"  # another lab's (or anyone's) CA is not this lab's
    pki.make_lab_authorities(other)
    assert verify(libvirt_ca, plan.client_pki_dir(other) / "clientcert.pem", "sslclient").returncode != 0


def test_subjects_and_names(lab_pki: Path) -> None:
    def text(cert: Path) -> str:
        return subprocess.run(["openssl", "x509", "-noout", "-text", "-in", str(cert)], capture_output=True,
                              text=True, check=True).stdout
    server = text(plan.host_tls_dir(lab_pki, 2) / "servercert.pem")
    assert "IP Address:198.18.0.12" in server and "DNS:host2.hvext-lab" in server
    client = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "compat", "-in",
                             str(plan.client_pki_dir(lab_pki) / "clientcert.pem")],
                            capture_output=True, text=True, check=True).stdout
    assert client.strip() == "subject=/O=hvext lab/CN=root@hvext-lab"


def test_remove_takes_the_authorities_away(tmp_path: Path) -> None:
    pki.make_lab_authorities(tmp_path)
    assert pki.remove(tmp_path) == [f"dir {plan.pki_dir(tmp_path)}"]
    assert not plan.pki_dir(tmp_path).exists() and pki.remove(tmp_path) == []
