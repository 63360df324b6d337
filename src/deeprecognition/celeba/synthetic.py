"""A synthetic CelebA: `deeprec synth DEST --n N --seed S`, for tests and demos without the real data.

DEST gets torchvision's flat layout, byte-format identical to the real release: img_align_celeba/
with 178x218 RGB baseline JPEGs named 000001.jpg... (quality 75, 4:2:0, as the real files are), and
the three official txt files. Attributes come from a model fitted to the real attribute file
(synthetic_attributes), faces are drawn to follow them (synthetic_faces).

The same (n, seed) writes byte-identical files, and image i does not depend on n: attributes use one
row of a single random stream per image and each image draws with its own generator, seeded from
SeedSequence(seed, spawn_key=(i,)). So write_synthetic(n=10) equals the first 10 of n=100, and
images could be drawn in any order or in parallel.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
from PIL import Image

from deeprecognition.celeba.annotations import Annotations, write_annotations
from deeprecognition.celeba.synthetic_attributes import fit_stats, label_noise_ceiling, load_stats, sample_attributes
from deeprecognition.celeba.synthetic_faces import draw_face

__all__ = [
    "draw_face",
    "encode_jpeg",
    "fit_stats",
    "image_rng",
    "label_noise_ceiling",
    "load_stats",
    "sample_attributes",
    "split_sizes",
    "synthetic_annotations",
    "write_synthetic",
]

# The official partition sizes (train, val, test) out of 202,599 images.
OFFICIAL_SPLIT = (162_770, 19_867, 19_962)
IMAGES_PER_IDENTITY = 20  # CelebA averages 19.9 images for each of its 10,177 identities
JPEG_QUALITY = 75  # the quantisation tables of the real img_align_celeba files are libjpeg quality 75


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that draws image `index` (0-based) of a dataset with this seed."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    return buf.getvalue()


def split_sizes(n: int) -> tuple[int, int, int]:
    """Official proportions in contiguous ranges; every split gets an image once n >= 3."""
    total = sum(OFFICIAL_SPLIT)
    val, test = (round(n * k / total) for k in OFFICIAL_SPLIT[1:])
    if n >= 3:
        val, test = max(val, 1), max(test, 1)
    return n - val - test, val, test


def _identities(partition: np.ndarray) -> np.ndarray:
    """1-based identity ids, IMAGES_PER_IDENTITY consecutive images each, never across a split."""
    identity = np.empty(len(partition), dtype=np.int32)
    next_id = 1
    for split in range(3):
        (members,) = np.nonzero(partition == split)
        identity[members] = next_id + np.arange(len(members)) // IMAGES_PER_IDENTITY
        next_id += -(-len(members) // IMAGES_PER_IDENTITY)
    return identity


def synthetic_annotations(n: int, seed: int) -> Annotations:
    """What write_synthetic(dest, n, seed) writes into the txt files, without drawing any image."""
    partition = np.repeat(np.arange(3, dtype=np.uint8), split_sizes(n))
    return Annotations(
        image_files=[f"{i + 1:06d}.jpg" for i in range(n)],
        attrs=sample_attributes(n, seed),
        partition=partition,
        identity=_identities(partition),
    )


def write_synthetic(dest: str, n: int, seed: int, progress: bool = False) -> Annotations:
    """Write n synthetic images and the three annotation files into the local folder dest.

    The txt files are written last, so a dataset cut short has images but no annotation files.
    """
    ann = synthetic_annotations(n, seed)
    folder = os.path.join(dest, "img_align_celeba")
    os.makedirs(folder, exist_ok=True)
    for i, (name, row) in enumerate(zip(ann.image_files, ann.attrs)):
        data = encode_jpeg(draw_face(row, image_rng(seed, i)))
        # Plain writes, no fsync per image: the dataset only counts as complete once the txt files exist.
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        if progress and ((i + 1) % 1000 == 0 or i + 1 == n):
            print(f"synth: {i + 1}/{n} images", file=sys.stderr, flush=True)
    write_annotations(dest, ann)
    return ann
