"""The training/evaluation input pipeline over a packed dataset (local or s3://, streamed by shard).

Which samples a rank reads is planned from the dataset's label index (shards/labels.py) before
any shard is opened:
- the split's samples that match `where` form one sequence: in evaluation in shard order; in
  training a fresh seeded permutation every epoch (the shards in random order, the samples of each
  shard in random order);
- the sequence is cut into contiguous parts of equal length (within one), one per slot (ranks x
  DataLoader workers), so each sample belongs to exactly one slot, every slot has work whenever
  there are at least as many samples as slots, and a slot opens only the shards its part touches;
- in training the shorter parts are padded with the sample just before them (fewer repeats than
  slots per epoch), so every rank runs the same number of steps, which DDP needs, and every image
  is seen at least once per epoch; evaluation parts are not padded: each sample counts once;
- `sampling="resample"` draws shards with replacement instead (WebDataset's `resampled=True`),
  for streams that want no epochs; an epoch then has the same length but no coverage guarantee.
Each shard is read whole (one GET, retried as a unit; from a remote dataset through the node's
shard cache, shards/cache.py, when `cache` names one), checked against its manifest sha256 and its
labels against the index, and walked in memory; images come out as uint8 (B, 3, H, W): float
conversion happens on the device. With `decode="gpu"` they come out as the batch's JPEG files
instead, for the device to decode (shards/device_decode.py).
"""

from __future__ import annotations

import gc
import logging
import math
import mmap
import multiprocessing
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

from deeprecognition import storage
from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES, attribute_index
from deeprecognition.errors import CorruptShardError
from deeprecognition.shards.cache import ShardCache, check_shard
from deeprecognition.shards.device_decode import EncodedImages, check_decode, encoded, stack_channels_last
from deeprecognition.shards.labels import read_labels, split_rows
from deeprecognition.shards.manifest import Manifest, ShardInfo, read_manifest
from deeprecognition.shards.sampling import SAMPLING, SplitIndex, epoch_order, part_bounds, resampled_rows, slot_rows
from deeprecognition.shards.tario import iter_samples, read_npy

log = logging.getLogger(__name__)


# Decoders only read the shard's bytes; copying 50 MB per shard into a writable buffer just to
# silence torch.frombuffer's read-only warning would cost more than the whole tar walk.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# (key, encoded image bytes, 40 attributes): decoding waits until a whole batch is assembled.
Sample = tuple[str, memoryview, np.ndarray]


class Batch(NamedTuple):
    images: torch.Tensor | EncodedImages  # (B, 3, H, W) uint8, channels_last memory; decode="gpu": the JPEG files
    targets: torch.Tensor  # (B, T) uint8, T = len(targets)
    keys: list[str]  # CelebA image ids without extension


@dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    data: str  # dataset folder: local path or s3://bucket/prefix
    split: str = "train"
    targets: tuple[str, ...] = CELEBA_ATTRIBUTES  # attribute names, CelebA order by default
    where: dict[str, int] = field(default_factory=dict)  # keep only samples with these values
    batch_size: int = 64
    training: bool = True
    sampling: str = "epoch"  # training: epoch (a permutation: every image once) | resample (shards with replacement)
    first_shards: int | None = None  # only the split's first N shards (benchmarks); None: all
    num_workers: int = 2
    seed: int = 0
    # Remote datasets: the node-local shard cache (shards/cache.py): "auto" (DEEPREC_CACHE_DIR, else
    # ~/.cache/deeprecognition/shards), a folder, or "" / "off": every read from the store. Off by
    # default here (benchmarks, evaluation); the training configs' data.cache defaults to "auto".
    cache: str = ""
    cache_gb: float = 50.0  # the cache's cap (it also never takes more than half the free disk)
    decode: str = "cpu"  # cpu: decoded images | gpu: JPEG files, decoded on the device (device_decode.images_on)


def parse_where(text: str) -> dict[str, int]:
    """ "Attractive=1,Male=0" -> {"Attractive": 1, "Male": 0}, names checked against CelebA's 40."""
    where: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or value.strip() not in ("0", "1"):
            raise ValueError(f"bad condition {part!r}: write NAME=1 or NAME=0, comma-separated")
        attribute_index(name.strip())
        where[name.strip()] = int(value)
    return where


