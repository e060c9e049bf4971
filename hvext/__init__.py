"""hvext: a QEMU/KVM hypervisor extension driven through libvirt and QMP.

This module stays standard-library only: ``hvext.errors`` and ``hvext.rvm``
are copied into the guest image, where nothing else of hvext is installed.
"""

from hvext.errors import HvextError

__version__ = "0.1.0"

__all__ = ["HvextError", "__version__"]
