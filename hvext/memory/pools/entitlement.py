"""Entitlements: how the host's memory is divided top-down among pools and VM leaves.

Pure functions on a tree snapshot (``ResourceTree.snapshot()``), kept apart
from the locking code so the algorithm can be read and tested on its own.

For every node, bottom-up:

* ``want`` = its demand capped by its limit: a leaf's own demand, a pool's
  sum of its children's wants (the root's cap is the capacity);
* ``floor`` = ``min(want, effective reservation)``: what its reservation
  guarantees, as far as it is wanted.

Top-down, the root gets ``want(root) = min(capacity, sum of wants)``; a node
with allocation X gives each child its floor, then shares ``X - sum(floors)``
among the children in proportion to their shares, max-min fair and capped by
``want - floor`` (water-filling: a child that needs less than its fair part
gets what it needs and the rest is shared again).  All amounts are whole MiB;
the remainder of a proportional split goes one MiB at a time to the largest
fractional parts (ties to the smaller path), so every pool's children add up
exactly to the pool.

Why the floors always fit: the tree's rules give ``sum(children's effective
reservations) <= effective reservation <= limit`` at every node and
``<= capacity`` at the root, and a node's allocation is at least its floor
and at most its want.  Hence every leaf gets at least
``min(demand, reservation)`` and at most ``min(demand, limit)``; and since a
node's allocation is ``min(X, sum of wants)``, capacity stays unallocated only
when every demand is met or a limit stops it (work-conserving).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hvext.memory.pools.node import PoolNode

__all__ = ["compute_allocations", "share_out"]


def share_out(total: int, caps: Sequence[int], weights: Sequence[int]) -> list[int]:
    """Split *total* MiB among claimants in proportion to *weights*, none above its cap.

    Max-min fair water-filling on exact fractions, then largest-remainder
    rounding to whole MiB (ties to the earlier claimant).  Requires
    ``0 <= total <= sum(caps)`` and positive weights; the result sums to *total*.
    """
    if len(caps) != len(weights) or any(w <= 0 for w in weights):
        raise ValueError(f"need one positive weight per cap, got caps {list(caps)} weights {list(weights)}")
    if total < 0 or total > sum(caps):
        raise ValueError(f"cannot share {total} among caps {list(caps)}")
    result = [0] * len(caps)
    remaining = Fraction(total)
    weight = sum(w for w, c in zip(weights, caps, strict=True) if c > 0)
    order = sorted((i for i, c in enumerate(caps) if c > 0), key=lambda i: (Fraction(caps[i], weights[i]), i))
    active: list[int] = []
    for pos, i in enumerate(order):
        # Saturate claimants whose cap is below their proportional part of what is left.
        if caps[i] * weight <= remaining * weights[i]:
            result[i] = caps[i]
            remaining -= caps[i]
            weight -= weights[i]
        else:
            active = order[pos:]
            break
    if active:
        exact = {i: remaining * weights[i] / weight for i in active}
        for i in active:
            result[i] = int(exact[i])  # floor: the parts are positive
        leftover = total - sum(result)
        by_fraction = sorted(active, key=lambda i: (-(exact[i] - result[i]), i))
        for i in by_fraction[:leftover]:
            result[i] += 1
    assert sum(result) == total, (total, caps, weights, result)
    return result


def compute_allocations(nodes: Mapping[str, PoolNode], demands: Mapping[str, int]) -> dict[str, int]:
    """Allocate MiB to every node of a snapshot (pre-order, root first) from leaf *demands*.

    *demands* maps leaf paths to MiB (already validated; missing leaves want 0).
    Returns ``{path: MiB}`` for every node including the root.
    """
    paths = list(nodes)
    want: dict[str, int] = {}
    for path in reversed(paths):  # children before parents
        node = nodes[path]
        if node.children:
            amount = sum(want[c] for c in node.children)
        else:
            amount = demands.get(path, 0) if not node.is_root else 0
        if node.limit_mib is not None:
            amount = min(amount, node.limit_mib)
        want[path] = amount
    floor = {p: min(want[p], nodes[p].effective_reservation_mib) for p in paths}

    alloc: dict[str, int] = {}
    for path in paths:  # parents before children
        node = nodes[path]
        if node.is_root:
            alloc[path] = want[path]
        if not node.children:
            continue
        kids = sorted(node.children)
        spare = alloc[path] - sum(floor[c] for c in kids)
        if spare < 0:  # impossible on a consistent tree
            raise AssertionError(f"{path}: floors exceed allocation {alloc[path]} MiB")
        extra = share_out(spare, [want[c] - floor[c] for c in kids], [nodes[c].shares for c in kids])
        for child, more in zip(kids, extra, strict=True):
            alloc[child] = floor[child] + more
    return alloc
