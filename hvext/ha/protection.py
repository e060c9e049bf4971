"""``hvext ha protect|unprotect|status``: the protected-domain records in the cluster (docs/ha.md).

The CLI holds no lease, so it never owns a domain itself: ``protect`` stores
the domain's persistent definition with this host as its *home*
(``/hvext/protected/<domain>``), and this host's hvextd, at its next renewal,
claims the owner key with its own lease (:mod:`hvext.daemon.ha_loop`).
From then on the owner key lives and dies with hvextd's lease.
"""

from __future__ import annotations

import time
from typing import Any

from hvext.errors import DomainStateError, HAError
from hvext.ha.client import FAILOVER_PREFIX, Client, Protection
from hvext.host import Host


def protect(client: Client, host: Host, domain: str, home: str, *,
            pmem: dict[str, Any] | None = None) -> dict[str, Any]:
    """Store *domain*'s persistent definition (secrets included: only cluster members read etcd) with
    *home* as the host running it. It must be persistent and running here; protecting twice is refused.
    *pmem*: how its PMEM is protected (the record's ``pmem`` field; None: restart only)."""
    dom = host.lookup(domain)
    if not dom.is_persistent():
        raise DomainStateError(f"domain {dom.name!r} is transient: only a defined domain can be restarted "
                               "elsewhere (`virsh define` it first)")
    if not dom.is_active():
        raise DomainStateError(f"domain {dom.name!r} is not running; start it, then protect it")
    record = Protection(dom.name, dom.xml(inactive=True, secure=True), home, round(time.time(), 3), pmem=pmem)
    if not client.protect(record):
        raise HAError(f"domain {dom.name!r} is already protected (`hvext ha status {dom.name}`)")
    return {"domain": dom.name, "home": home, "since": record.since}


def unprotect(client: Client, domain: str) -> dict[str, Any]:
    """Forget *domain*'s record and owner key; it keeps running where it runs, unguarded."""
    if not client.unprotect(domain):
        raise HAError(f"domain {domain!r:.80} is not protected")
    return {"domain": domain, "protected": False}


def status(client: Client, domain: str | None = None) -> list[dict[str, Any]]:
    """Each protected domain (or just *domain*): owner, the TTL left on the owner's lease, home, since."""
    records, bad = client.protected()
    owners = client.owners()
    if domain is not None:
        if domain in bad:
            raise HAError(bad[domain])
        if domain not in records:
            raise HAError(f"domain {domain!r:.80} is not protected")
        records = {domain: records[domain]}
    leases: dict[int, int] = {}
    failovers = client.records(FAILOVER_PREFIX)
    out = []
    for name, record in sorted(records.items()):
        owner, lease_id = owners.get(name, (None, 0))
        if owner is not None and lease_id and lease_id not in leases:
            leases[lease_id] = client.lease(lease_id).ttl
        out.append({"domain": name, "owner": owner, "lease_ttl": leases.get(lease_id) if owner else None,
                    "home": record.home, "since": record.since,
                    "state": "owned" if owner else "waiting for a claim",
                    "pmem": (record.pmem or {}).get("mode"), "failover": failovers.get(name)})
    if domain is None:
        out.extend({"domain": name, "owner": None, "lease_ttl": None, "home": None, "since": None,
                    "state": f"invalid record: {why}", "pmem": None, "failover": None}
                   for name, why in sorted(bad.items()))
    return out
