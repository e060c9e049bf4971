"""Who owns a domain's state directory (``STATE_DIR/domains/<name>``), which hosts may share.

Hosts of a lab (or hosts on shared storage) share ``/var/lib/hvext``, so a
name's state directory (its disk overlay) may belong to a domain defined on
another host. hvext records the owner inside the directory when it defines a
domain or migrates one (``owner.json``: the libvirt host's UUID, the URI
hvext reached it by, the domain's UUID and name) and removes a leftover
directory only when that record shows its domain is gone. This module reads
and writes the record; :meth:`hvext.host.Host.define` decides with it.

The directory is writable by QEMU's group, so the record is trusted only if
it is a regular file owned by root that no one else can write, and its URI
is only ever one of the plain forms hvext itself uses (never a transport
that runs a command, such as ``qemu+ext`` or ``qemu+ssh``).
"""

from __future__ import annotations

import json
import os
import re
import stat
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from hvext import durable
from hvext.agent import protocol
from hvext.errors import HostError

OWNER_FILE = "owner.json"
MAX_RECORD = 4096

_SAFE_URIS = (
    re.compile(r"qemu:///system"),
    re.compile(r"qemu\+unix:///system(\?socket=/[^&?#\s]+)?"),
    re.compile(r"qemu\+(tls|tcp)://[A-Za-z0-9.\-]+(:[0-9]{1,5})?/system(\?pkipath=/[^&?#\s]+)?"),
)


@dataclass(frozen=True)
class StateOwner:
    """The domain a state directory belongs to, and the libvirt host it is defined on."""

    host_uuid: str
    uri: str
    domain_uuid: str
    name: str


def safe_uri(uri: str) -> bool:
    """Whether *uri* is a form hvext may open on the word of a record (no command-running transports)."""
    return any(p.fullmatch(uri) for p in _SAFE_URIS)


def write_owner(directory: Path, owner: StateOwner) -> None:
    """Record *owner* in *directory* (atomically; root's file, 0644, no link followed)."""
    data = json.dumps(asdict(owner), indent=1).encode() + b"\n"
    durable.atomic_write(directory / OWNER_FILE, data, mode=0o644)


def read_owner(directory: Path) -> tuple[StateOwner | None, str]:
    """The trusted record in *directory*, or (None, why it cannot be trusted)."""
    path = directory / OWNER_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, f"it has no {OWNER_FILE} (made by an older hvext, or by hand)"
    except OSError as err:
        return None, f"{path} cannot be opened ({err.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            return None, f"{path} is not a file of root's that only root can write"
        raw = os.read(fd, MAX_RECORD + 1)
    finally:
        os.close(fd)
    try:
        if len(raw) > MAX_RECORD:
            raise ValueError("too long")
        data = protocol.loads(raw, HostError, "the file")  # bounded: too deep, huge numbers -> HostError
        if not isinstance(data, dict) or set(data) != {"host_uuid", "uri", "domain_uuid", "name"}:
            raise ValueError("unexpected fields")
        if not all(isinstance(v, str) for v in data.values()):
            raise ValueError("values are not strings")
        owner = StateOwner(host_uuid=str(uuid.UUID(data["host_uuid"])), uri=data["uri"],
                           domain_uuid=str(uuid.UUID(data["domain_uuid"])), name=data["name"])
    except (HostError, ValueError, UnicodeDecodeError) as err:
        return None, f"{path} is malformed ({err})"
    if not safe_uri(owner.uri):
        return None, f"{path} names a URI hvext does not open on a record's word: {owner.uri!r}"
    return owner, ""
