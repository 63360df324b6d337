"""`deeprec verify DATA`: re-read every shard and check it against the manifest."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from deeprecognition import storage
from deeprecognition.errors import CorruptShardError, InputError
from deeprecognition.shards.labels import LABELS, read_labels, split_rows
from deeprecognition.shards.loader import decode_image
from deeprecognition.shards.manifest import SHARD_NAME, Manifest, ShardInfo, read_manifest
from deeprecognition.shards.tario import iter_samples, read_npy


@dataclass(frozen=True)
class ShardProblem:
    shard: str
    problem: str


@dataclass(frozen=True)
class VerifyReport:
    shards: int
    samples: int
    problems: list[ShardProblem]
    unlisted: list[str] = field(default_factory=list)  # shard files the manifest does not list: never read
    retries: int = 0  # storage operations retried (connections reset or cut), each also logged

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_samples(data: bytes, shard: ShardInfo, manifest: Manifest, indexed: np.ndarray | None) -> None:
    """Every sample of a shard whole and decodable, matching the manifest and (`indexed`: the
    shard's rows of the label index, when there is one) the label index."""
    encoding, size = manifest.image.encoding, manifest.image.size
    count = 0
    positives = np.zeros(len(manifest.attributes), dtype=np.int64)
    for key, fields in iter_samples(bytearray(data), shard.name):
        if encoding not in fields or "attr.npy" not in fields or "meta.json" not in fields:
            raise CorruptShardError(
                shard.name, f"sample {key} has members {sorted(fields)}, expected {encoding}, attr.npy, meta.json"
            )
        attrs = read_npy(fields["attr.npy"])
        if attrs.shape != (40,) or attrs.dtype != np.uint8 or attrs.max(initial=0) > 1:
            raise CorruptShardError(
                shard.name, f"sample {key}: attr.npy is {attrs.dtype}{attrs.shape}, expected 40 values in {{0, 1}}"
            )
        try:
            image = decode_image(fields[encoding], encoding)
        except RuntimeError as err:
            raise CorruptShardError(shard.name, f"sample {key}: image does not decode ({err})") from None
        if tuple(image.shape) != (3, size, size):
            raise CorruptShardError(
                shard.name, f"sample {key}: image is {tuple(image.shape)}, expected (3, {size}, {size})"
            )
        if indexed is not None and (count >= len(indexed) or not np.array_equal(indexed[count], attrs)):
            raise CorruptShardError(shard.name, f"sample {key}: its labels differ from the label index ({LABELS})")
        positives += attrs
        count += 1
    if count != shard.samples:
        raise CorruptShardError(shard.name, f"holds {count} samples, the manifest says {shard.samples}")
    if positives.tolist() != shard.attribute_counts:
        raise CorruptShardError(shard.name, "attribute counts differ from the manifest")


def verify_shard(
    dataset: str, shard: ShardInfo, manifest: Manifest, indexed: np.ndarray | None = None
) -> ShardProblem | None:
    try:
        data = storage.read_bytes(storage.join(dataset, shard.name))
    except FileNotFoundError:
        return ShardProblem(shard.name, "missing: listed in the manifest but not in the dataset folder")
    if len(data) != shard.bytes:
        return ShardProblem(shard.name, f"{len(data)} bytes, the manifest says {shard.bytes} (truncated or replaced)")
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        return ShardProblem(shard.name, "sha256 differs from the manifest (bytes changed since packing)")
    try:
        _check_samples(data, shard, manifest, indexed)
    except CorruptShardError as err:
        return ShardProblem(shard.name, err.problem)
    return None


def _shard_starts(manifest: Manifest, split: str) -> list[tuple[ShardInfo, int]]:
    """Each shard of `split` with the index row its first sample has."""
    first = split_rows(manifest, split).start
    shards = manifest.shards(split)
    return list(zip(shards, (first + np.cumsum([0] + [s.samples for s in shards[:-1]])).tolist()))


def _label_index(dataset: str, manifest: Manifest) -> tuple[np.ndarray | None, list[ShardProblem]]:
    """The label index to check the shards against (None without one), or its own problem."""
    if manifest.labels is None:
        return None, []
    try:
        return read_labels(dataset, manifest), []
    except InputError as err:
        return None, [ShardProblem(manifest.labels.name, err.message)]


def verify(dataset: str, num_workers: int = 4) -> VerifyReport:
    retries_before = storage.retry_count()
    manifest = read_manifest(dataset)
    shards = [s for split in manifest.splits.values() for s in split.shards]
    labels, problems = _label_index(dataset, manifest)
    rows = {
        shard.name: slice(start, start + shard.samples)
        for split in manifest.splits
        for shard, start in _shard_starts(manifest, split)
    }
    # Threads suffice: hashing and JPEG decoding release the GIL.
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = list(
            pool.map(
                lambda s: verify_shard(dataset, s, manifest, None if labels is None else labels[rows[s.name]]), shards
            )
        )
    listed = {s.name for s in shards}
    return VerifyReport(
        shards=len(shards),
        samples=sum(s.samples for s in shards),
        problems=problems + [r for r in results if r is not None],
        unlisted=[n for n in storage.list_names(dataset) if SHARD_NAME.match(n) and n not in listed],
        retries=storage.retry_count() - retries_before,
    )
