"""The partition plan: which rows of which shard each rank reads.

Ranks get contiguous runs of the global sample index, balanced to within one sample, so a
shard may be split across ranks. The rank that reads a shard's first row owns the shard: it
collects the other ranks' pieces and writes the shard's predictions file.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of shard ``shard`` (an index into the run's shard list)."""

    shard: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def rank_bounds(total: int, size: int, rank: int) -> tuple[int, int]:
    """Global index range of ``rank``: the first ``total % size`` ranks get one row more."""
    base, extra = divmod(total, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def plan_pieces(rows: list[int], size: int) -> list[list[Piece]]:
    """For every rank, the shard pieces covering its global range, in global order."""
    offsets = list(itertools.accumulate(rows, initial=0))
    plan: list[list[Piece]] = []
    for rank in range(size):
        lo, hi = rank_bounds(offsets[-1], size, rank)
        pieces = []
        # Only the shards that meet this rank's range: ranks x shards grows past a million.
        shard = bisect.bisect_right(offsets, lo) - 1
        while shard < len(rows) and offsets[shard] < hi:
            start, stop = max(lo, offsets[shard]), min(hi, offsets[shard + 1])
            if start < stop:
                pieces.append(Piece(shard, start - offsets[shard], stop - offsets[shard]))
            shard += 1
        plan.append(pieces)
    return plan


def shard_owners(plan: list[list[Piece]]) -> dict[int, int]:
    """Shard index -> the rank that reads its first row."""
    return {p.shard: rank for rank, pieces in enumerate(plan) for p in pieces if p.start == 0}
