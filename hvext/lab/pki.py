"""The lab's own certificate authority, so its libvirtds talk TLS with client certificates, as a real cluster does.

A CA made fresh by every `lab up` with ``openssl`` and removed by `down`
signs each host's libvirtd server certificate and one client certificate,
root's: only root (and each host's libvirtd, for peer-to-peer migration)
can read its key, so only root gets a lab libvirt connection
(``qemu+tls://ADDRESS/system?pkipath=...``). The CA key is 0600 in a 0700
directory owned by root. Layout under the lab's data dir::

    pki/libvirt-ca/{ca-key.pem,ca-cert.pem}                  root only
    pki/client/{cacert.pem,clientcert.pem,clientkey.pem}     root's pkipath
    host<i>/tls/{cacert.pem,servercert.pem,serverkey.pem}    host i's libvirtd

(Migration streams between QEMUs are kept from the root namespace by each
host's firewall, see :func:`hvext.lab.plan.firewall_rules`: the patched QEMU
is built without GnuTLS, so QEMU's own migration TLS is not available.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hvext import paths
from hvext.lab import plan
from hvext.lab.plan import LabError

DAYS = 825
CURVE = "prime256v1"
ORG = "hvext lab"


def _openssl(args: list[str], cwd: Path) -> None:
    try:
        done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, umask=0o077,
                              stdin=subprocess.DEVNULL, timeout=60, check=False)
    except FileNotFoundError as err:
        raise LabError("openssl is not installed (`setup/host.sh packages` installs it); the lab's TLS "
                       "certificates need it") from err
    except subprocess.TimeoutExpired as err:
        raise LabError(f"openssl {args[0]} did not finish within 60 s") from err
    if done.returncode != 0:
        raise LabError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()[-400:]}")


def _config(cn: str, extensions: list[str]) -> str:
    """An openssl config of our own, so the machine's openssl.cnf adds nothing."""
    return "\n".join(["[req]", "distinguished_name = dn", "prompt = no", "[dn]", f"O = {ORG}", f"CN = {cn}",
                      "[ext]", *extensions, ""])


def _new_key(directory: Path, name: str) -> Path:
    key = directory / name
    _openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", f"ec_paramgen_curve:{CURVE}", "-out", key.name],
             directory)
    os.chmod(key, 0o600)
    return key


def make_ca(directory: Path, cn: str) -> None:
    """A self-signed CA in *directory* (made 0700): ca-key.pem (0600) and ca-cert.pem."""
    paths.private_dir(directory, mode=0o700, exclusive=True)
    _new_key(directory, "ca-key.pem")
    (directory / "ca.cnf").write_text(_config(cn, ["basicConstraints = critical, CA:TRUE",
                                                   "keyUsage = critical, keyCertSign, cRLSign",
                                                   "subjectKeyIdentifier = hash"]))
    _openssl(["req", "-x509", "-new", "-config", "ca.cnf", "-extensions", "ext", "-key", "ca-key.pem",
              "-days", str(DAYS), "-out", "ca-cert.pem"], directory)
    (directory / "ca.cnf").unlink()
    os.chmod(directory / "ca-cert.pem", 0o644)


def issue(ca: Path, out_dir: Path, stem: str, cn: str, *, server_for: int | None = None,
          alt_names: list[str] | None = None) -> tuple[Path, Path]:
    """A key and a certificate signed by the CA in *ca*: a server one for host *server_for*
    (its lab address and names as subject alternative names), a server-and-client one for
    *alt_names* (``IP:...``/``DNS:...`` entries; an etcd member's, hvext.ha.pki), else a client one.

    Returns (certificate, key) named ``<stem>cert.pem``/``<stem>key.pem`` in *out_dir*, both 0600.
    """
    work = ca / f"issue-{stem}"
    paths.private_dir(work, mode=0o700, exclusive=True)
    try:
        _new_key(work, "key.pem")
        if server_for is not None:
            names = [f"IP:{plan.host_address(server_for)}", f"DNS:{plan.hostname(server_for)}",
                     f"DNS:{plan.host_name(server_for)}"]
            ext = ["basicConstraints = critical, CA:FALSE", "keyUsage = critical, digitalSignature, keyEncipherment",
                   "extendedKeyUsage = serverAuth", f"subjectAltName = {', '.join(names)}"]
        elif alt_names is not None:
            ext = ["basicConstraints = critical, CA:FALSE", "keyUsage = critical, digitalSignature, keyEncipherment",
                   "extendedKeyUsage = serverAuth, clientAuth", f"subjectAltName = {', '.join(alt_names)}"]
        else:
            ext = ["basicConstraints = critical, CA:FALSE", "keyUsage = critical, digitalSignature, keyEncipherment",
                   "extendedKeyUsage = clientAuth"]
        (work / "req.cnf").write_text(_config(cn, ext))
        _openssl(["req", "-new", "-config", "req.cnf", "-key", "key.pem", "-out", "req.csr"], work)
        _openssl(["x509", "-req", "-in", "req.csr", "-CA", "../ca-cert.pem", "-CAkey", "../ca-key.pem",
                  "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", str(DAYS),
                  "-extfile", "req.cnf", "-extensions", "ext", "-out", "cert.pem"], work)
        cert, key = out_dir / f"{stem}cert.pem", out_dir / f"{stem}key.pem"
        os.replace(work / "cert.pem", cert)
        os.replace(work / "key.pem", key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cert, key


def make_lab_authorities(data_dir: Path) -> None:
    """The CA and root's client certificate (a fresh set; an old one is removed first)."""
    pki = plan.pki_dir(data_dir)
    remove(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    paths.private_dir(pki, mode=0o700, exclusive=True)
    make_ca(pki / "libvirt-ca", f"{ORG} libvirt CA")
    client = paths.private_dir(plan.client_pki_dir(data_dir), mode=0o700, exclusive=True)
    issue(pki / "libvirt-ca", client, "client", plan.ROOT_CLIENT_CN)
    shutil.copyfile(pki / "libvirt-ca" / "ca-cert.pem", client / "cacert.pem")


def make_host_credentials(data_dir: Path, index: int) -> None:
    """Host *index*'s libvirtd server certificate, key and the CA certificate."""
    pki = plan.pki_dir(data_dir)
    tls = paths.private_dir(plan.host_tls_dir(data_dir, index), mode=0o700)
    issue(pki / "libvirt-ca", tls, "server", plan.hostname(index), server_for=index)
    shutil.copyfile(pki / "libvirt-ca" / "ca-cert.pem", tls / "cacert.pem")


def remove(data_dir: Path) -> list[str]:
    """Remove the lab's CA and root's client certificate."""
    pki = plan.pki_dir(data_dir)
    if not pki.exists() and not pki.is_symlink():
        return []
    try:
        if pki.is_symlink():
            pki.unlink()
        else:
            shutil.rmtree(pki)
    except OSError as err:
        raise LabError(f"removing {pki}: {err}") from err
    return [f"dir {pki}"]
