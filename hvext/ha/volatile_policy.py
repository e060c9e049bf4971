"""Pure decisions of volatile-state recovery (C18) and standby copies (C17): which pages to move, in what
batches, whether a peer's page list can be trusted, and what the move cost against the dirty bytes.

Page sets are runs: sorted, non-overlapping ``(first page, count)`` tuples
(:data:`hvext.ha.mirror_policy.Runs`), the shape of the patched QEMU's dirty page lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hvext.errors import HAError
from hvext.ha.mirror_policy import LogMark, Runs, merge, pages

#: Bytes of page data in one request or reply between peers (well under :data:`hvext.ha.peer.MAX_PAYLOAD`).
BATCH_BYTES = 16 << 20
#: At most this many runs in one page list a peer sends (a 1 GiB guest of alternating pages has 131072).
MAX_RUNS = 1 << 20
#: The goal of C18: bytes pulled over the dirty bytes (device state apart).
PULL_RATIO_LIMIT = 1.05


class Busy(HAError):
    """Another baseline, refresh, hand-over or failover of the domain holds its lock (hvextd skips a round)."""


class PageListError(HAError):
    """A page list from a peer (or a state file) is not a valid set of runs for the region."""


def union(*sets: Iterable[tuple[int, int]]) -> Runs:
    """The pages in any of *sets*, as runs."""
    return merge(run for runs in sets for run in runs)


def check_runs(raw: Any, total_pages: int) -> Runs:
    """*raw* (untrusted JSON: a list of [first, count]) as runs within a region of *total_pages* pages.

    Sorted, non-overlapping, positive counts, inside the region; PageListError for anything else.
    """
    if not isinstance(raw, list) or len(raw) > MAX_RUNS:
        raise PageListError(f"a page list is a list of at most {MAX_RUNS} [first, count] runs")
    runs: list[tuple[int, int]] = []
    end = 0
    for item in raw:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and
                all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise PageListError(f"a run is [first, count] of integers, not {item!r:.60}")
        first, count = item
        if first < end or count <= 0 or first + count > total_pages:
            raise PageListError(f"run ({first}, {count}) is out of order, empty or outside {total_pages} pages")
        runs.append((first, count))
        end = first + count
    return tuple(runs)


def continues(mark: LogMark | None, domain_id: int, generation: int) -> str | None:
    """Why a dirty-list query *generation* of QEMU run *domain_id* does *not* extend the pages known since
    *mark* (None: it does). Only the query right after the last one consumed, in the same QEMU, proves
    that every page written since then is on it."""
    if mark is None:
        return "the dirty log has no mark"
    if mark.domain_id != domain_id:
        return f"QEMU restarted (domain id {mark.domain_id} -> {domain_id})"
    if generation != mark.generation + 1:
        return f"dirty log generation {generation} does not follow {mark.generation} (another reader took a list)"
    return None


def batches(runs: Runs, page_size: int, limit: int = BATCH_BYTES) -> list[tuple[tuple[int, int], ...]]:
    """*runs* cut into batches of byte extents ``(offset, length)`` of at most *limit* bytes each (a run
    longer than the limit is split), in page order."""
    if limit < page_size:
        raise ValueError("a batch must hold a page")
    out: list[tuple[int, int]] = []
    result: list[tuple[tuple[int, int], ...]] = []
    size = 0
    for first, count in runs:
        offset, end = first * page_size, (first + count) * page_size
        while offset < end:
            room = limit - size
            if room < page_size:
                result.append(tuple(out))
                out, size, room = [], 0, limit
            length = min(end - offset, room - room % page_size)
            out.append((offset, length))
            size += length
            offset += length
    if out:
        result.append(tuple(out))
    return result


def check_extents(raw: Any, region_bytes: int, limit: int = BATCH_BYTES) -> tuple[tuple[int, int], ...]:
    """Byte extents of a request (untrusted: a list of [offset, length]) inside a region of *region_bytes*,
    together at most *limit* bytes; PageListError otherwise."""
    if not isinstance(raw, list) or not raw or len(raw) > limit // 512:
        raise PageListError("extents are a non-empty list of [offset, length]")
    out = []
    total = 0
    for item in raw:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and
                all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
            raise PageListError(f"an extent is [offset, length] of integers, not {item!r:.60}")
        offset, length = item
        if offset < 0 or length <= 0 or offset + length > region_bytes:
            raise PageListError(f"extent ({offset}, {length}) is outside the {region_bytes}-byte region")
        total += length
        out.append((offset, length))
    if total > limit:
        raise PageListError(f"extents of {total} bytes exceed the {limit}-byte batch")
    return tuple(out)


@dataclass(frozen=True)
class PullAccount:
    """What a recovery moved against what it had to: dirty bytes (the pages on the source's lists since the
    baseline), page bytes pulled, bytes on the wire for them (frame headers and lists included), and the
    device state apart."""

    dirty_pages: int
    page_size: int
    pulled_bytes: int
    wire_bytes: int
    state_bytes: int
    requests: int

    @property
    def dirty_bytes(self) -> int:
        return self.dirty_pages * self.page_size

    @property
    def ratio(self) -> float:
        """Wire bytes of the pages over the dirty bytes (1.0 when nothing was dirty and nothing moved)."""
        if self.dirty_bytes == 0:
            return 1.0 if self.wire_bytes == 0 else float("inf")
        return self.wire_bytes / self.dirty_bytes

    @property
    def within_goal(self) -> bool:
        return self.ratio <= PULL_RATIO_LIMIT

    def to_dict(self) -> dict[str, Any]:
        return {"dirty_pages": self.dirty_pages, "dirty_bytes": self.dirty_bytes, "pulled_bytes": self.pulled_bytes,
                "wire_bytes": self.wire_bytes, "state_bytes": self.state_bytes, "requests": self.requests,
                "ratio": round(self.ratio, 4), "within_goal": self.within_goal}


__all__ = ["BATCH_BYTES", "Busy", "PULL_RATIO_LIMIT", "PageListError", "PullAccount", "batches", "check_extents",
           "check_runs", "continues", "pages", "union"]
