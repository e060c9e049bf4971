"""sd_notify(3) with the standard library: hvextd tells its supervisor when it is ready, reloading or stopping.

The supervisor (systemd with ``Type=notify``, or ``hvext daemon start``)
passes an AF_UNIX datagram socket in ``$NOTIFY_SOCKET``: a path, or an
abstract-namespace name written with a leading ``@``. Each message is
newline-separated ``KEY=VALUE`` lines: ``READY=1``, ``RELOADING=1`` (with
``MONOTONIC_USEC``, which systemd 253+ wants), ``STOPPING=1``, ``STATUS=...``.

Without ``$NOTIFY_SOCKET`` every call does nothing. A failed send (the
supervisor went away, its socket was removed) is logged at debug level and
never raised: readiness reporting must not stop the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("hvextd.notify")

ENV = "NOTIFY_SOCKET"


def address(value: str) -> str | bytes | None:
    """The socket address of a ``$NOTIFY_SOCKET`` value: a path, abstract bytes for ``@name``; None if unusable."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # empty, relative, or vsock: (systemd's AF_VSOCK form), which hvextd does not need


def notify(*lines: str, env: dict[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` *lines* as one datagram to ``$NOTIFY_SOCKET``; whether it was sent."""
    value = (os.environ if env is None else env).get(ENV, "")
    target = address(value)
    if target is None:
        if value:
            log.debug("%s=%r is not a socket path or @name: not notifying", ENV, value)
        return False
    message = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as sock:
            sock.sendto(message, target)
    except OSError as err:
        log.debug("cannot notify %s (%s): %s", value, message, err)
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    return notify(f"STATUS={text}")
