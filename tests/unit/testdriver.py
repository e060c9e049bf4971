"""Real libvirt domains on libvirt's built-in test driver (``test:///default``), for unit tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from hvext.host import Domain, Host

#: The smallest domain the test driver runs (a ``{name}`` template for :func:`running_domain`).
PLAIN_XML = "<domain type='test'><name>{name}</name><memory unit='MiB'>256</memory><os><type>hvm</type></os></domain>"


@contextmanager
def running_domain(xml: str, suffix: str) -> Iterator[Domain]:
    """Define and start ``hvext-unit-<pid>-<suffix>`` from *xml* (a ``{name}`` template); removed afterwards."""
    name = f"hvext-unit-{os.getpid()}-{suffix}"
    with Host("test:///default") as host:
        dom = host.conn.defineXML(xml.format(name=name))
        dom.create()
        try:
            yield host.lookup(name)
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefine()
