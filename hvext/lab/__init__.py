"""A multi-host lab on one machine: ``hvext lab up|down|status|fail|revive|partition|heal``.

Each lab host is a network namespace, plus mount and UTS namespaces, with its
own virtlogd, libvirtd and hvextd (own config, run, lib, log and cache directories,
own host UUID and hostname), joined to the others by veth pairs on a bridge
in the root namespace, with an address in 198.18.0.0/15. Migration and
failover code reaches the hosts through :attr:`LabHost.uri_unix` (a socket
reachable from the root namespace, root's only) or :attr:`LabHost.uri_tls`
(libvirt's TLS transport with root's client certificate from the lab's own
CA; see :mod:`hvext.lab.pki`). Nothing in the lab answers the root
namespace without authentication: libvirtd has no plain TCP listener, and
each host's firewall admits only the TLS port from outside the lab's hosts
(so QEMU's migration ports are for the lab hosts alone).

The state file (``/run/hvext-lab/lab.json``) lets separate processes (the
CLI, tests, benchmarks) find one lab; a lock serialises ``up``, ``down``,
``fail`` and ``revive``. A host fails (:meth:`Lab.fail`: every process in its
network namespace killed, its link cut; with ``power_loss``, SIGPWR to its
hvextd first and the kill after a battery window) and comes back empty
(:meth:`Lab.revive`); its state is a :class:`HostPhase`. A host can also be cut off the network
alone, its processes running on (:meth:`Lab.partition`, :meth:`Lab.heal`). A cluster lab
(``Lab.up(N, cluster=True)``) also runs an etcd member per host, one cluster,
and each hvextd holds its host's lease (:mod:`hvext.lab.cluster`).

::

    lab = Lab.up(2)                  # or Lab.load() for the lab that is up, if any
    src, dst = lab.hosts
    ... libvirt.open(src.uri_unix) ... migrateToURI3(dst.uri_tls, ...)
    lab.fail("host2", power_loss=True); lab.revive("host2")
    lab.down()
"""

from hvext.lab.control import FailReport, HostStatus, Lab, down
from hvext.lab.plan import MAX_HOSTS, MIN_HOSTS, HostPhase, LabError, LabHost, LabUsageError, Phase, ProcessRef
from hvext.lab.statefile import state_file

__all__ = ["Lab", "LabHost", "HostStatus", "FailReport", "HostPhase", "LabError", "LabUsageError", "Phase", "ProcessRef",
           "MIN_HOSTS", "MAX_HOSTS", "down", "state_file"]
