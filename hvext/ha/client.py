"""hvext's view of the cluster's etcd: members, host leases and VM ownership, over etcd3gw.

etcd3gw speaks etcd's gRPC JSON gateway; with etcd 3.4 (Debian's
``etcd-server``) that gateway is served under ``/v3/`` (3.3 had ``/v3beta/``,
3.2 ``/v3alpha/``). The path is set here rather than discovered, which
saves a ``/version`` round trip per client and fails clearly against an
older etcd. Every call goes over TLS with the cluster's client certificate.

Keys::

    /hvext/cluster          <name>          the cluster's name (``cluster init``; read by ``join``)
    /hvext/host/<host>      {"name", "peer"?}  bound to <host>'s lease: present while <host> is alive
    /hvext/owner/<domain>   <host>          bound to the owner's lease: gone when the owner's lease ends
    /hvext/protected/<domain> {"xml", "home", "since"[, "pmem"]}  a protected domain (no lease: it outlives hosts)
    /hvext/final/<domain>   {"host", "generation"|"epoch", "at"}  the owner's last save on its battery path
    /hvext/failover/<domain> {"host", "restored_generation"|"restored_epoch"|"error", "at", ...}  the last restore

etcd3gw's errors (and requests' underneath) become hvext errors in one
place, :func:`translated`: an unreachable or timed-out cluster is
:class:`ClusterUnavailable`, anything else it refuses is :class:`HAError`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw import exceptions as etcd3gw_exceptions

from hvext.errors import ClusterUnavailable, HAError, UsageError
from hvext.ha.etcd import Credentials

API_PATH = "/v3/"
HOST_PREFIX = "/hvext/host/"
OWNER_PREFIX = "/hvext/owner/"
PROTECTED_PREFIX = "/hvext/protected/"
FINAL_PREFIX = "/hvext/final/"
FAILOVER_PREFIX = "/hvext/failover/"
#: C16: the owner's replication progress (hvext.ha.replication), deleted with the protection.
REPLICATION_PREFIX = "/hvext/replication/"
#: The largest final or failover record (they are small JSON objects).
MAX_RECORD = 64 << 10
#: The largest domain definition the cluster stores (etcd's default request limit is 1.5 MiB).
MAX_XML = 1 << 20
CLUSTER_KEY = "/hvext/cluster"
#: etcd's error (rpctypes.ErrLeaseNotFound) for a lease it does not have (any more).
LEASE_NOT_FOUND = "requested lease not found"
#: etcd's refusal of a membership change while some member is not (long enough) connected.
UNHEALTHY = "unhealthy cluster"
#: Seconds one request may take before the member counts as unavailable.
REQUEST_TIMEOUT_S = 2.0
#: etcd's error (rpctypes.ErrLeaderChanged, gRPC Unavailable: retryable) while a leader election ends.
LEADER_CHANGED = "etcdserver: leader changed"
#: Requests that change nothing (a keepalive renews again): repeated once when etcd answers
#: :data:`LEADER_CHANGED` (a new leader is known by then). A write is not: its outcome is unknown.
REPEATABLE = frozenset({"/kv/range", "/maintenance/status", "/cluster/member/list", "/kv/lease/timetolive",
                        "/lease/keepalive"})
#: Seconds before that one repeat.
LEADER_CHANGED_PAUSE_S = 0.1

T = TypeVar("T")


@contextmanager
def translated(endpoint: str) -> Iterator[None]:
    """etcd3gw's and requests' errors as hvext's, naming *endpoint*."""
    try:
        yield
    except (etcd3gw_exceptions.ConnectionFailedError, etcd3gw_exceptions.ConnectionTimeoutError,
            requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
        # etcd3gw: an HTTP reply's error carries the reason phrase in args; a failed connection has none.
        what = "is unavailable" if err.args else "does not answer"
        raise ClusterUnavailable(f"etcd at {endpoint} {what}: {_short(err)}") from err
    except etcd3gw_exceptions.Etcd3Exception as err:
        raise HAError(f"etcd at {endpoint} refused: {_short(err)}") from err
    except (requests.exceptions.RequestException, ValueError, KeyError, TypeError) as err:
        raise HAError(f"etcd at {endpoint}: unexpected reply or failure: {_short(err)}") from err


def _short(err: BaseException) -> str:
    """The reason etcd gave (its JSON ``error``/``message``), else the exception's text."""
    detail = getattr(err, "detail_text", None)
    if isinstance(detail, str) and detail:
        try:
            reply = json.loads(detail)
            detail = reply.get("error") or reply.get("message") or detail
        except (ValueError, AttributeError):
            pass
        reason = " ".join(str(a) for a in err.args if a)
        return f"{str(detail)[:300]}" + (f" ({reason})" if reason else "")
    text = " ".join(str(a) for a in err.args if a) or type(err).__name__
    return text[:300]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode(errors="replace")


def _host_value(host: str, peer: str | None) -> str:
    """A host key's value (base64 JSON): its name and, with replication, where its hvextd serves peers."""
    return _b64(json.dumps({"name": host, **({"peer": peer} if peer else {})}))


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def check_key_name(kind: str, name: str) -> str:
    """A host or domain name usable as the last part of a key: printable, no '/', 1 to 253 characters."""
    if not (0 < len(name) <= 253 and name.isprintable() and "/" not in name):
        raise UsageError(f"{kind} name {name!r:.80} cannot be a cluster key (printable, no '/', 1-253 chars)")
    return name


@dataclass(frozen=True)
class Protection:
    """A protected domain's record: its persistent definition, the host that runs it (*home*: the host
    that protected it, then each host that claimed it), when it was protected (Unix time), and the
    record's etcd mod_revision (a claim succeeds only if the record is still the one read).
    *pmem* (optional) says how the domain's PMEM is protected (``{"mode": ...}``, checked per mode
    by :mod:`hvext.ha.restore`); None: restart only."""

    domain: str
    xml: str
    home: str
    since: float
    revision: int = 0
    pmem: dict[str, Any] | None = None

    def to_json(self) -> str:
        data: dict[str, Any] = {"xml": self.xml, "home": self.home, "since": self.since}
        if self.pmem is not None:
            data["pmem"] = self.pmem
        return json.dumps(data)

    @classmethod
    def from_json(cls, domain: str, text: str, revision: int = 0) -> Protection:
        """The record stored under *domain*, checked; HAError for one hvext did not write."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise HAError(f"protection record of {domain!r:.80} is not JSON: {err}") from err
        if not isinstance(data, dict):
            raise HAError(f"protection record of {domain!r:.80} is not an object")
        xml, home, since = data.get("xml"), data.get("home"), data.get("since")
        if not isinstance(xml, str) or not 0 < len(xml) <= MAX_XML:
            raise HAError(f"protection record of {domain!r:.80}: no usable domain XML")
        if not isinstance(home, str) or not 0 < len(home) <= 253 or not home.isprintable() or "/" in home:
            raise HAError(f"protection record of {domain!r:.80}: bad home host {home!r:.80}")
        if not isinstance(since, (int, float)) or isinstance(since, bool) or not 0 <= since < 1e11:
            raise HAError(f"protection record of {domain!r:.80}: bad time {since!r:.40}")
        pmem = data.get("pmem")
        if pmem is not None and not (isinstance(pmem, dict) and isinstance(pmem.get("mode"), str)):
            raise HAError(f"protection record of {domain!r:.80}: 'pmem' is not an object with a mode")
        return cls(domain, xml, home, float(since), revision, pmem)


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: int            # seconds left (-1: expired or unknown)
    granted_ttl: int


class Client:
    """A connection to the cluster through one of *endpoints* (``https://HOST:PORT``), tried in order."""

    def __init__(self, endpoints: list[str] | tuple[str, ...], creds: Credentials,
                 timeout: float = REQUEST_TIMEOUT_S) -> None:
        if not endpoints:
            raise UsageError("no etcd endpoint given")
        self._clients: list[tuple[str, Etcd3Client]] = []
        for endpoint in endpoints:
            url = urlsplit(endpoint)
            if url.scheme != "https" or not url.hostname or not url.port:
                raise UsageError(f"etcd endpoint {endpoint!r:.80} must be https://HOST:PORT (the cluster "
                                 "uses TLS with client certificates)")
            # Our own session: requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's CA
            # and sends through HTTPS_PROXY unless trust_env is off; the cluster's CA alone must decide.
            session = requests.Session()
            session.trust_env = False
            session.verify = str(creds.ca)
            session.cert = (str(creds.cert), str(creds.key))
            self._clients.append((endpoint, Etcd3Client(host=url.hostname, port=url.port, protocol="https",
                                                        timeout=timeout, api_path=API_PATH, session=session)))

    def _call(self, fn: Callable[[Etcd3Client], T], repeatable: bool = False) -> T:
        """*fn* on the first endpoint that answers (a refusal is not retried elsewhere). A *repeatable*
        one (it changes nothing) is repeated once on an endpoint that said :data:`LEADER_CHANGED`."""
        last: ClusterUnavailable | None = None
        for i, (endpoint, client) in enumerate(self._clients):
            try:
                result = self._on(endpoint, client, fn, repeatable)
            except ClusterUnavailable as err:
                last = err
                continue
            if i:  # the next call starts with the one that answered
                self._clients.insert(0, self._clients.pop(i))
            return result
        assert last is not None
        if len(self._clients) > 1:
            raise ClusterUnavailable(f"no etcd endpoint answers ({len(self._clients)} tried; last: {last})") \
                from last
        raise last

    @staticmethod
    def _on(endpoint: str, client: Etcd3Client, fn: Callable[[Etcd3Client], T], repeatable: bool) -> T:
        """*fn* on one endpoint; a *repeatable* one once more if etcd said :data:`LEADER_CHANGED`."""
        try:
            with translated(endpoint):
                return fn(client)
        except ClusterUnavailable as err:
            if not repeatable or LEADER_CHANGED not in str(err):
                raise
        time.sleep(LEADER_CHANGED_PAUSE_S)
        with translated(endpoint):
            return fn(client)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call(lambda c: c.post(c.get_url(path), json=body), repeatable=path in REPEATABLE)

    def close(self) -> None:
        for _, client in self._clients:
            client.session.close()

    # -------------------------------------------------------------- membership

    def status(self) -> dict[str, Any]:
        """The answering member's status: its ``header.member_id``, ``leader``, ``version``."""
        return self._post("/maintenance/status", {})

    def members(self) -> list[dict[str, Any]]:
        """Every member: ``ID``, ``name`` (empty until it started), ``peerURLs``, ``clientURLs``."""
        return list(self._post("/cluster/member/list", {}).get("members", []))

    def move_leader_off(self, name: str, prefer: list[str] | tuple[str, ...] = ()) -> str | None:
        """If the member called *name* leads the cluster, ask it to hand leadership to another started
        member (etcd's MoveLeader, which only the leader accepts: sent to its client URL, which must be
        one of this client's endpoints), the first of *prefer* that is a member if any. The new
        leader's name; None when *name*'s member does not lead. HAError when it cannot be moved."""
        members = self.members()
        leader = str(self.status().get("leader", ""))
        mine = [m for m in members if m.get("name") == name]
        if not mine or str(mine[0].get("ID")) != leader:
            return None
        others = sorted((m for m in members if m.get("name") and m.get("name") != name and m.get("clientURLs")),
                        key=lambda m: (list(prefer).index(m["name"]) if m["name"] in prefer else len(prefer),
                                       m["name"]))
        if not others:
            raise HAError(f"the etcd member {name!r} leads and no other member has started")
        urls = {str(u).rstrip("/") for u in mine[0].get("clientURLs") or []}
        via = [c for endpoint, c in self._clients if endpoint.rstrip("/") in urls]
        if not via:
            raise HAError(f"the etcd member {name!r} leads but none of this client's endpoints is its "
                          f"client URL ({', '.join(sorted(urls)) or 'none'})")
        target = others[0]
        with translated(f"{name}'s member"):
            via[0].post(via[0].get_url("/maintenance/transfer-leadership"), json={"targetID": target["ID"]})
        return str(target["name"])

    def member_add(self, peer_url: str, wait: float = 0.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Add a member by its peer URL (the member-add API): (the new member, every member after).
        With *wait*, etcd's "unhealthy cluster" refusal is retried for so long (:meth:`_reconfigure`)."""
        reply = self._reconfigure("/cluster/member/add", {"peerURLs": [peer_url]}, wait)
        return reply["member"], list(reply.get("members", []))

    def member_remove(self, member_id: str, wait: float = 0.0) -> None:
        """Remove a member; with *wait*, as :meth:`member_add`."""
        self._reconfigure("/cluster/member/remove", {"ID": member_id}, wait)

    def _reconfigure(self, path: str, body: dict[str, Any], wait: float) -> dict[str, Any]:
        """A membership change. etcd refuses one ("unhealthy cluster") until every member has been
        connected for 5 s (its strict reconfiguration check): that refusal is retried for *wait* s."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._post(path, body)
            except ClusterUnavailable as err:
                if UNHEALTHY not in str(err) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.5)

    # -------------------------------------------------------------- leases

    def grant(self, ttl: int) -> Lease:
        reply = self._post("/lease/grant", {"TTL": ttl})
        return Lease(int(reply["ID"]), int(reply["TTL"]), int(reply["TTL"]))

    def keepalive(self, lease_id: int) -> int:
        """Renew a lease: its new TTL in seconds, or -1 when it had already expired.

        LeaseKeepAlive is a stream: the gateway has sent HTTP 200 before etcd answers, so a failure
        (e.g. "leader changed" during an election) comes as a body ``{"error": ...}``. That is a failed
        renewal (ClusterUnavailable), never an expiry: etcd answers a lease it does not have with a
        result whose TTL is 0 (left out of the JSON)."""
        def renew(client: Etcd3Client) -> int:
            reply = client.post(client.get_url("/lease/keepalive"), json={"ID": lease_id})
            result = reply.get("result") if isinstance(reply, dict) else None
            if not isinstance(result, dict):
                error = reply.get("error") if isinstance(reply, dict) else reply
                message = error.get("message") if isinstance(error, dict) else error
                raise ClusterUnavailable(f"renewing lease {lease_id:x}: {str(message)[:300]}")
            return int(result.get("TTL", -1))
        return self._call(renew, repeatable=True)

    def confirm(self) -> None:
        """A linearizable read through the endpoint that answered last, and that one only
        (ClusterUnavailable otherwise): etcd serves it only while the leader holds a quorum.

        etcd 3.4 renews a lease in the leader's memory, not through its quorum: a leader cut off from
        the others goes on answering keepalives until it steps down (an election timeout later, more
        on a loaded host), and the leader elected meanwhile on the other side never hears of those
        renewals. A keepalive counts once this read, sent after it, succeeds.
        """
        endpoint, client = self._clients[0]
        self._on(endpoint, client, lambda c: c.post(c.get_url("/kv/range"),
                                                    json={"key": _b64(CLUSTER_KEY), "count_only": True}),
                 repeatable=True)

    def lease(self, lease_id: int) -> Lease:
        reply = self._post("/kv/lease/timetolive", {"ID": lease_id})
        return Lease(lease_id, int(reply.get("TTL", -1)), int(reply.get("grantedTTL", 0)))

    def revoke(self, lease_id: int) -> bool:
        """End a lease now: every key bound to it (host key, owner keys) is deleted.

        True: revoked; False: etcd no longer had it (it expired), which is the same end."""
        try:
            self._post("/kv/lease/revoke", {"ID": lease_id})
        except HAError as err:
            if LEASE_NOT_FOUND in str(err) and not isinstance(err, ClusterUnavailable):
                return False
            raise
        return True

    # -------------------------------------------------------------- hosts and owners

    def set_cluster_name(self, name: str) -> None:
        """Record the cluster's name (``cluster init``), so joining hosts learn it."""
        self._post("/kv/put", {"key": _b64(CLUSTER_KEY), "value": _b64(name)})

    def cluster_name(self) -> str | None:
        kvs = self._post("/kv/range", {"key": _b64(CLUSTER_KEY)}).get("kvs", [])
        return _unb64(kvs[0].get("value", "")) if kvs else None

    def register_host(self, host: str, lease_id: int, peer: str | None = None) -> None:
        """Put this host's key, bound to its lease (it disappears when the lease ends); *peer*: the
        ``ADDRESS:PORT`` its hvextd serves other hosts on (replication, :mod:`hvext.ha.peer`)."""
        check_key_name("host", host)
        self._post("/kv/put", {"key": _b64(HOST_PREFIX + host), "value": _host_value(host, peer),
                               "lease": lease_id})

    def _range(self, prefix: str) -> list[dict[str, Any]]:
        reply = self._post("/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return list(reply.get("kvs", []))

    def hosts(self) -> dict[str, int]:
        """Every registered (alive) host and the lease its key is bound to."""
        return {_unb64(kv["key"])[len(HOST_PREFIX):]: int(kv.get("lease", 0)) for kv in self._range(HOST_PREFIX)}

    def host_records(self) -> dict[str, dict[str, Any]]:
        """Every registered (alive) host's value ({"name", "peer"?}; an unreadable one as {})."""
        out: dict[str, dict[str, Any]] = {}
        for kv in self._range(HOST_PREFIX):
            try:
                value = json.loads(_unb64(kv.get("value", "")))
            except ValueError:
                value = {}
            out[_unb64(kv["key"])[len(HOST_PREFIX):]] = value if isinstance(value, dict) else {}
        return out

    def owners(self) -> dict[str, tuple[str, int]]:
        """Every owned domain: (owner host, the lease the owner key is bound to)."""
        return {_unb64(kv["key"])[len(OWNER_PREFIX):]: (_unb64(kv.get("value", "")), int(kv.get("lease", 0)))
                for kv in self._range(OWNER_PREFIX)}

    def claim(self, domain: str, host: str, lease_id: int) -> bool:
        """Become *domain*'s owner if it has none, in one transaction: exactly one concurrent claimer wins.

        The owner key is created only if it does not exist (its create_revision is 0) and is bound
        to *lease_id*, so it disappears with the owner's lease. True: *host* won; False: someone owns it.
        """
        key = _b64(OWNER_PREFIX + check_key_name("domain", domain))
        reply = self._post("/kv/txn", {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            "success": [{"request_put": {"key": key, "value": _b64(check_key_name("host", host)),
                                         "lease": lease_id}}],
            "failure": []})
        return bool(reply.get("succeeded", False))

    def release(self, domain: str, host: str) -> bool:
        """Delete *domain*'s owner key if *host* owns it (one transaction); whether it did."""
        key = _b64(OWNER_PREFIX + check_key_name("domain", domain))
        reply = self._post("/kv/txn", {
            "compare": [{"key": key, "result": "EQUAL", "target": "VALUE", "value": _b64(host)}],
            "success": [{"request_delete_range": {"key": key}}],
            "failure": []})
        return bool(reply.get("succeeded", False))

    # -------------------------------------------------------------- protected domains

    def protect(self, record: Protection) -> bool:
        """Store *record* unless the domain is protected already (one transaction); whether it did."""
        if not 0 < len(record.xml) <= MAX_XML:
            raise UsageError(f"the definition of {record.domain!r:.80} is larger than {MAX_XML} bytes")
        key = _b64(PROTECTED_PREFIX + check_key_name("domain", record.domain))
        check_key_name("host", record.home)
        reply = self._post("/kv/txn", {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            "success": [{"request_put": {"key": key, "value": _b64(record.to_json())}}],
            "failure": []})
        return bool(reply.get("succeeded", False))

    def unprotect(self, domain: str) -> bool:
        """Delete *domain*'s record and its owner key together (one transaction); False: not protected."""
        key = _b64(PROTECTED_PREFIX + check_key_name("domain", domain))
        reply = self._post("/kv/txn", {
            "compare": [{"key": key, "result": "GREATER", "target": "CREATE", "create_revision": 0}],
            "success": [{"request_delete_range": {"key": key}},
                        {"request_delete_range": {"key": _b64(OWNER_PREFIX + domain)}},
                        {"request_delete_range": {"key": _b64(FINAL_PREFIX + domain)}},
                        {"request_delete_range": {"key": _b64(FAILOVER_PREFIX + domain)}},
                        {"request_delete_range": {"key": _b64(REPLICATION_PREFIX + domain)}}],
            "failure": []})
        return bool(reply.get("succeeded", False))

    def protected(self) -> tuple[dict[str, Protection], dict[str, str]]:
        """Every protected domain's record, and (separately) the records that are not hvext's with why:
        one bad record must not stop the protection of the others."""
        good: dict[str, Protection] = {}
        bad: dict[str, str] = {}
        for kv in self._range(PROTECTED_PREFIX):
            domain = _unb64(kv["key"])[len(PROTECTED_PREFIX):]
            try:
                good[domain] = Protection.from_json(domain, _unb64(kv.get("value", "")), int(kv.get("mod_revision", 0)))
            except HAError as err:
                bad[domain] = str(err)
        return good, bad

    def adopt(self, record: Protection, host: str, lease_id: int) -> bool:
        """Claim a protected domain for *host* and make it the domain's home, in one transaction: only
        if it has no owner and its record is still the one read (*record.revision*: not unprotected or
        changed since). Exactly one concurrent claimer wins; True: *host* did."""
        owner = _b64(OWNER_PREFIX + check_key_name("domain", record.domain))
        key = _b64(PROTECTED_PREFIX + record.domain)
        moved = dataclasses.replace(record, home=check_key_name("host", host))
        reply = self._post("/kv/txn", {
            "compare": [{"key": owner, "result": "EQUAL", "target": "CREATE", "create_revision": 0},
                        {"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": record.revision}],
            "success": [{"request_put": {"key": owner, "value": _b64(host), "lease": lease_id}},
                        {"request_put": {"key": key, "value": _b64(moved.to_json())}}],
            "failure": []})
        return bool(reply.get("succeeded", False))

    #: etcd's default limit of operations per transaction (``--max-txn-ops``).
    MAX_TXN_OPS = 128

    def rebind(self, host: str, old_lease: int, new_lease: int, domains: list[str],
               peer: str | None = None) -> bool:
        """Move *host*'s key and its owner keys of *domains* from *old_lease* to *new_lease*, in one
        transaction: only if each owner key is still bound to *old_lease* (so an
        ``ha unprotect`` meanwhile is not undone). Used to change the lease TTL without a restart
        (a lease's TTL is fixed when it is granted). True: every key moved; False: none did."""
        if len(domains) + 1 > self.MAX_TXN_OPS:
            raise HAError(f"cannot move {len(domains)} owner keys in one transaction (etcd allows "
                          f"{self.MAX_TXN_OPS - 1}); restart hvextd to change the lease TTL")
        owner_keys = [_b64(OWNER_PREFIX + check_key_name("domain", d)) for d in domains]
        # A key bound to this host's own old lease was put by this host: the lease alone says it is ours.
        compare = [{"key": key, "result": "EQUAL", "target": "LEASE", "lease": old_lease} for key in owner_keys]
        reply = self._post("/kv/txn", {
            "compare": compare,
            "success": [{"request_put": {"key": key, "value": _b64(host), "lease": new_lease}}
                        for key in owner_keys]
                       + [{"request_put": {"key": _b64(HOST_PREFIX + check_key_name("host", host)),
                                           "value": _host_value(host, peer), "lease": new_lease}}],
            "failure": []})
        return bool(reply.get("succeeded", False))

    def update_xml(self, domain: str, host: str, lease_id: int, xml: str) -> str:
        """Store *xml* as protected *domain*'s definition, if *host* owns it under *lease_id*, in one
        transaction that also compares the record's mod_revision with the one read (as :meth:`adopt`),
        so a domain unprotected meanwhile is never protected again. The record's other fields are kept.

        Returns ``"updated"``, ``"unchanged"`` (it already held *xml*), ``"not protected"``, or
        ``"not owned"`` (by *host* under *lease_id*, or the record changed between read and write)."""
        if not 0 < len(xml) <= MAX_XML:
            raise UsageError(f"the definition of {domain!r:.80} is larger than {MAX_XML} bytes")
        key = _b64(PROTECTED_PREFIX + check_key_name("domain", domain))
        kvs = self._post("/kv/range", {"key": key}).get("kvs", [])
        if not kvs:
            return "not protected"
        text, revision = _unb64(kvs[0].get("value", "")), int(kvs[0].get("mod_revision", 0))
        Protection.from_json(domain, text, revision)  # only a record hvext wrote is rewritten
        data = json.loads(text)
        if data["xml"] == xml:
            return "unchanged"
        data["xml"] = xml
        owner = _b64(OWNER_PREFIX + domain)
        reply = self._post("/kv/txn", {
            "compare": [{"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": revision},
                        {"key": owner, "result": "EQUAL", "target": "VALUE", "value": _b64(host)},
                        {"key": owner, "result": "EQUAL", "target": "LEASE", "lease": lease_id}],
            "success": [{"request_put": {"key": key, "value": _b64(json.dumps(data))}}],
            "failure": []})
        return "updated" if reply.get("succeeded", False) else "not owned"

    def hand_off(self, record: Protection, host: str, to: str) -> bool:
        """Give up *host*'s ownership of a protected domain to the live host *to*, in one transaction:
        only if *host* still owns it and the record is still the one read, delete the owner key and make
        *to* the domain's home, so that *to* claims it at its next renewal instead of after *host*'s
        lease TTL. The caller has stopped the domain first (fencing). True: handed off."""
        owner = _b64(OWNER_PREFIX + check_key_name("domain", record.domain))
        key = _b64(PROTECTED_PREFIX + record.domain)
        moved = dataclasses.replace(record, home=check_key_name("host", to))
        reply = self._post("/kv/txn", {
            "compare": [{"key": owner, "result": "EQUAL", "target": "VALUE", "value": _b64(host)},
                        {"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": record.revision}],
            "success": [{"request_delete_range": {"key": owner}},
                        {"request_put": {"key": key, "value": _b64(moved.to_json())}}],
            "failure": []})
        return bool(reply.get("succeeded", False))

    # -------------------------------------------------------------- final and failover records

    def put_record(self, prefix: str, domain: str, data: dict[str, Any]) -> None:
        """Store *data* (JSON) as *domain*'s record under *prefix* (:data:`FINAL_PREFIX`,
        :data:`FAILOVER_PREFIX`); no lease: it outlives the host that wrote it."""
        text = json.dumps(data)
        if len(text) > MAX_RECORD:
            raise UsageError(f"record {prefix}{domain!r:.80} is larger than {MAX_RECORD} bytes")
        self._post("/kv/put", {"key": _b64(prefix + check_key_name("domain", domain)), "value": _b64(text)})

    def records(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every domain's record under *prefix* that is a JSON object of at most MAX_RECORD bytes
        (others are skipped: their checks are the readers')."""
        out: dict[str, dict[str, Any]] = {}
        for kv in self._range(prefix):
            text = _unb64(kv.get("value", ""))
            try:
                data = json.loads(text) if len(text) <= MAX_RECORD else None
            except ValueError:
                data = None
            if isinstance(data, dict):
                out[_unb64(kv["key"])[len(prefix):]] = data
        return out

    def record(self, prefix: str, domain: str) -> dict[str, Any] | None:
        """*domain*'s record under *prefix*, as :meth:`records` (None: none, or not usable)."""
        kvs = self._post("/kv/range", {"key": _b64(prefix + check_key_name("domain", domain))}).get("kvs", [])
        if not kvs:
            return None
        text = _unb64(kvs[0].get("value", ""))
        try:
            data = json.loads(text) if len(text) <= MAX_RECORD else None
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def delete_record(self, prefix: str, domain: str) -> None:
        self._post("/kv/deleterange", {"key": _b64(prefix + check_key_name("domain", domain))})
