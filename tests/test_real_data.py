"""The real CelebA sample (DEEPREC_CELEBA_ROOT): packed, verified, read back against the source."""

from __future__ import annotations

import os

import numpy as np
import pytest

from deeprecognition.celeba.source import find_source, load_annotations, open_images
from deeprecognition.shards.encode import ImageFormat, decode_source, resize
from deeprecognition.shards.loader import LoaderConfig, make_loader
from deeprecognition.shards.pack import pack
from deeprecognition.shards.plan import PackOptions
from deeprecognition.shards.verify import verify

pytestmark = pytest.mark.real_data


@pytest.fixture(scope="module")
def real_packed(ray_cluster, tmp_path_factory):
    root = os.environ["DEEPREC_CELEBA_ROOT"]
    return root, pack(
        root, str(tmp_path_factory.mktemp("real")), PackOptions(samples_per_shard=2000, allow_missing=True)
    )


def test_real_sample_packs_with_exact_counts_and_verifies(real_packed):
    root, report = real_packed
    source = find_source(root)
    ann = load_annotations(source)
    with open_images(source) as images:
        names = images.names()
    present = np.array([f in names for f in ann.image_files])
    manifest = report.manifest
    assert manifest.skipped["missing"] == len(ann) - present.sum()
    assert manifest.skipped["undecodable"] == 0
    for code, split in enumerate(("train", "val", "test")):
        rows = ann.attrs[present & (ann.partition == code)]
        assert manifest.splits[split].samples == len(rows)
        counts = (
            np.sum([s.attribute_counts for s in manifest.splits[split].shards], axis=0) if len(rows) else np.zeros(40)
        )
        assert counts.tolist() == rows.sum(axis=0).tolist()
    assert verify(report.dest).ok


def test_real_images_read_back_close_to_their_source(real_packed):
    root, report = real_packed
    source = find_source(root)
    ann = load_annotations(source)
    rows = {f[:-4]: a for f, a in zip(ann.image_files, ann.attrs)}
    batch = next(
        iter(make_loader(LoaderConfig(data=report.dest, split="val", training=False, batch_size=16, num_workers=0)))
    )
    with open_images(source) as images:
        for key, image, targets in zip(batch.keys, batch.images, batch.targets):
            expected = np.asarray(resize(decode_source(images.read(key + ".jpg")), ImageFormat())).transpose(2, 0, 1)
            assert np.abs(image.numpy().astype(int) - expected).mean() < 3.0
            np.testing.assert_array_equal(targets.numpy(), rows[key])
