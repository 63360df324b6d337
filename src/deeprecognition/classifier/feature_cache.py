"""Frozen-backbone feature cache: with `--freeze all` the backbone's output for an image never
changes (the data has no augmentation), so it is computed once per image and the head trains on
the cached features, epoch after epoch, at the cost of a small matrix product per sample.

A cache stands in for a loader: it yields `Batch`es whose `images` are (B, 2048) features, so the
loop's train step and evaluation run unchanged on the head.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from deeprecognition.shards.loader import Batch


class FeatureCache:
    def __init__(
        self,
        features: torch.Tensor,
        targets: torch.Tensor,
        keys: list[str],
        batch_size: int,
        training: bool,
        rank_quota: int,
        seed: int,
        rank: int,
    ) -> None:
        self.features = features  # (N, 2048) float32, this rank's share of the split
        self.targets = targets  # (N, T) uint8
        self.keys = keys
        self.batch_size = batch_size
        self.training = training
        self.rank_quota = rank_quota  # samples per epoch in training: equal on every rank (DDP)
        self.seed, self.rank, self.epoch = seed, rank, 0
        self.dataset = self  # the loop calls loader.dataset.set_epoch(e), as on a DataLoader

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        norm: nn.Module,
        loader,
        device: torch.device,
        training: bool,
        world_size: int,
        seed: int,
        rank: int,
    ) -> FeatureCache:
        """One pass of the backbone over every image `loader` gives this rank (an evaluation loader:
        each image once across ranks)."""
        model.eval()
        features, targets, keys = [], [], []
        for batch in loader:
            features.append(model.features(norm(batch.images.to(device, non_blocking=True))).float().cpu())
            targets.append(batch.targets)
            keys += batch.keys
        split = loader.dataset.manifest.splits[loader.dataset.config.split].samples
        return cls(
            torch.cat(features) if features else torch.zeros((0, 2048)),
            torch.cat(targets) if targets else torch.zeros((0, len(loader.dataset.target_idx)), dtype=torch.uint8),
            keys,
            loader.dataset.config.batch_size,
            training,
            math.ceil(split / world_size),
            seed,
            rank,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        n = len(self.keys)
        if not self.training:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        # Ranks hold unequal shares (whole shards each): top up with repeats to the common quota.
        extra = rng.integers(n, size=max(0, self.rank_quota - n)) if n else np.zeros(0, np.int64)
        return np.concatenate([rng.permutation(n), extra])[: self.rank_quota]

    def __len__(self) -> int:
        return math.ceil((self.rank_quota if self.training else len(self.keys)) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        for start in range(0, len(order), self.batch_size):
            idx = torch.from_numpy(order[start : start + self.batch_size])
            yield Batch(self.features[idx], self.targets[idx], [self.keys[i] for i in idx.tolist()])
