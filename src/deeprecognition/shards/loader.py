"""The training/evaluation input pipeline over a packed dataset (local or s3://, streamed by shard).

WebDataset's conventions, with a lean inner loop:
- shards are split across ranks x DataLoader workers ("slots");
- training draws shards with replacement (WebDataset's `resampled=True`), shuffles through a buffer
  and yields an exact number of samples per rank per epoch, so every DDP rank runs the same number
  of steps; evaluation reads each shard once, so every sample is seen exactly once across ranks;
- each shard is read whole (one GET, retried as a unit), checked against its manifest sha256, and
  walked in memory; images come out as uint8 (B, 3, H, W): float conversion happens on the device.
"""

from __future__ import annotations

import gc
import hashlib
import math
import mmap
import multiprocessing
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

from deeprecognition import storage
from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES, attribute_index
from deeprecognition.errors import CorruptShardError
from deeprecognition.shards.manifest import Manifest, ShardInfo, read_manifest
from deeprecognition.shards.tario import iter_samples, read_npy


# Decoders only read the shard's bytes; copying 50 MB per shard into a writable buffer just to
# silence torch.frombuffer's read-only warning would cost more than the whole tar walk.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

# (key, encoded image bytes, 40 attributes): decoding waits until a whole batch is assembled, and
# the shuffle buffer holds compressed bytes, a tenth of the memory of decoded images.
Sample = tuple[str, memoryview, np.ndarray]


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) uint8, channels_last memory
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
    epoch_samples: int | None = None  # per rank; None: the split's size / world size (training)
    shuffle_buffer: int = 2000
    num_workers: int = 2
    seed: int = 0


def parse_where(text: str) -> dict[str, int]:
    """"Attractive=1,Male=0" -> {"Attractive": 1, "Male": 0}, names checked against CelebA's 40."""
    where: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or value.strip() not in ("0", "1"):
            raise ValueError(f"bad condition {part!r}: write NAME=1 or NAME=0, comma-separated")
        attribute_index(name.strip())
        where[name.strip()] = int(value)
    return where


def decode_images(payloads: list[memoryview], encoding: str) -> torch.Tensor:
    """(B, 3, H, W) uint8 in channels_last memory from stored images.

    One torchvision call per batch (its per-call overhead rivals the decode of a 128x128 JPEG).
    Decoders hand back HWC memory viewed as CHW: stacking the HWC views is a plain memcpy, where
    stacking CHW would be a strided transpose costing a quarter of the throughput. The result is
    channels_last, the layout the GPU step wants anyway.
    """
    if encoding == "jpg":
        images = decode_jpeg([torch.frombuffer(p, dtype=torch.uint8) for p in payloads], mode=ImageReadMode.RGB)
    else:
        images = [decode_image(p, encoding) for p in payloads]
    return torch.stack([img.permute(1, 2, 0) for img in images]).permute(0, 3, 1, 2)


def decode_image(payload: memoryview, encoding: str) -> torch.Tensor:
    """(3, H, W) uint8 from a stored image."""
    if encoding == "npy":
        return torch.from_numpy(np.ascontiguousarray(read_npy(payload))).permute(2, 0, 1)
    raw = torch.frombuffer(payload, dtype=torch.uint8)
    if encoding == "jpg":
        return decode_jpeg(raw, mode=ImageReadMode.RGB)
    return decode_png(raw, mode=ImageReadMode.RGB)


# Local shard files this process has already checked, with the (inode, size, mtime_ns) it checked:
# training rereads every shard many times, and hashing is ~5% of a core's loader time.
_VERIFIED: dict[str, tuple[tuple[int, int, int], str]] = {}


def read_shard(data: str, shard: ShardInfo) -> bytes | mmap.mmap:
    """A shard's bytes, checked against the manifest: a changed byte is an error naming the shard.

    Bytes from S3 are hashed on every fetch; an unchanged local file once per process."""
    uri = storage.join(data, shard.name)
    try:
        raw, stamp = storage.read_buffer(uri)
    except FileNotFoundError:
        raise CorruptShardError(shard.name, f"missing: listed in {data}/manifest.json but not in the dataset folder") from None
    if stamp is not None and _VERIFIED.get(uri) == (stamp, shard.sha256):
        return raw
    if len(raw) != shard.bytes:
        raise CorruptShardError(shard.name, f"{len(raw)} bytes, the manifest says {shard.bytes} (truncated or replaced)")
    if hashlib.sha256(raw).hexdigest() != shard.sha256:
        raise CorruptShardError(shard.name, "its sha256 does not match the manifest (bytes changed since packing)")
    if stamp is not None:
        _VERIFIED[uri] = (stamp, shard.sha256)
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


