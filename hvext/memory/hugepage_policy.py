"""Large-page priority (pure): decaying access scores per 2 MiB candidate, and which to map large (C5).

Input, once per interval: for each 2 MiB candidate of a guest's RAM (numbered
from the start of guest RAM), how many of its 4 KiB pages were accessed in the
interval (0..512; DAMON gives an estimate, see :mod:`hvext.memory.hugepages`).
A candidate's score decays exponentially and adds each new count::

    score' = score * decay + count,   decay = 0.5 ** (1 / half_life)

so a hot set keeps its rank through a quiet interval or two, and a region that
stops being used loses half its score every ``half_life`` intervals. Scores
below ``floor`` are dropped (they would never be chosen, and the table stays as
small as the touched part of guest RAM).

Choice: the candidates not already mapped large, highest score first (ties by
lower index, so the choice is deterministic), at most ``budget`` of them and
only those scoring at least ``min_score``. Nothing here performs I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

REGION_PAGES = 512  # 4 KiB pages per 2 MiB candidate
DEFAULT_HALF_LIFE = 4.0  # intervals
DEFAULT_FLOOR = 0.01  # scores below this are forgotten
DEFAULT_MIN_SCORE = 1.0  # a candidate worth a large page was touched at least this much (decayed pages)


@dataclass(frozen=True)
class Params:
    """Scoring parameters; checked on construction."""

    half_life: float = DEFAULT_HALF_LIFE
    floor: float = DEFAULT_FLOOR
    min_score: float = DEFAULT_MIN_SCORE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.half_life) and self.half_life > 0):
            raise ValueError(f"half_life must be a positive number of intervals, not {self.half_life!r}")
        if not (math.isfinite(self.floor) and self.floor >= 0):
            raise ValueError(f"floor must be >= 0, not {self.floor!r}")
        if not (math.isfinite(self.min_score) and self.min_score >= 0):
            raise ValueError(f"min_score must be >= 0, not {self.min_score!r}")

    @property
    def decay(self) -> float:
        """The factor applied to a score per interval."""
        return 0.5 ** (1.0 / self.half_life)


@dataclass
class Scores:
    """Decaying access scores of one guest's 2 MiB candidates (index -> score)."""

    params: Params = field(default_factory=Params)
    values: dict[int, float] = field(default_factory=dict)
    intervals: int = 0

    def update(self, counts: Mapping[int, float]) -> None:
        """Fold one interval's accessed-page counts in (candidates absent from *counts* had none)."""
        for index, count in counts.items():
            if index < 0:
                raise ValueError(f"candidate index must be >= 0, not {index}")
            if not (math.isfinite(count) and 0 <= count <= REGION_PAGES):
                raise ValueError(f"accessed pages of candidate {index} must be in 0..{REGION_PAGES}, not {count!r}")
        decay = self.params.decay
        new: dict[int, float] = {}
        for index in set(self.values) | set(counts):
            score = self.values.get(index, 0.0) * decay + counts.get(index, 0)
            if score >= self.params.floor and score > 0:
                new[index] = score
        self.values = new
        self.intervals += 1

    def ranked(self) -> list[tuple[int, float]]:
        """(index, score), hottest first; ties by lower index."""
        return sorted(self.values.items(), key=lambda item: (-item[1], item[0]))


@dataclass(frozen=True)
class Plan:
    """What to map large this round."""

    collapse: tuple[int, ...]  # candidate indexes, hottest first
    already_large: tuple[int, ...]  # scored candidates that are large now (skipped)
    budget: int

    def to_dict(self) -> dict[str, Any]:
        return {"collapse": list(self.collapse), "already_large": list(self.already_large), "budget": self.budget}


def choose(scores: Scores, large: Iterable[int], budget: int) -> Plan:
    """The at most *budget* hottest candidates that are not large yet and score at least ``min_score``."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, not {budget}")
    large_set = set(large)
    picked: list[int] = []
    skipped: list[int] = []
    for index, score in scores.ranked():
        if index in large_set:
            skipped.append(index)
        elif score >= scores.params.min_score and len(picked) < budget:
            picked.append(index)
    return Plan(tuple(picked), tuple(skipped), budget)
