"""manifest.json: the one file that says what a dataset is. No manifest, no dataset.

Written last and atomically by the packer; read by the loader, verify and stats. Every field is
checked on load, and a bad one is reported by its dotted name.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from deeprecognition import storage
from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES, SPLITS
from deeprecognition.errors import InputError

FORMAT = "deeprecognition-celeba-wds"
VERSION = 1
MANIFEST = "manifest.json"
ENCODINGS = ("jpg", "png", "npy")
RESIZE_MODES = ("squash", "center-crop")
SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")  # what the packer names shards


@dataclass(frozen=True)
class ShardInfo:
    name: str  # "{split}-{index:06d}.tar"
    samples: int
    bytes: int
    sha256: str
    attribute_counts: list[int]  # positives per attribute, CelebA order: stats without reading shards


@dataclass(frozen=True)
class SplitInfo:
    samples: int
    shards: list[ShardInfo]


@dataclass(frozen=True)
class ImageInfo:
    size: int  # square side in pixels
    resize: str
    encoding: str
    quality: int | None  # JPEG quality; None for lossless encodings


@dataclass(frozen=True)
class LabelsInfo:
    """The label index (shards/labels.py): every sample's 40 attributes in one file, so the loader
    plans which samples each rank reads, and filters by attribute, before opening any shard."""

    name: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    image: ImageInfo
    split_policy: dict[str, Any]  # {"name": "official"} or {"name": "random", "seed": 0, "fractions": [...]}
    splits: dict[str, SplitInfo]
    skipped: dict[str, Any]  # {"undecodable": n, "undecodable_files": [...], "missing": n, "missing_files": [...]}
    source: dict[str, Any]  # {"layout": ..., "fingerprint": ..., "images_listed": n}
    attributes: list[str] = field(default_factory=lambda: list(CELEBA_ATTRIBUTES))
    labels: LabelsInfo | None = None  # None: packed before the index existed (the loader then scans the shards)
    format: str = FORMAT
    version: int = VERSION

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise ValueError(f"unknown split {split!r}; this dataset has {', '.join(self.splits)}")
        return self.splits[split].shards

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=False) + "\n").encode()


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, path: str) -> Any:
    if key not in data:
        raise InputError(path, f"field {where}{key} is missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InputError(path, f"field {where}{key} has type {type(value).__name__}, expected {kind}")
    return value


def _shard_from_dict(d: dict[str, Any], where: str, path: str) -> ShardInfo:
    shard = ShardInfo(
        name=_require(d, "name", str, where, path),
        samples=_require(d, "samples", int, where, path),
        bytes=_require(d, "bytes", int, where, path),
        sha256=_require(d, "sha256", str, where, path),
        attribute_counts=_require(d, "attribute_counts", list, where, path),
    )
    if "/" in shard.name or "\\" in shard.name or shard.name.startswith("."):
        raise InputError(path, f"field {where}name {shard.name!r} is not a plain shard file name")
    if len(shard.attribute_counts) != len(CELEBA_ATTRIBUTES):
        raise InputError(path, f"field {where}attribute_counts must have {len(CELEBA_ATTRIBUTES)} entries")
    return shard


def manifest_from_dict(data: dict[str, Any], path: str = MANIFEST) -> Manifest:
    if data.get("format") != FORMAT:
        raise InputError(
            path, f"field format is {data.get('format')!r}, expected {FORMAT!r}: not a DeepRecognition dataset"
        )
    if data.get("version") != VERSION:
        raise InputError(
            path, f"field version is {data.get('version')!r}; this release reads version {VERSION}: repack the dataset"
        )
    if data.get("attributes") != list(CELEBA_ATTRIBUTES):
        raise InputError(path, "field attributes must list the 40 CelebA attributes in CelebA order")
    img = _require(data, "image", dict, "", path)
    image = ImageInfo(
        size=_require(img, "size", int, "image.", path),
        resize=_require(img, "resize", str, "image.", path),
        encoding=_require(img, "encoding", str, "image.", path),
        quality=img.get("quality"),
    )
    if image.encoding not in ENCODINGS:
        raise InputError(path, f"field image.encoding is {image.encoding!r}, expected one of {ENCODINGS}")
    splits: dict[str, SplitInfo] = {}
    for name, s in _require(data, "splits", dict, "", path).items():
        if name not in SPLITS:
            raise InputError(path, f"field splits.{name}: unknown split, expected {SPLITS}")
        where = f"splits.{name}."
        shards = [
            _shard_from_dict(d, f"{where}shards[{i}].", path)
            for i, d in enumerate(_require(s, "shards", list, where, path))
        ]
        samples = _require(s, "samples", int, where, path)
        if samples != sum(sh.samples for sh in shards):
            raise InputError(path, f"field {where}samples ({samples}) is not the sum of its shards' samples")
        splits[name] = SplitInfo(samples=samples, shards=shards)
    return Manifest(
        image=image,
        split_policy=_require(data, "split_policy", dict, "", path),
        splits=splits,
        skipped=_require(data, "skipped", dict, "", path),
        source=_require(data, "source", dict, "", path),
        labels=_labels_from_dict(data["labels"], path) if data.get("labels") is not None else None,
    )


def _labels_from_dict(d: Any, path: str) -> LabelsInfo:
    if not isinstance(d, dict):
        raise InputError(path, f"field labels has type {type(d).__name__}, expected dict")
    labels = LabelsInfo(
        name=_require(d, "name", str, "labels.", path),
        bytes=_require(d, "bytes", int, "labels.", path),
        sha256=_require(d, "sha256", str, "labels.", path),
    )
    if "/" in labels.name or "\\" in labels.name or labels.name.startswith("."):
        raise InputError(path, f"field labels.name {labels.name!r} is not a plain file name")
    return labels


def read_manifest(dataset: str) -> Manifest:
    """The manifest of a dataset folder (local or s3://); a clear error when there is none."""
    path = storage.join(dataset, MANIFEST)
    raw = storage.read_required(
        path,
        "a dataset is a folder with manifest.json (run `deeprec pack SRC DEST` first; an interrupted pack has no "
        "manifest yet, run it again)",
    )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputError(path, f"is not valid JSON ({err.msg})", line=err.lineno) from None
    return manifest_from_dict(data, path)


def write_manifest(dataset: str, manifest: Manifest) -> None:
    storage.write_bytes_atomic(storage.join(dataset, MANIFEST), manifest.to_json())
