"""Which image goes to which split and shard: decided once, deterministically, before any work.

The plan is a pure function of the source (annotation bytes, the images present and their sizes)
and the pack options; its id is what lets a rerun recognise the shards an earlier run wrote.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from deeprecognition import storage
from deeprecognition.celeba.annotations import Annotations
from deeprecognition.celeba.attributes import SPLITS
from deeprecognition.celeba.source import CelebASource
from deeprecognition.errors import InputError
from deeprecognition.shards.encode import ImageFormat

log = logging.getLogger(__name__)

RANDOM_FRACTIONS = (0.6, 0.2, 0.2)


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    image: ImageFormat = field(default_factory=ImageFormat)
    split: str = "official"  # or "random": seeded 60/20/20, identities kept apart when known (plan.split_codes)
    seed: int = 0
    samples_per_shard: int = 5000
    allow_missing: bool = False
    strict: bool = False
    num_workers: int | None = None  # concurrent shard tasks; None = every CPU of the Ray cluster


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    files: tuple[str, ...]
    attrs: np.ndarray  # (k, 40) uint8
    partition: np.ndarray  # (k,) official partition codes
    identity: np.ndarray | None  # (k,) or None

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"

    def meta(self, i: int) -> dict[str, Any]:
        return {
            "file": self.files[i],
            "partition": SPLITS[int(self.partition[i])],
            "identity": None if self.identity is None else int(self.identity[i]),
        }


@dataclass(frozen=True)
class PackPlan:
    shards: list[ShardPlan]
    missing: list[str]  # listed in the annotations, absent from the images
    listed: int
    source_fingerprint: str
    split_policy: dict[str, Any]
    plan_id: str

    @property
    def total(self) -> int:
        return sum(len(s.files) for s in self.shards)


def source_fingerprint(source: CelebASource, ann: Annotations, present: dict[str, int]) -> str:
    digest = hashlib.sha256()
    for uri in source.fingerprint_files():
        digest.update(hashlib.sha256(storage.read_bytes(uri)).digest())
    for name in ann.image_files:
        if name in present:
            digest.update(f"{name}:{present[name]}\n".encode())
    return digest.hexdigest()


def split_codes(ann: Annotations, keep: np.ndarray, policy: str, seed: int) -> np.ndarray:
    """The split (0 train, 1 val, 2 test) of each kept image.

    random: whole identities when the identity file is there, so that no person is in two splits
    (as in the official split); one image at a time without it."""
    if policy == "official":
        return ann.partition[keep].astype(np.int64)
    if policy != "random":
        raise ValueError(f"unknown split policy {policy!r}: use official or random")
    units = np.arange(len(keep)) if ann.identity is None else ann.identity[keep]
    return _split_units(units, seed)


def _split_units(units: np.ndarray, seed: int) -> np.ndarray:
    """Codes that keep each unit's images together: the units in a seeded order, cut where the
    image count comes closest to RANDOM_FRACTIONS (exact when every unit is one image)."""
    unique, unit_of_image, images_per_unit = np.unique(units, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(unique))
    filled = np.concatenate([[0], np.cumsum(images_per_unit[order])])  # images in the first k units
    targets = np.cumsum(RANDOM_FRACTIONS)[:-1] * len(units)
    cuts = [int(np.argmin(np.abs(filled - target))) for target in targets]
    unit_codes = np.empty(len(unique), np.int64)
    for code, part in enumerate(np.split(order, cuts)):
        unit_codes[part] = code
    return unit_codes[unit_of_image]


def _split_policy(options: PackOptions, ann: Annotations) -> dict[str, Any]:
    """What the manifest records about the split, and what the plan id must cover."""
    if options.split != "random":
        return {"name": options.split}
    return {
        "name": "random",
        "seed": options.seed,
        "fractions": list(RANDOM_FRACTIONS),
        "identity_disjoint": ann.identity is not None,
    }


def _warn_if_identities_may_be_shared(source: CelebASource, policy: dict[str, Any]) -> None:
    if policy.get("identity_disjoint") is False:
        log.warning(
            "--split random: %s has no identity file, so images are split one by one and one person's "
            "images may be in train and in test; add CelebA's identity_CelebA.txt to the copy to keep identities apart",
            source.root,
        )


def _check_missing(source: CelebASource, ann: Annotations, missing: list[str], allow: bool) -> None:
    if missing and not allow:
        first = ", ".join(missing[:5])
        raise InputError(
            source.images,
            f"{len(missing)} of {len(ann)} images listed in {source.attr_file} are absent (first: {first}); "
            "pass --allow-missing to pack the images that are there",
        )


def make_plan(source: CelebASource, ann: Annotations, present: dict[str, int], options: PackOptions) -> PackPlan:
    if options.samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be at least 1")
    is_present = np.fromiter((f in present for f in ann.image_files), bool, len(ann))
    missing = [f for f, ok in zip(ann.image_files, is_present) if not ok]
    _check_missing(source, ann, missing, options.allow_missing)
    keep = np.flatnonzero(is_present)
    codes = split_codes(ann, keep, options.split, options.seed)
    shards = []
    for code, split in enumerate(SPLITS):
        # Shuffled within the split: resampled training draws whole shards, so each shard should
        # be a fair sample of the split, not a run of neighbouring ids.
        members = np.random.default_rng([options.seed, code]).permutation(keep[codes == code])
        for index, start in enumerate(range(0, len(members), options.samples_per_shard)):
            idx = members[start : start + options.samples_per_shard]
            shards.append(
                ShardPlan(
                    split=split,
                    index=index,
                    files=tuple(ann.image_files[i] for i in idx),
                    attrs=ann.attrs[idx],
                    partition=ann.partition[idx],
                    identity=None if ann.identity is None else ann.identity[idx],
                )
            )
    fingerprint = source_fingerprint(source, ann, present)
    policy = _split_policy(options, ann)
    _warn_if_identities_may_be_shared(source, policy)
    settings = {k: v for k, v in asdict(options).items() if k != "num_workers"}
    plan_key: list[Any] = [settings, fingerprint]
    if options.split == "random":
        # The random split's rule changed (issue 11: whole identities), so its policy is part of the id:
        # shards planned under the per-image rule are never taken for this plan's. The official rule
        # never changed; leaving its policy out keeps the ids of datasets packed before valid.
        plan_key.append(policy)
    plan_id = hashlib.sha256(json.dumps(plan_key, sort_keys=True).encode()).hexdigest()[:16]
    return PackPlan(
        shards=shards,
        missing=missing,
        listed=len(ann),
        source_fingerprint=fingerprint,
        split_policy=policy,
        plan_id=plan_id,
    )