class ShardStream(IterableDataset):
    """Batches from one split of a packed dataset, for one rank; see the module docstring."""

    def __init__(self, config: LoaderConfig, manifest: Manifest | None = None, rank: int | None = None, world_size: int | None = None) -> None:
        self.config = config
        self.manifest = manifest or read_manifest(config.data)
        self.shards = self.manifest.shards(config.split)
        default_rank, default_world = dist_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        self.target_idx = np.array([attribute_index(n) for n in config.targets], dtype=np.int64)
        self.where = [(attribute_index(n), v) for n, v in config.where.items()]
        self.size = self.manifest.image.size
        # Shared memory, so that persistent DataLoader workers (forked once) see set_epoch too.
        self._epoch = multiprocessing.Value("q", 0, lock=False)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def rank_samples(self) -> int:
        """Samples this rank yields per epoch (training); evaluation yields its shards' samples."""
        if self.config.epoch_samples is not None:
            return self.config.epoch_samples
        return math.ceil(self.manifest.splits[self.config.split].samples / self.world_size)

    def __len__(self) -> int:
        """Batches per epoch in training: the same on every rank, which DDP needs."""
        workers = max(1, self.config.num_workers)
        quota = self.rank_samples()
        return sum(math.ceil(self._worker_quota(quota, w, workers) / self.config.batch_size) for w in range(workers))

    @staticmethod
    def _worker_quota(quota: int, worker: int, workers: int) -> int:
        return quota // workers + (1 if worker < quota % workers else 0)

    def _slot(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * workers + worker, self.world_size * workers, worker, workers

    def _samples(self, shard: ShardInfo) -> Iterator[Sample]:
        data = read_shard(self.config.data, shard)
        encoding = self.manifest.image.encoding
        for key, fields in iter_samples(data, shard.name):
            if encoding not in fields or "attr.npy" not in fields:
                raise CorruptShardError(shard.name, f"sample {key} lacks its {encoding} or attr.npy member")
            attrs = read_npy(fields["attr.npy"])
            if not self.where or all(attrs[i] == v for i, v in self.where):
                yield key, fields[encoding], attrs

    def _eval_samples(self, slot: int, slots: int) -> Iterator[Sample]:
        for shard in self.shards[slot::slots]:
            yield from self._samples(shard)

    def _train_samples(self, slot: int, quota: int) -> Iterator[Sample]:
        rng = np.random.default_rng([self.config.seed, self.epoch, slot])
        weights = np.array([s.samples for s in self.shards], dtype=np.float64)
        if quota and not weights.sum():
            raise ValueError(f"split {self.config.split!r} of {self.config.data} has no samples to train on")
        buffer: list[Sample] = []
        produced = draws = 0
        while produced < quota:
            shard = self.shards[rng.choice(len(self.shards), p=weights / weights.sum())]
            draws += 1
            for sample in self._samples(shard):
                buffer.append(sample)
                if len(buffer) >= self.config.shuffle_buffer:
                    yield buffer.pop(rng.integers(len(buffer)))
                    produced += 1
                    if produced == quota:
                        return
            if not buffer and produced == 0 and draws >= 4 * len(self.shards):
                raise ValueError(f"no sample of split {self.config.split!r} in {self.config.data} matches {self.config.where}")
        while produced < quota and buffer:
            yield buffer.pop(rng.integers(len(buffer)))
            produced += 1

    def __iter__(self) -> Iterator[Batch]:
        _freeze_long_lived_objects()
        slot, slots, worker, workers = self._slot()
        if self.config.training:
            samples = self._train_samples(slot, self._worker_quota(self.rank_samples(), worker, workers))
        else:
            samples = self._eval_samples(slot, slots)
        yield from self._batches(samples)

    def _batches(self, samples: Iterator[Sample]) -> Iterator[Batch]:
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
        images = decode_images(list(payloads), self.manifest.image.encoding)
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
