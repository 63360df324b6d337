"""The real faces a GAN learns from: the shards filtered by attribute labels (`--where`) and,
optionally, by a trained classifier's judgement (`--where-classifier`), streamed without copying data."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from deeprecognition.classifier.trained import TrainedClassifier
from deeprecognition.config import GanConfig
from deeprecognition.runs.distributed import gather_sizes
from deeprecognition.shards.device_decode import images_on, require_cuda
from deeprecognition.shards.loader import Batch, ShardStream, make_loader, parse_where


def judged_positive(
    batches: Iterable[Batch], classifier: TrainedClassifier, attribute: str, threshold: float, batch_size: int
) -> Iterator[Batch]:
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


def on_device(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Batches with their images on `device`, decoded there when the loader handed over JPEG files."""
    for batch in batches:
        yield Batch(images_on(batch.images, device), batch.targets, batch.keys)


def real_batches(cfg: GanConfig, rank: int, world_size: int, device: torch.device) -> Iterator[Batch]:
    """An endless stream of this rank's real batches, all of exactly data.batch_size faces: uint8
    images on `device`, and the labels of a conditional model's attributes (B, K) uint8 (K = 0
    without conditions), on the CPU."""
    require_cuda(cfg.data.decode, device)
    config = cfg.data.loader("train", cfg.condition_attributes(), cfg.optim.seed, where=parse_where(cfg.data.where))
    loader = make_loader(config, rank, world_size, pin_memory=device.type == "cuda")

    def epochs() -> Iterator[Batch]:
        epoch = 0
        while True:
            loader.dataset.set_epoch(epoch)
            yield from on_device(loader, device)
            epoch += 1

    for batch in _filter(cfg, epochs(), device, cfg.data.batch_size):
        if len(batch.keys) == cfg.data.batch_size:  # equal batches on every rank
            yield batch


@dataclass
class RealShare:
    """One rank's share of a GAN's reference set: the first n faces of the train split that pass the
    run's filters, in shard order. The set does not depend on how many ranks read it."""

    images: torch.Tensor  # (k, 3, S, S) uint8, this rank's faces
    targets: torch.Tensor  # (k, T) uint8
    keys: list[str]
    positions: torch.Tensor  # (k,) int64: each face's place in the set, 0 .. total - 1
    total: int  # faces in the whole set, every rank's together


def reference_faces(
    cfg: GanConfig, n: int, device: torch.device, rank: int = 0, world_size: int = 1, targets: tuple[str, ...] = ()
) -> RealShare:
    """This rank's share of the `n` real faces FID compares generated ones with (see RealShare).

    The filtered split is read in waves: each rank takes one of `world_size` consecutive chunks of
    ceil(n / world_size) faces, the ranks learn how many of each chunk passed (the classifier
    filter, when there is one, keeps only some) and keep those that fall within the first n: one
    small collective per wave, the same number of waves on every rank. Without a classifier only
    the faces kept are decoded. Targets: labels to bring along. The faces are decoded as the run's
    training faces are (data.decode), except on a device without CUDA (`deeprec evaluate-gan` of a
    GPU run on a laptop), where the CPU decodes them."""
    stream = _reference_stream(cfg, targets, device, rank, world_size)
    judge = TrainedClassifier.load(cfg.data.where_classifier, device) if cfg.data.where_classifier else None
    chunk, found, start = math.ceil(n / world_size), 0, 0
    kept: list[Batch] = []
    positions: list[torch.Tensor] = []
    while found < n and start < len(stream.rows):
        mine = stream.rows[start + rank * chunk : start + (rank + 1) * chunk]
        start += chunk * world_size
        passed = _judged(cfg, stream, mine, judge, device) if judge else None
        counts = gather_sizes(len(mine) if passed is None else len(passed.keys), device)
        offset = found + sum(counts[:rank])
        take = max(0, min(counts[rank], n - offset))
        found += sum(counts)
        if take:
            kept.append(
                _joined(stream, _read(stream, mine[:take], device))
                if passed is None
                else Batch(*(field[:take] for field in passed))
            )
            positions.append(torch.arange(offset, offset + take))
    if not found:
        raise ValueError(
            f"no training faces in {cfg.data.data} match where={cfg.data.where!r}"
            + (" and the classifier filter" if judge else "")
        )
    share = _joined(stream, kept)
    return RealShare(
        share.images,
        share.targets,
        share.keys,
        torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64),
        min(n, found),
    )


def _reference_stream(
    cfg: GanConfig, targets: tuple[str, ...], device: torch.device, rank: int, world_size: int
) -> ShardStream:
    """The train split through the run's --where filter, decoded as training decodes it where CUDA is."""
    decode = cfg.data.decode if device.type == "cuda" else "cpu"
    return ShardStream(
        cfg.data.loader(
            "train",
            targets,
            cfg.optim.seed,
            where=parse_where(cfg.data.where),
            training=False,
            batch_size=256,
            num_workers=0,
            decode=decode,
        ),
        rank=rank,
        world_size=world_size,
    )


def _judged(cfg: GanConfig, stream: ShardStream, rows, judge: TrainedClassifier, device: torch.device) -> Batch:
    """The faces of `rows` the classifier filter keeps, as one batch."""
    faces = _read(stream, rows, device)
    return _joined(stream, judged_positive(faces, judge, cfg.data.classifier_attribute, cfg.data.threshold, 256))


def _read(stream: ShardStream, rows, device: torch.device) -> Iterator[Batch]:
    return on_device(stream.batches(stream.samples(rows)), device)


def _joined(stream: ShardStream, batches: Iterable[Batch]) -> Batch:
    """Batches as one (possibly empty) batch."""
    batches = list(batches)
    if not batches:
        side = stream.size
        return Batch(
            torch.zeros((0, 3, side, side), dtype=torch.uint8),
            torch.zeros((0, len(stream.target_idx)), dtype=torch.uint8),
            [],
        )
    return Batch(
        torch.cat([b.images for b in batches]),
        torch.cat([b.targets for b in batches]),
        [k for b in batches for k in b.keys],
    )
