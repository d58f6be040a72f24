"""The order in which training sequences are read, and how it is shared among streams.

Epoch e reads the N training sequences in a canonical order fixed by (seed, e): shards in a
shuffled order, and inside each shard its samples in a shuffled order. A *plan* is a list of
half-open intervals of positions in that order. The S = dp_size x workers streams each take a
contiguous, near-equal part of the plan, so a stream touches at most a few shards and the
streams together read every position of every epoch exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

Interval = tuple[int, int]


def split_even(plan: Sequence[Interval], parts: int) -> list[list[Interval]]:
    """Cut the concatenation of `plan` into `parts` contiguous pieces whose sizes differ by <= 1."""
    total = sum(b - a for a, b in plan)
    bounds = [total * k // parts for k in range(parts + 1)]
    return [_window(plan, bounds[k], bounds[k + 1]) for k in range(parts)]


def drop_prefix(plan: Sequence[Interval], count: int) -> list[Interval]:
    """`plan` without its first `count` positions."""
    return _window(plan, count, sum(b - a for a, b in plan))


def plan_size(plan: Sequence[Interval]) -> int:
    return sum(b - a for a, b in plan)


def merge(plan: Sequence[Interval]) -> list[Interval]:
    """Sorted, with touching intervals joined."""
    out: list[Interval] = []
    for a, b in sorted(p for p in plan if p[1] > p[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _window(plan: Sequence[Interval], lo: int, hi: int) -> list[Interval]:
    """Positions lo..hi (counted along the concatenated plan) as intervals."""
    out, offset = [], 0
    for a, b in plan:
        start, stop = max(a, a + lo - offset), min(b, a + hi - offset)
        if start < stop:
            out.append((start, stop))
        offset += b - a
    return out


@dataclass(frozen=True)
class EpochOrder:
    """Canonical read order of one epoch: position p -> (shard, index inside the shard)."""

    shard_samples: tuple[int, ...]
    seed: int
    epoch: int

    @cached_property
    def shard_perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shard_samples))

    @cached_property
    def shard_offsets(self) -> np.ndarray:
        """Start position of each shard of shard_perm in this epoch's order, plus the total."""
        sizes = np.asarray(self.shard_samples, dtype=np.int64)[self.shard_perm]
        return np.concatenate([[0], np.cumsum(sizes)])

    def sample_perm(self, shard: int) -> np.ndarray:
        """Order of the samples inside `shard` this epoch."""
        rng = np.random.default_rng([self.seed, self.epoch, shard])
        return rng.permutation(self.shard_samples[shard])

    def pieces(self, plan: Sequence[Interval]) -> list[tuple[int, np.ndarray]]:
        """The plan as (shard, sample indices in read order), consecutive runs of one shard."""
        out: list[tuple[int, np.ndarray]] = []
        for a, b in plan:
            first = int(np.searchsorted(self.shard_offsets, a, side="right")) - 1
            pos = a
            for j in range(first, len(self.shard_perm)):
                start, stop = self.shard_offsets[j], self.shard_offsets[j + 1]
                if pos >= b:
                    break
                shard = int(self.shard_perm[j])
                local = self.sample_perm(shard)[pos - start : min(b, stop) - start]
                if out and out[-1][0] == shard:
                    out[-1] = (shard, np.concatenate([out[-1][1], local]))
                else:
                    out.append((shard, local))
                pos = min(b, stop)
        return out