def parse_conditions(text: str, attributes: Sequence[str], what: str) -> dict[str, int]:
    """ "Smiling=1,Male=0" -> {"Smiling": 1, "Male": 0}, each name one of the model's `attributes`;
    `what` (a flag or field) names the source in errors."""
    try:
        conditions = parse_where(text)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None
    unknown = [name for name in conditions if name not in attributes]
    if unknown:
        raise ValueError(
            f"{what}: {', '.join(unknown)} is not among the model's {len(attributes)} attributes "
            f"({', '.join(attributes)})"
        )
    return conditions


def decode_images(payloads: list[memoryview], encoding: str) -> torch.Tensor:
    """(B, 3, H, W) uint8 in channels_last memory from stored images: one torchvision call per
    batch (its per-call overhead rivals the decode of a 128x128 JPEG)."""
    if encoding == "jpg":
        images = decode_jpeg([torch.frombuffer(p, dtype=torch.uint8) for p in payloads], mode=ImageReadMode.RGB)
    else:
        images = [decode_image(p, encoding) for p in payloads]
    return stack_channels_last(images)


def decode_image(payload: memoryview, encoding: str) -> torch.Tensor:
    """(3, H, W) uint8 from a stored image."""
    if encoding == "npy":
        return torch.from_numpy(np.ascontiguousarray(read_npy(payload))).permute(2, 0, 1)
    raw = torch.frombuffer(payload, dtype=torch.uint8)
    if encoding == "jpg":
        return decode_jpeg(raw, mode=ImageReadMode.RGB)
    return decode_png(raw, mode=ImageReadMode.RGB)


def read_shard(data: str, shard: ShardInfo, cache: ShardCache | None = None) -> bytes | mmap.mmap:
    """A shard's bytes, checked against the manifest: a changed byte is an error naming the shard.

    A remote shard comes through `cache` when there is one (fetched once per node), else is fetched
    and hashed on every read; local files, cached ones included, are hashed once per process."""
    uri = storage.join(data, shard.name)
    try:
        if cache is not None and storage.is_remote(uri):
            return cache.read(uri, shard)
        raw, stamp = storage.read_buffer(uri)
    except FileNotFoundError:
        raise CorruptShardError(
            shard.name, f"missing: listed in {data}/manifest.json but not in the dataset folder"
        ) from None
    check_shard(uri, raw, shard, stamp)
    return raw


def _freeze_long_lived_objects() -> None:
    """Move the ~330k objects that importing torch leaves behind out of the garbage collector's
    sight (CPython's advice for forked workers): otherwise the collections that the loop's small
    per-sample allocations trigger keep re-walking them, ~8% of a 1-core loader's time."""
    if not gc.get_freeze_count():
        gc.freeze()


def dist_rank_world() -> tuple[int, int]:
    """This process's rank and world size: torch.distributed when initialised, else Ray Train's env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def split_index(data: str, manifest: Manifest, split: str, cache: ShardCache | None = None) -> SplitIndex:
    """The split's labels from the dataset's label index; a dataset packed before the index existed
    has its shards' labels read once instead."""
    shards = manifest.shards(split)
    if manifest.labels is not None:
        labels = read_labels(data, manifest)[split_rows(manifest, split)]
    else:
        log.warning(
            "%s has no label index (packed by an older release): reading the labels of every %s shard first; "
            "run the same `deeprec pack` again to add it",
            data,
            split,
        )
        scanned = [
            np.stack([read_npy(f["attr.npy"]) for _, f in iter_samples(read_shard(data, s, cache), s.name)])
            for s in shards
            if s.samples
        ]
        labels = np.concatenate(scanned) if scanned else np.zeros((0, len(CELEBA_ATTRIBUTES)), np.uint8)
    return SplitIndex.of(labels, (s.samples for s in shards))


