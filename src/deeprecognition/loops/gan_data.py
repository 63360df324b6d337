"""The real faces a GAN learns from: the shards filtered by attribute labels (`--where`) and,
optionally, by a trained classifier's judgement (`--where-classifier`), streamed without copying data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from deeprecognition.config import GanConfig
from deeprecognition.shards.loader import Batch, LoaderConfig, make_loader, parse_where
from deeprecognition.trained import TrainedClassifier


def judged_positive(batches: Iterable[Batch], classifier: TrainedClassifier, attribute: str, threshold: float, batch_size: int) -> Iterator[Batch]:
    """Batches of `batch_size` faces that `classifier` scores >= threshold on `attribute`, in
    stream order; the remainder of a finite stream comes last as a shorter batch."""
    index = classifier.attribute_index(attribute)
    images: list[torch.Tensor] = []
    keys: list[str] = []
    targets: list[torch.Tensor] = []
    for batch in batches:
        keep = (classifier.probabilities(batch.images)[:, index] >= threshold).cpu()
        images.append(batch.images[keep])
        targets.append(batch.targets[keep])
        keys += [k for k, kept in zip(batch.keys, keep.tolist()) if kept]
        while len(keys) >= batch_size:
            pooled, pooled_targets = torch.cat(images), torch.cat(targets)
            yield Batch(pooled[:batch_size], pooled_targets[:batch_size], keys[:batch_size])
            images, targets, keys = [pooled[batch_size:]], [pooled_targets[batch_size:]], keys[batch_size:]
    if keys:
        yield Batch(torch.cat(images), torch.cat(targets), keys)


def _filter(cfg: GanConfig, batches: Iterable[Batch], device: torch.device, batch_size: int) -> Iterable[Batch]:
    if not cfg.data.where_classifier:
        return batches
    classifier = TrainedClassifier.load(cfg.data.where_classifier, device)
    return judged_positive(batches, classifier, cfg.data.classifier_attribute, cfg.data.threshold, batch_size)


def real_batches(cfg: GanConfig, rank: int, world_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """An endless stream of this rank's real uint8 batches, all of exactly data.batch_size faces."""
    config = LoaderConfig(
        data=cfg.data.data, split="train", targets=(), where=parse_where(cfg.data.where), batch_size=cfg.data.batch_size,
        num_workers=cfg.data.loader_workers, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.optim.seed,
    )
    loader = make_loader(config, rank, world_size, pin_memory=device.type == "cuda")

    def epochs() -> Iterator[Batch]:
        epoch = 0
        while True:
            loader.dataset.set_epoch(epoch)
            yield from loader
            epoch += 1

    for batch in _filter(cfg, epochs(), device, cfg.data.batch_size):
        if len(batch.keys) == cfg.data.batch_size:  # equal batches on every rank
            yield batch.images


def reference_faces(cfg: GanConfig, n: int, device: torch.device, targets: tuple[str, ...] = ()) -> Batch:
    """Up to `n` real faces the GAN learns from (the same filters), in a fixed order: what FID
    compares generated faces with. Targets: the labels to bring along (for label rates)."""
    config = LoaderConfig(data=cfg.data.data, split="train", targets=targets, where=parse_where(cfg.data.where), training=False, batch_size=256, num_workers=0)
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    keys: list[str] = []
    for batch in _filter(cfg, make_loader(config), device, 256):
        images.append(batch.images)
        labels.append(batch.targets)
        keys += batch.keys
        if len(keys) >= n:
            break
    if not keys:
        raise ValueError(f"no training faces in {cfg.data.data} match where={cfg.data.where!r}" + (" and the classifier filter" if cfg.data.where_classifier else ""))
    return Batch(torch.cat(images)[:n], torch.cat(labels)[:n], keys[:n])
