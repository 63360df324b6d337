"""The label index of a packed dataset: labels.npy, every sample's 40 attributes as uint8 (N, 40),
in manifest order (splits train, val, test; each split's shards in order; samples in tar order).

Written by the packer before the manifest that lists it, checked by sha256 when read, and checked
again row by row against a shard's own attr.npy members whenever the loader opens that shard. With
it the loader decides which samples each rank reads, and which match a `where` filter, before it
opens any shard: epochs are exact permutations and every rank gets an equal share.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np

from deeprecognition import storage
from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES, SPLITS
from deeprecognition.errors import InputError
from deeprecognition.shards.manifest import LabelsInfo, Manifest
from deeprecognition.shards.tario import npy_bytes

LABELS = "labels.npy"
_REPACK = "remove DATA/manifest.json and run the same `deeprec pack` again"

# Per process, indexes fetched from object storage: every loader of a run reads the same one (~8 MB
# for all of CelebA). A local index is read and checked anew each time (milliseconds).
_FETCHED: dict[tuple[str, str], np.ndarray] = {}


def write_labels(dataset: str, rows: np.ndarray) -> LabelsInfo:
    """Write the index of `rows` ((N, 40) uint8, manifest order) into the dataset folder."""
    data = npy_bytes(np.ascontiguousarray(rows, dtype=np.uint8))
    storage.write_bytes_atomic(storage.join(dataset, LABELS), data)
    return LabelsInfo(name=LABELS, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def split_rows(manifest: Manifest, split: str) -> slice:
    """Where `split`'s samples sit in the index."""
    start = 0
    for name in SPLITS:
        samples = manifest.splits[name].samples if name in manifest.splits else 0
        if name == split:
            return slice(start, start + samples)
        start += samples
    raise ValueError(f"unknown split {split!r}; this dataset has {', '.join(manifest.splits)}")


def read_labels(dataset: str, manifest: Manifest) -> np.ndarray:
    """The whole index, checked against the manifest (its sha256, shape and values)."""
    info = manifest.labels
    if info is None:
        raise ValueError("this manifest lists no label index")
    key = (dataset, info.sha256)
    if key not in _FETCHED:
        uri = storage.join(dataset, info.name)
        raw = storage.read_required(uri, f"the label index listed in manifest.json: {_REPACK}")
        if len(raw) != info.bytes or hashlib.sha256(raw).hexdigest() != info.sha256:
            raise InputError(
                uri, f"{len(raw)} bytes that do not match manifest.json (changed since packing): {_REPACK}"
            )
        rows = np.load(io.BytesIO(raw), allow_pickle=False)
        total = sum(s.samples for s in manifest.splits.values())
        if rows.shape != (total, len(CELEBA_ATTRIBUTES)) or rows.dtype != np.uint8 or rows.max(initial=0) > 1:
            raise InputError(
                uri, f"holds {rows.dtype}{rows.shape}, expected uint8 ({total}, 40) in {{0, 1}}: {_REPACK}"
            )
        if not storage.is_remote(dataset):
            return rows
        _FETCHED[key] = rows
    return _FETCHED[key]
