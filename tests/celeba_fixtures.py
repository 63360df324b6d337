"""Tiny CelebA copies in each layout people download, built from one Annotations and a few JPEGs."""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import boto3
import numpy as np
from PIL import Image

from deeprecognition.celeba.annotations import Annotations, format_attr_txt, format_pairs_txt, write_annotations
from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES

# Layout cases: (layout find_source must report, how the copy is written).
LAYOUT_CASES = {
    "torchvision-dir": "torchvision",
    "torchvision-zip": "torchvision",
    "google-drive-dir": "google-drive",
    "google-drive-zip": "google-drive",
    "kaggle-nested": "kaggle",
    "kaggle-plain": "kaggle",
    "kaggle-zero-one": "kaggle",
}


def make_annotations(n: int = 8, seed: int = 0) -> Annotations:
    rng = np.random.default_rng(seed)
    return Annotations(
        image_files=[f"{i:06d}.jpg" for i in range(1, n + 1)],
        attrs=rng.integers(0, 2, size=(n, 40), dtype=np.uint8),
        partition=(np.arange(n) % 3).astype(np.uint8),
        identity=rng.integers(1, 10_178, size=n).astype(np.int32),
    )


def make_jpegs(names: list[str]) -> dict[str, bytes]:
    """One small JPEG per name, each a different colour so that mixed-up reads show."""
    jpegs = {}
    for i, name in enumerate(names):
        out = io.BytesIO()
        Image.new("RGB", (12, 14), color=(30 * i % 256, 255 - 20 * i % 256, 7 * i % 256)).save(out, format="JPEG")
        jpegs[name] = out.getvalue()
    return jpegs


def format_attr_csv(ann: Annotations, absent: int = -1) -> bytes:
    """Kaggle's list_attr_celeba.csv; absent=0 for the copies that write 0/1."""
    rows = [",".join([name, *(str(1 if v else absent) for v in row)]) for name, row in zip(ann.image_files, ann.attrs)]
    return ("\n".join(["image_id," + ",".join(CELEBA_ATTRIBUTES), *rows]) + "\n").encode()


def format_partition_csv(ann: Annotations) -> bytes:
    rows = [f"{name},{int(p)}" for name, p in zip(ann.image_files, ann.partition)]
    return ("\n".join(["image_id,partition", *rows]) + "\n").encode()


def write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_folder(folder: str, jpegs: dict[str, bytes]) -> None:
    for name, data in jpegs.items():
        write_file(os.path.join(folder, name), data)


# An extended-timestamp field with mtime and atime, as Info-ZIP's zip writes in each local header
# (its central directory keeps the mtime only): local and central extra lengths differ.
INFO_ZIP_LOCAL_EXTRA = struct.pack("<HHBii", 0x5455, 9, 3, 1_262_304_000, 1_262_304_000)


def write_zip(
    path: str,
    jpegs: dict[str, bytes],
    prefix: str = "img_align_celeba/",
    compression: int = zipfile.ZIP_STORED,
    local_extra: bytes = b"",
) -> None:
    """A zip like the official img_align_celeba.zip: a folder entry, then one member per image.

    local_extra: extra fields written in each local header only, not in the central directory."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        if prefix:
            archive.writestr(prefix, b"")
        for name, data in jpegs.items():
            info = zipfile.ZipInfo(prefix + name, date_time=(2010, 1, 1, 0, 0, 0))
            info.compress_type, info.extra = compression, local_extra
            archive.writestr(info, data)
        for info in archive.infolist():  # the central directory is written at close, from these
            info.extra = b""


def read_folder(folder: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir())}


def upload_folder(root: str, uri: str, endpoint_url: str) -> None:
    """Every file under the local folder root to s3://bucket/prefix, keys relative to root."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=endpoint_url)
    for folder, _, names in os.walk(root):
        for name in names:
            key = os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            client.upload_file(os.path.join(folder, name), bucket, f"{prefix}/{key}" if prefix else key)


def write_layout(root: str, case: str, ann: Annotations, jpegs: dict[str, bytes]) -> Annotations:
    """Write a CelebA copy as case (a key of LAYOUT_CASES); returns what loading it must give.

    With jpegs empty no image folder or zip is made: a copy with its annotations only.
    """
    if case.startswith("torchvision"):
        write_annotations(root, ann)
        images = os.path.join(root, "img_align_celeba")
    elif case.startswith("google-drive"):
        names = ann.image_files
        write_file(os.path.join(root, "Anno", "list_attr_celeba.txt"), format_attr_txt(names, ann.attrs))
        write_file(os.path.join(root, "Anno", "identity_CelebA.txt"), format_pairs_txt(names, ann.identity))
        write_file(os.path.join(root, "Eval", "list_eval_partition.txt"), format_pairs_txt(names, ann.partition))
        images = os.path.join(root, "Img", "img_align_celeba")
    else:  # Kaggle has no identity file
        absent = 0 if case.endswith("zero-one") else -1
        write_file(os.path.join(root, "list_attr_celeba.csv"), format_attr_csv(ann, absent))
        write_file(os.path.join(root, "list_eval_partition.csv"), format_partition_csv(ann))
        plain = os.path.join(root, "img_align_celeba")
        images = plain if case.endswith("plain") else os.path.join(plain, "img_align_celeba")
        ann = Annotations(ann.image_files, ann.attrs, ann.partition, identity=None)
    if not jpegs:
        return ann
    if case.endswith("zip"):
        write_zip(images + ".zip", jpegs)
    else:
        write_folder(images, jpegs)
    return ann


def assert_same_annotations(got: Annotations, want: Annotations) -> None:
    assert got.image_files == want.image_files
    assert got.attrs.dtype == np.uint8 and np.array_equal(got.attrs, want.attrs)
    assert got.partition.dtype == np.uint8 and np.array_equal(got.partition, want.partition)
    if want.identity is None:
        assert got.identity is None
    else:
        assert got.identity is not None and got.identity.dtype == np.int32
        assert np.array_equal(got.identity, want.identity)
