"""This host's etcd member: its files, its certificates, and starting and stopping it.

etcd is Debian's ``etcd-server`` (3.4), run by hvext the way setup runs
libvirtd without systemd: detached, a pid file under ``/run/hvext``, its
output in a log file, started only when not already running (idempotent),
and ready when its ``/health`` endpoint says so (polled; no fixed sleeps).

Every URL is TLS with client-certificate authentication, for clients and
peers alike: the cluster's own CA (made by ``hvext cluster init``, with the
lab's PKI code, :mod:`hvext.lab.pki`) signs one certificate per member,
usable as server and as client, and etcd accepts only peers and clients
presenting a certificate from that CA. Layout (*state* is ``/var/lib/hvext``)::

    state/ha/                 0700  member.json (this member's settings)
    state/ha/pki/ca/          0700  ca-key.pem (0600), ca-cert.pem   the cluster CA
    state/ha/pki/             0700  membercert.pem, memberkey.pem (0600), ca.pem
    state/etcd/               0700  etcd's data directory
    /run/hvext/etcd.pid             the running etcd
    /var/log/hvext/etcd.log         its output
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hvext import durable, paths
from hvext.daemon import service
from hvext.errors import HAError, UsageError
from hvext.lab import pki, procs

ETCD = os.environ.get("HVEXT_ETCD", "/usr/bin/etcd")
CLIENT_PORT = 2379
PEER_PORT = 2380
#: How long a start waits for /health before it gives up (and stops what it started).
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Layout:
    """Where this host's member keeps its files (tests use temporary directories)."""

    state_dir: Path = paths.STATE_DIR
    run_dir: Path = service.RUN_DIR
    log_dir: Path = paths.LOG_DIR
    #: The network namespace the member runs in (``ip netns exec``; a lab host's), "" for this one.
    netns: str = ""

    @property
    def ha_dir(self) -> Path:
        return self.state_dir / "ha"

    @property
    def pki_dir(self) -> Path:
        return self.ha_dir / "pki"

    @property
    def ca_dir(self) -> Path:
        return self.pki_dir / "ca"

    @property
    def member_file(self) -> Path:
        return self.ha_dir / "member.json"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "etcd"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "etcd.pid"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "etcd.log"

    def credentials(self) -> Credentials:
        return Credentials(ca=self.pki_dir / "ca.pem", cert=self.pki_dir / "membercert.pem",
                           key=self.pki_dir / "memberkey.pem")


@dataclass(frozen=True)
class Credentials:
    """A client certificate of the cluster and the CA that checks the members' server certificates."""

    ca: Path
    cert: Path
    key: Path

    def ssl_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca))
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as err:
            raise HAError(f"cannot load the cluster credentials ({self.cert}, {self.ca}): {err}") from err
        return ctx


