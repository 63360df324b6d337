"""`deeprec fid A B`: FID and KID between any two sets of faces, each a packed dataset's split, a
folder of images, or a GAN run or checkpoint (its faces, from the evaluation latents). What
pytorch-fid and clean-fid do for two folders, with the standard Inception network by default
(gan/inception.py) and the same formulas as a run's own evaluation (gan/metrics.py).

Each side is read as a stream of batches and only its features are kept (50k x 2048 floats),
never its images. A packed split's statistics are kept beside the dataset (gan/fid_stats.py):
the second `fid` against the same split embeds only the other side. Every output says how many
faces a number used: FID depends on it (Mimicry's CelebA records are 50k vs 50k).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from deeprecognition import storage
from deeprecognition.errors import InputError
from deeprecognition.gan.fid_stats import Reference, cached, frechet_distance, stats_uri
from deeprecognition.gan.inception import STANDARD
from deeprecognition.gan.metrics import EVAL_SEED, FeatureExtractor, inception_extractor
from deeprecognition.gan.metrics import kernel_distance as kid
from deeprecognition.runs.checkpoint import STATE
from deeprecognition.shards.manifest import MANIFEST

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BATCH = 250


@dataclass(frozen=True)
class FaceSet:
    what: str  # how outputs name it: "test split of DATA", "folder DIR", "GAN CKPT (iteration N)"
    batches: Iterator[Tensor]  # uint8 (B, 3, H, W), at most `samples` faces in all
    cache: str = ""  # a packed split's: where its statistics are kept (gan/fid_stats.py)
    key: dict[str, Any] = field(default_factory=dict)


def fid_between(
    a: str, b: str, samples: int = 10_000, split_a: str = "test", split_b: str = "test", inception_weights: str = ""
) -> dict[str, Any]:
    """FID and KID between the first `samples` faces of `a` and of `b` (fewer when one has fewer)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extractor = inception_extractor(inception_weights or STANDARD, device)
    first, second = face_set(a, split_a, samples, extractor), face_set(b, split_b, samples, extractor)
    real, fake = _reference(first, extractor), _reference(second, extractor)
    kid_mean, kid_std = kid(real.kid_features, fake.kid_features)
    return {
        "fid": frechet_distance(real.moments, fake.moments),
        "kid": kid_mean,
        "kid_std": kid_std,
        "samples": min(real.count, fake.count),
        "samples_a": real.count,
        "samples_b": fake.count,
        "a": first.what,
        "b": second.what,
        "feature_extractor": extractor.name,
    }


def face_set(uri: str, split: str, samples: int, extractor: FeatureExtractor) -> FaceSet:
    """A packed dataset (it has manifest.json), a folder of images (and no checkpoints: a GAN run
    holds its grids and mosaics), else a GAN."""
    if storage.exists(storage.join(uri, MANIFEST)):
        key = {"split": split, "samples": samples, "features": extractor.source}
        cache = stats_uri(uri, f"{split}-{samples}", key)
        return FaceSet(f"{split} split of {uri}", _dataset_batches(uri, split, samples), cache, key)
    files = _image_files(uri) if not storage.is_remote(uri) and os.path.isdir(uri) else []
    if files and not _holds_checkpoints(uri):
        return FaceSet(f"folder {uri}", _folder_batches(uri, files[:samples]))
    from deeprecognition.gan.generate import TrainedGan

    gan = TrainedGan.load(uri, device=extractor.device)
    return FaceSet(f"GAN {gan.checkpoint} (iteration {gan.iteration})", _gan_batches(gan, samples))


def _reference(faces: FaceSet, extractor: FeatureExtractor) -> Reference:
    """A side's statistics: a packed split's from its cache when an earlier `fid` computed them."""

    def features() -> Tensor:
        chunks = [extractor.features(batch).float() for batch in faces.batches]
        found = torch.cat(chunks) if chunks else torch.zeros((0, extractor.dim), device=extractor.device)
        if len(found) < 2:
            raise ValueError(f"{faces.what}: {len(found)} face(s); FID needs at least 2 on each side")
        return found

    if faces.cache:
        return cached(faces.cache, faces.key, features, extractor.device)
    return Reference.of(features())


def _dataset_batches(uri: str, split: str, samples: int) -> Iterator[Tensor]:
    """The split's first `samples` faces in shard order, as `deeprec evaluate-gan` reads them."""
    from deeprecognition.shards.loader import LoaderConfig, make_loader

    config = LoaderConfig(data=uri, split=split, targets=(), training=False, batch_size=BATCH, num_workers=0)
    left = samples
    for batch in make_loader(config, rank=0, world_size=1):
        if left <= 0:
            return
        yield batch.images[:left]
        left -= len(batch.images)


def _holds_checkpoints(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, STATE)) or any(n.startswith("checkpoint_") for n in os.listdir(folder))


def _image_files(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))


def _folder_batches(folder: str, files: list[str]) -> Iterator[Tensor]:
    """The images in name order; all of one size (FID compares sets of faces at one resolution)."""
    size = None
    for start in range(0, len(files), BATCH):
        images = []
        for name in files[start : start + BATCH]:
            with Image.open(os.path.join(folder, name)) as image:
                pixels = np.array(image.convert("RGB"))  # a writable copy, as torch wants
            size = size or pixels.shape
            if pixels.shape != size:
                raise InputError(
                    os.path.join(folder, name),
                    f"is {pixels.shape[1]}x{pixels.shape[0]}, the folder's first image {size[1]}x{size[0]}: "
                    "resize the folder to one size first",
                )
            images.append(torch.from_numpy(pixels).permute(2, 0, 1))
        yield torch.stack(images)


def _gan_batches(gan, samples: int) -> Iterator[Tensor]:
    """`samples` faces from the evaluation latents (a run's own FID draws the same ones; a
    conditional model's asked for the same label vectors, drawn from the data)."""
    from deeprecognition.gan.generate import face_batches

    draw = gan.labels(samples, "", EVAL_SEED)
    labels = draw.labels if draw is not None else None
    with torch.no_grad():
        yield from face_batches(
            gan.generator, gan.config.model.latent, samples, EVAL_SEED, batch_size=BATCH, labels=labels
        )
