"""A set of real faces as FID and KID use it, and its cache beside the dataset.

FID needs only the mean and covariance of a set's features; KID needs features themselves, and at
most 1000 per subset: a `Reference` keeps the moments in float64 and up to KID_KEEP features (all of
them for sets that small, so KID is unchanged; for a 50k set a seeded 10k of them, from which KID's
subsets are drawn as they would be from all 50k). That is what embedding the real set costs a run
(0.08 s a face on a 2-core CPU, 80 s per 1000), so it is done once per dataset, split, filter,
sample count and feature network and kept at DATA/fid_stats/<what>-<key>.pt: every later
evaluation, run and sweep trial on that dataset reads it instead (`cached`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deeprecognition import storage
from deeprecognition.runs.distributed import all_sum, world
from deeprecognition.shards.manifest import MANIFEST

log = logging.getLogger(__name__)

STATS_FOLDER = "fid_stats"
KID_KEEP = 10_000
FORMAT = 1  # of the cached file; a change here makes old files unreadable, hence a new key


def moments(features: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and sample covariance in float64, a chunk at a time (50k x 2048 would be 800 MB at once)."""
    mean = features.double().mean(0)
    cov = torch.zeros((features.shape[1],) * 2, dtype=torch.float64, device=features.device)
    for part in features.split(chunk):
        centred = part.double() - mean
        cov += centred.T @ centred
    return mean, cov / (len(features) - 1)


def frechet_distance(real: tuple[Tensor, Tensor], fake: tuple[Tensor, Tensor]) -> float:
    """FID between two sets' (mean, covariance): |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)),
    the trace of the square root from the eigenvalues of S_r S_f, as torchmetrics computes it."""
    (mu_r, cov_r), (mu_f, cov_f) = real, fake
    root_trace = torch.linalg.eigvals(cov_r @ cov_f).sqrt().real.sum()
    return float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * root_trace)


@dataclass
class Reference:
    """What FID and KID need of a set of faces: its feature moments and up to KID_KEEP features."""

    mean: Tensor  # (F,) float64
    cov: Tensor  # (F, F) float64
    kid_features: Tensor  # (k, F) float32, k = min(count, KID_KEEP)
    count: int  # faces in the set

    @classmethod
    def of(cls, features: Tensor) -> Reference:
        mean, cov = moments(features)
        keep = features
        if len(features) > KID_KEEP:  # seeded: every rank and every run keeps the same ones
            pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(0))[:KID_KEEP]
            keep = features[pick.sort().values.to(features.device)]
        return cls(mean, cov, keep.float(), len(features))

    @property
    def moments(self) -> tuple[Tensor, Tensor]:
        return self.mean, self.cov

    def to(self, device: torch.device) -> Reference:
        return Reference(self.mean.to(device), self.cov.to(device), self.kid_features.to(device), self.count)


def stats_uri(data: str, what: str, key: dict[str, Any]) -> str:
    """Where the statistics of the set `key` describes live: DATA/fid_stats/<what>-<hash of key and
    the dataset's manifest>.pt. The manifest is in the hash, so a dataset packed anew at the same
    place never meets the old statistics."""
    manifest = storage.read_required(storage.join(data, MANIFEST), "the packed dataset's manifest.json")
    identity = json.dumps({**key, "format": FORMAT, "manifest": hashlib.sha1(manifest).hexdigest()}, sort_keys=True)
    return storage.join(data, STATS_FOLDER, f"{what}-{hashlib.sha1(identity.encode()).hexdigest()[:16]}.pt")


def cached(uri: str, key: dict[str, Any], compute: Callable[[], Tensor], device: torch.device) -> Reference:
    """The Reference at `uri`, or `compute()`'s features (every rank joins it) made into one and
    saved there by rank 0. Every rank calls this: they agree first (a collective) on whether the
    file is there, so a file that appears between two ranks' looks (another trial saving it) cannot
    send one rank into compute's collectives alone."""
    present = all_sum(torch.tensor([int(storage.exists(uri))], device=device)).item() == world()[1]
    if present:
        return _read(uri).to(device)
    reference = Reference.of(compute())
    if world()[0] == 0:
        _write(uri, key, reference)
    return reference


def _read(uri: str) -> Reference:
    saved = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    return Reference(saved["mean"], saved["cov"], saved["kid_features"], int(saved["count"]))


def _write(uri: str, key: dict[str, Any], reference: Reference) -> None:
    """Saved whole or not at all; a dataset the run cannot write to (a shared read-only bucket) only
    costs the next run the embedding again, so that is a warning, not a failure."""
    buffer = io.BytesIO()
    cpu = reference.to(torch.device("cpu"))
    saved = {"mean": cpu.mean, "cov": cpu.cov, "kid_features": cpu.kid_features, "count": cpu.count}
    torch.save({**saved, "key": json.dumps(key, sort_keys=True)}, buffer)
    try:
        storage.write_bytes_atomic(uri, buffer.getvalue())
    except OSError as err:
        log.warning(
            "FID statistics not cached at %s (%s: %s): the next run embeds them again", uri, type(err).__name__, err
        )