@dataclass(frozen=True)
class Member:
    """This host's member: its name, the cluster it belongs to, where it listens and whom it starts with."""

    name: str
    cluster: str
    address: str
    client_port: int = CLIENT_PORT
    peer_port: int = PEER_PORT
    initial_cluster: str = ""        # NAME=PEER_URL,... for the first start
    initial_state: str = "new"       # "new" (init) or "existing" (join)

    @property
    def client_url(self) -> str:
        return f"https://{_host(self.address)}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{_host(self.address)}:{self.peer_port}"

    def argv(self, layout: Layout) -> list[str]:
        """etcd's command line: TLS with client certificates on client and peer URLs."""
        creds = layout.credentials()
        return [ETCD, "--name", self.name, "--data-dir", str(layout.data_dir),
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", self.initial_cluster or f"{self.name}={self.peer_url}",
                "--initial-cluster-state", self.initial_state, "--initial-cluster-token", self.cluster,
                "--client-cert-auth", "--trusted-ca-file", str(creds.ca),
                "--cert-file", str(creds.cert), "--key-file", str(creds.key),
                "--peer-client-cert-auth", "--peer-trusted-ca-file", str(creds.ca),
                "--peer-cert-file", str(creds.cert), "--peer-key-file", str(creds.key),
                "--logger", "zap", "--log-outputs", "stderr"]

    def save(self, layout: Layout) -> None:
        _write_private(layout.member_file, json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def load(cls, layout: Layout) -> Member | None:
        """The saved member, or None when this host was never initialised or joined."""
        try:
            data = json.loads(layout.member_file.read_text())
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as err:
            raise HAError(f"{layout.member_file} is unreadable ({err}); remove {layout.ha_dir} and "
                          f"{layout.data_dir} to start over") from err


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_name(name: str) -> str:
    """A member or cluster name: letters, digits, ``.``, ``_``, ``-``, 1 to 63 characters."""
    if not (0 < len(name) <= 63 and name.isascii() and all(c.isalnum() or c in "._-" for c in name)
            and name[0].isalnum()):
        raise UsageError(f"not a valid name: {name!r:.80} (letters, digits, '.', '_', '-'; at most 63; "
                         "starting with a letter or digit)")
    return name


def _alt_names(address: str) -> list[str]:
    try:
        ipaddress.ip_address(address)
        names = [f"IP:{address}"]
    except ValueError:
        names = [f"DNS:{address}"]
    return names + ["IP:127.0.0.1", "DNS:localhost"]


def make_ca(layout: Layout, cluster: str) -> None:
    """The cluster's CA, made fresh in ``ha/pki/ca`` (the HA and PKI dirs are created 0700)."""
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    paths.private_dir(layout.ha_dir)
    paths.private_dir(layout.pki_dir)
    pki.make_ca(layout.ca_dir, f"hvext cluster {cluster} CA")


def import_ca(layout: Layout, source: Path) -> None:
    """Copy an exported CA (``ca-cert.pem``, ``ca-key.pem`` in *source*) into ``ha/pki/ca``."""
    for name in ("ca-cert.pem", "ca-key.pem"):
        if not (source / name).is_file():
            raise UsageError(f"{source} holds no {name}: give the directory `hvext cluster credentials "
                             "export DIR` wrote on a member")
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    paths.private_dir(layout.ha_dir)
    paths.private_dir(layout.pki_dir)
    paths.private_dir(layout.ca_dir, exclusive=True)
    for name in ("ca-cert.pem", "ca-key.pem"):
        _write_private(layout.ca_dir / name, (source / name).read_bytes())


def export_ca(layout: Layout, target: Path) -> list[Path]:
    """Write the cluster CA (certificate and key) into new directory *target* (0700, files 0600)."""
    if not (layout.ca_dir / "ca-key.pem").is_file():
        raise HAError(f"this host has no cluster CA ({layout.ca_dir}): run `hvext cluster init` or join first")
    try:
        paths.private_dir(target, exclusive=True)
    except FileExistsError:
        raise UsageError(f"{target} exists; give a new directory (the CA key must not land among other "
                         "files)") from None
    out = []
    for name in ("ca-cert.pem", "ca-key.pem"):
        _write_private(target / name, (layout.ca_dir / name).read_bytes())
        out.append(target / name)
    return out


def issue_member_cert(layout: Layout, member: Member) -> None:
    """This member's certificate (server and client) for its address, and the CA certificate beside it."""
    pki.issue(layout.ca_dir, layout.pki_dir, "member", member.name, alt_names=_alt_names(member.address))
    shutil.copyfile(layout.ca_dir / "ca-cert.pem", layout.pki_dir / "ca.pem")


# ---------------------------------------------------------------- the process


def command(layout: Layout, member: Member) -> list[str]:
    """What :func:`start` runs: etcd's command line, inside the layout's network namespace if it has one
    (``ip netns exec`` execs etcd, so the PID is etcd's)."""
    prefix = ["ip", "netns", "exec", layout.netns] if layout.netns else []
    return prefix + member.argv(layout)


def running_pid(layout: Layout) -> int | None:
    """The PID of this layout's running etcd (from its pid file, checked in /proc), or None."""
    pid = procs.read_pid_file(layout.pid_file) if layout.pid_file.exists() else None
    if pid is None or procs.identify(pid) is None:
        return None
    argv = service.cmdline(pid) or []
    if not argv or os.path.basename(argv[0]) != os.path.basename(ETCD) or \
            str(layout.data_dir) not in argv:
        return None
    return pid


def health(url: str, creds: Credentials, timeout: float = 2.0) -> tuple[bool, str]:
    """(healthy, why not) from a member's ``/health`` endpoint, over TLS with our client certificate."""
    host, _, port = url.removeprefix("https://").rpartition(":")
    conn = http.client.HTTPSConnection(host.strip("[]"), int(port), timeout=timeout,
                                       context=creds.ssl_context())
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read(4096)
    except (OSError, http.client.HTTPException) as err:
        return False, str(err) or type(err).__name__
    finally:
        conn.close()
    try:
        healthy = json.loads(body).get("health") == "true"
    except (ValueError, AttributeError):
        healthy = False
    return healthy, "" if healthy else f"HTTP {resp.status}: {body[:200]!r}"


@contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    service.ensure_run_dir(layout.run_dir)
    fd = durable.lock_file(layout.pid_file.with_suffix(".lock"))
    try:
        yield
    finally:
        os.close(fd)


#: Members this process started, by PID: a stop waits for (reaps) them, so no zombie stays behind.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Started:
    pid: int
    already: bool       # it was running: nothing was started

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "already": self.already}