class ShardStream(IterableDataset):
    """Batches from one split of a packed dataset, for one rank; see the module docstring."""

    def __init__(
        self,
        config: LoaderConfig,
        manifest: Manifest | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if config.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLING)}, got {config.sampling!r}")
        self.config = config
        self.manifest = manifest or read_manifest(config.data)
        check_decode(config.decode, self.manifest.image.encoding)
        self.shards = self.manifest.shards(config.split)
        # Resolved here, on the node that reads: "auto" is this node's cache folder.
        self.cache = ShardCache.of(config.cache, config.cache_gb) if storage.is_remote(config.data) else None
        default_rank, default_world = dist_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.target_idx = np.array([attribute_index(n) for n in config.targets], dtype=np.int64)
        self.index = split_index(config.data, self.manifest, config.split, self.cache)
        rows = self.index.matching((attribute_index(n), v) for n, v in config.where.items())
        self.rows = (
            rows
            if config.first_shards is None
            else rows[rows < self.index.starts[min(config.first_shards, self.index.shards)]]
        )
        if config.training and not len(self.rows):
            matching = f" matches {config.where}" if config.where else ""
            raise ValueError(f"no sample of split {config.split!r} in {config.data}{matching}: nothing to train on")
        self.size = self.manifest.image.size
        # Shared memory, so that persistent DataLoader workers (forked once) see set_epoch too.
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    @property
    def _workers(self) -> int:
        return max(1, self.config.num_workers)

    def _quota(self) -> int:
        """Samples each slot yields per training epoch: the same everywhere."""
        return math.ceil(len(self.rows) / (self.world_size * self._workers))

    def __len__(self) -> int:
        """Batches this rank yields per epoch; in training the same on every rank, which DDP needs."""
        batch = self.config.batch_size
        if self.config.training:
            return self._workers * math.ceil(self._quota() / batch)
        slots, first = self.world_size * self._workers, self.rank * self._workers
        return sum(
            math.ceil((stop - start) / batch)
            for start, stop in (part_bounds(len(self.rows), s, slots) for s in range(first, first + self._workers))
        )

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def rows_for(self, slot: int, slots: int) -> np.ndarray:
        """The rows `slot` of `slots` reads this epoch, in order."""
        cfg = self.config
        if not cfg.training:
            return slot_rows(self.rows, slot, slots)
        if cfg.sampling == "resample":
            return resampled_rows(self.index, self.rows, cfg.seed, self.epoch, slot, self._quota())
        return slot_rows(epoch_order(self.index, self.rows, cfg.seed, self.epoch), slot, slots, pad_to=self._quota())

    def samples(self, rows: np.ndarray) -> Iterator[Sample]:
        """The samples at `rows`, in that order; each run of one shard's rows opens the shard once."""
        if not len(rows):
            return
        shard_of = self.index.shard_of(rows)
        cuts = np.flatnonzero(np.diff(shard_of)) + 1
        for run, shard in zip(np.split(rows, cuts), shard_of[np.concatenate([[0], cuts])]):
            in_shard, base = self._shard_samples(int(shard)), self.index.starts[shard]
            for row in run:
                yield in_shard[row - base]

    def _shard_samples(self, s: int) -> list[Sample]:
        shard, encoding = self.shards[s], self.manifest.image.encoding
        samples = []
        for key, fields in iter_samples(read_shard(self.config.data, shard, self.cache), shard.name):
            if encoding not in fields or "attr.npy" not in fields:
                raise CorruptShardError(shard.name, f"sample {key} lacks its {encoding} or attr.npy member")
            samples.append((key, fields[encoding], read_npy(fields["attr.npy"])))
        indexed = self.index.labels[self.index.starts[s] : self.index.starts[s + 1]]
        if len(samples) != len(indexed) or not np.array_equal(np.stack([a for _, _, a in samples]), indexed):
            raise CorruptShardError(
                shard.name, "its samples' labels differ from the dataset's label index (labels.npy)"
            )
        return samples

    def __iter__(self) -> Iterator[Batch]:
        _freeze_long_lived_objects()
        yield from self.batches(self.samples(self.rows_for(*self._slot())))

    def batches(self, samples: Iterator[Sample]) -> Iterator[Batch]:
        chunk: list[Sample] = []
        for sample in samples:
            chunk.append(sample)
            if len(chunk) == self.config.batch_size:
                yield self._batch(chunk)
                chunk = []
        if chunk:
            yield self._batch(chunk)

    def _batch(self, chunk: list[Sample]) -> Batch:
        keys, payloads, attrs = zip(*chunk)
        images = (
            encoded(payloads)
            if self.config.decode == "gpu"
            else decode_images(list(payloads), self.manifest.image.encoding)
        )
        targets = torch.from_numpy(np.stack(attrs)[:, self.target_idx])
        return Batch(images, targets, list(keys))


def make_loader(
    config: LoaderConfig,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool = False,
    manifest: Manifest | None = None,
) -> DataLoader:
    """A DataLoader of Batches; call `loader.dataset.set_epoch(e)` before each training epoch."""
    stream = ShardStream(config, manifest, rank=rank, world_size=world_size)
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=config.num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if config.num_workers else None,
        # Workers live across epochs: no re-fork per epoch, and each keeps its verified shards.
        persistent_workers=config.num_workers > 0,
        # Batches are already tensors: skip the default per-field conversion walk over 256 keys.
        collate_fn=_as_is,
    )


def _as_is(batch: Batch) -> Batch:
    return batch
