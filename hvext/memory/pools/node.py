"""A node's values: the modifiable parameters and the immutable view readers get."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hvext.memory.pools.validate import ROOT, path_depth, split_path

__all__ = ["NodeValue", "PoolNode"]


@dataclass(frozen=True)
class NodeValue:
    """The modifiable parameters of a node; replaced whole on commit."""

    reservation_mib: int
    limit_mib: int | None
    shares: int
    expandable: bool


@dataclass(frozen=True)
class PoolNode:
    """An immutable view of one node, taken under the tree's locks.

    ``children`` are the children's full paths, sorted.  For the root,
    ``reservation_mib`` and ``limit_mib`` are the host capacity.
    """

    path: str
    reservation_mib: int
    limit_mib: int | None
    shares: int
    expandable: bool
    children: tuple[str, ...]
    effective_reservation_mib: int
    domain: str | None = None

    @property
    def name(self) -> str:
        """The last path component ('/' for the root)."""
        return ROOT if self.path == ROOT else split_path(self.path)[1]

    @property
    def parent(self) -> str | None:
        """The parent's path, None for the root."""
        return None if self.path == ROOT else split_path(self.path)[0]

    @property
    def depth(self) -> int:
        return path_depth(self.path)

    @property
    def is_root(self) -> bool:
        return self.path == ROOT

    @property
    def is_leaf(self) -> bool:
        """True for a non-root node without children (where VMs and demands live)."""
        return self.path != ROOT and not self.children

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-ready), children as paths."""
        return {
            "path": self.path,
            "name": self.name,
            "reservation_mib": self.reservation_mib,
            "limit_mib": self.limit_mib,
            "shares": self.shares,
            "expandable": self.expandable,
            "effective_reservation_mib": self.effective_reservation_mib,
            "domain": self.domain,
            "children": list(self.children),
        }