def start(layout: Layout, member: Member, timeout: float = START_TIMEOUT_S) -> Started:
    """Start this host's etcd member unless it runs; return once ``/health`` answers healthy.

    A member that exits or does not become healthy in *timeout* s is stopped
    again (a member of a multi-member cluster is healthy only with a quorum)
    and :class:`HAError` says why, with the end of its log.
    """
    if not os.access(ETCD, os.X_OK):
        raise HAError(f"{ETCD} is missing: install Debian's etcd-server (`setup/host.sh packages`)")
    with _locked(layout):
        pid = running_pid(layout)
        if pid is not None:
            _wait_healthy(layout, member, None, timeout)
            return Started(pid, already=True)
        layout.pid_file.unlink(missing_ok=True)
        paths.private_dir(layout.data_dir)
        layout.log_dir.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(layout.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o640)
        offset = os.fstat(log_fd).st_size
        try:
            proc = subprocess.Popen(command(layout, member), stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd,
                                    start_new_session=True, cwd="/")
        except OSError as err:
            raise HAError(f"cannot run {ETCD}: {err.strerror}") from err
        finally:
            os.close(log_fd)
        _write_private(layout.pid_file, f"{proc.pid}\n".encode())
        os.chmod(layout.pid_file, 0o644)
        try:
            _wait_healthy(layout, member, proc, timeout)
        except BaseException as err:
            _terminate(proc.pid, proc)
            layout.pid_file.unlink(missing_ok=True)
            if isinstance(err, HAError):
                raise HAError(f"{err}; etcd's log ({layout.log_file}) ends: "
                              f"{_log_tail(layout.log_file, offset)}") from err
            raise
        _children[proc.pid] = proc
        return Started(proc.pid, already=False)


def _log_tail(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return "(unreadable)"
    return " | ".join(text.strip().splitlines()[-3:])[-600:] or "(nothing)"


def _wait_healthy(layout: Layout, member: Member, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    creds = layout.credentials()
    deadline = time.monotonic() + timeout
    why = "no answer yet"
    while time.monotonic() < deadline:
        ok, why = health(member.client_url, creds, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        if ok:
            return
        if proc is not None:
            try:  # the pause between two polls ends at once if etcd exits
                code = proc.wait(timeout=0.1)
            except subprocess.TimeoutExpired:
                continue
            raise HAError(f"etcd exited with status {code} while starting")
        elif running_pid(layout) is None:
            raise HAError("etcd exited")
        else:
            time.sleep(0.1)  # not our child: nothing to wait on
    raise HAError(f"etcd did not become healthy within {timeout:.0f} s ({why})")


def _terminate(pid: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10.0) -> None:
    ref = procs.identify(pid)
    if ref is None:
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if proc is not None:
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not procs.is_alive(ref):
                return
            time.sleep(0.05)
    raise HAError(f"etcd (PID {pid}) survived SIGKILL")


def stop(layout: Layout) -> int | None:
    """Stop this host's etcd member (SIGTERM, then SIGKILL); the PID it had, or None if none ran."""
    with _locked(layout):
        pid = running_pid(layout)
        if pid is not None:
            _terminate(pid, _children.get(pid))
        if pid is not None:
            _children.pop(pid, None)
        layout.pid_file.unlink(missing_ok=True)
        return pid
