"""Which samples of a split each slot (a rank's DataLoader worker) reads: pure functions of the label
index, the filter, the seed, the epoch and the slot, so every rank computes the same plan without
talking to the others. The policy is described in shards/loader.py.

Samples are named by row: row r of a split is sample r - starts[s] of its shard s, in tar order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

# data.sampling, typed: its values are the config's choices.
Sampling = Literal["epoch", "resample"]
SAMPLING: tuple[str, ...] = get_args(Sampling)


@dataclass(frozen=True)
class SplitIndex:
    labels: np.ndarray  # (N, 40) uint8: the split's samples, shard after shard
    starts: np.ndarray  # (S + 1,) int64: shard s holds rows starts[s] .. starts[s + 1] - 1

    @classmethod
    def of(cls, labels: np.ndarray, shard_sizes: Iterable[int]) -> SplitIndex:
        starts = np.concatenate([[0], np.cumsum(list(shard_sizes), dtype=np.int64)]).astype(np.int64)
        if starts[-1] != len(labels):
            raise ValueError(f"the label index has {len(labels)} rows for shards holding {starts[-1]} samples")
        return cls(labels, starts)

    @property
    def shards(self) -> int:
        return len(self.starts) - 1

    def matching(self, where: Iterable[tuple[int, int]]) -> np.ndarray:
        """Rows, ascending, whose attribute `index` has `value` for every (index, value)."""
        keep = np.ones(len(self.labels), dtype=bool)
        for index, value in where:
            keep &= self.labels[:, index] == value
        return np.flatnonzero(keep)

    def shard_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, rows, side="right") - 1

    def by_shard(self, rows: np.ndarray) -> list[np.ndarray]:
        """Ascending `rows` split into one array per shard (empty where a shard has none)."""
        return np.split(rows, np.searchsorted(rows, self.starts[1:-1])) if self.shards else []


def epoch_order(index: SplitIndex, rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """`rows` permuted for one epoch: the shards in a random order, each shard's rows shuffled."""
    rng = np.random.default_rng([seed, epoch])
    groups = index.by_shard(rows)
    if not groups:
        return rows
    return np.concatenate([rng.permutation(groups[s]) for s in rng.permutation(len(groups))])


def part_bounds(total: int, slot: int, slots: int) -> tuple[int, int]:
    """[start, stop) of `slot`'s contiguous part of a sequence of `total`: sizes differ by at most
    one, the longer parts first."""
    size, longer = divmod(total, slots)
    start = slot * size + min(slot, longer)
    return start, start + size + (slot < longer)


def slot_rows(sequence: np.ndarray, slot: int, slots: int, pad_to: int | None = None) -> np.ndarray:
    """`slot`'s part of `sequence`; with `pad_to`, preceded by the samples just before it to reach
    that length: those lie in the shard the part starts in, which the slot opens anyway."""
    start, stop = part_bounds(len(sequence), slot, slots)
    part = sequence[start:stop]
    if pad_to is None or not len(sequence):
        return part
    missing = pad_to - len(part)
    return np.concatenate([sequence[(start - missing + np.arange(missing)) % len(sequence)], part])


def resampled_rows(index: SplitIndex, rows: np.ndarray, seed: int, epoch: int, slot: int, quota: int) -> np.ndarray:
    """`quota` rows from shards drawn with replacement (weighted by how many of `rows` each holds),
    each drawn shard's rows shuffled."""
    rng = np.random.default_rng([seed, epoch, slot])
    groups = [g for g in index.by_shard(rows) if len(g)]
    if not groups:
        return rows[:0]
    weights = np.array([len(g) for g in groups], dtype=np.float64)
    drawn: list[np.ndarray] = []
    total = 0
    while total < quota:
        drawn.append(rng.permutation(groups[rng.choice(len(groups), p=weights / weights.sum())]))
        total += len(drawn[-1])
    return np.concatenate(drawn)[:quota]
