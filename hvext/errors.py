"""The hvext error tree.

Every error hvext raises on purpose derives from :class:`HvextError`, so a
caller (the CLI's error boundary, the daemon, a test) can catch one class.
Errors that wrap a lower-level failure keep it as ``__cause__``
(``raise ... from err``).

::

    HvextError
     +-- UsageError            bad input from a user: sizes, names, options
     +-- HostError             libvirt / host-level failures
     |    +-- LibvirtUnavailable   libvirtd cannot be reached
     |    +-- DomainNotFound       no such domain
     |    +-- DomainStateError     the domain is not in a state that allows it
     |    +-- UnsupportedError     this host's libvirt/QEMU lacks a feature
     +-- QMPError              the QMP monitor failed or refused a command
     +-- AgentError            the in-guest agent
     |    +-- AgentUnavailable     no agent channel / not connected
     |    +-- AgentTimeout         no (valid) reply in time
     |    +-- AgentProtocolError   a reply broke the protocol (untrusted input)
     +-- ImageError            building or finding the guest image
     +-- HAError               the HA cluster (etcd membership, leases, ownership)
     |    +-- ClusterUnavailable   no etcd member of the cluster answers
     +-- (capability packages add their own subclasses, e.g. hvext.rvm.RVMError)

This module is standard-library only (it is copied into the guest image).
"""

from __future__ import annotations


class HvextError(Exception):
    """Root of every error hvext raises on purpose."""


class UsageError(HvextError):
    """A user gave a value hvext cannot accept (a bad size, name, option)."""


class HostError(HvextError):
    """A failure talking to the host's libvirt or in host-level state."""


class LibvirtUnavailable(HostError):
    """libvirtd is not running or the URI cannot be reached."""


class DomainNotFound(HostError):
    """No domain with the given name or UUID exists."""


class DomainStateError(HostError):
    """The domain is not in a state that allows the operation."""


class UnsupportedError(HostError):
    """The host's libvirt or QEMU does not support what was asked."""


class QMPError(HvextError):
    """The QMP monitor failed, is absent, or refused a command.

    A command QEMU refused keeps QEMU's error: ``error_class`` (e.g. ``DeviceNotFound``) and
    ``desc``, for callers that act on the kind of failure; both are None otherwise."""

    def __init__(self, message: str, *, error_class: str | None = None, desc: str | None = None) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.desc = desc


class AgentError(HvextError):
    """The in-guest hvext agent failed."""


class AgentUnavailable(AgentError):
    """The domain has no hvext agent channel, or nothing listens on it."""


class AgentTimeout(AgentError):
    """The agent did not send a valid reply in time."""


class AgentProtocolError(AgentError):
    """The agent sent something that breaks the protocol (it is untrusted)."""


class ImageError(HvextError):
    """The guest image is missing or could not be built."""


class HAError(HvextError):
    """The HA cluster refused or failed an operation (membership, leases, ownership)."""


class ClusterUnavailable(HAError):
    """No etcd member of the cluster answered (down, unreachable, or timed out)."""
