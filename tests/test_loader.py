"""The loader: exact coverage in evaluation, exact epoch length in training, filters, targets,
corruption, and S3 through a proxy that cuts connections mid-response."""

from __future__ import annotations

import math
import os
import shutil
from collections import Counter

import numpy as np
import pytest
import torch

from deeprecognition import storage
from deeprecognition.celeba.attributes import ATTRIBUTE_INDEX
from deeprecognition.celeba.source import find_source, load_annotations
from deeprecognition.errors import CorruptShardError
from deeprecognition.shards.loader import LoaderConfig, ShardStream, make_loader, parse_where
from deeprecognition.shards.pack import pack

from .conftest import BUCKET, TEST_PACK
from .faultproxy import FaultProxy


def keys_of(loader) -> list[str]:
    return [k for batch in loader for k in batch.keys]


def split_keys(ann, code: int) -> set[str]:
    return {f[:-4] for f, p in zip(ann.image_files, ann.partition) if p == code}


@pytest.fixture(scope="module")
def ann(synth_root):
    return load_annotations(find_source(synth_root))


def test_evaluation_sees_every_sample_once_across_ranks_and_workers(packed, ann):
    config = LoaderConfig(data=packed.dest, split="train", training=False, batch_size=16, num_workers=2)
    seen = Counter()
    for rank in range(2):
        seen.update(keys_of(make_loader(config, rank=rank, world_size=2)))
    assert set(seen) == split_keys(ann, 0)
    assert set(seen.values()) == {1}


def test_training_epoch_is_exact_and_equal_on_every_rank(packed, ann):
    config = LoaderConfig(data=packed.dest, split="train", batch_size=16, num_workers=2, shuffle_buffer=50)
    train_n = len(split_keys(ann, 0))
    per_rank = []
    for rank in range(3):
        loader = make_loader(config, rank=rank, world_size=3)
        batches = list(loader)
        per_rank.append(len(batches))
        assert sum(len(b.keys) for b in batches) == math.ceil(train_n / 3)
        assert len(batches) == len(loader.dataset)
    assert len(set(per_rank)) == 1


def test_training_order_depends_on_epoch_and_seed_only(packed):
    def order(epoch: int, seed: int) -> list[str]:
        stream = ShardStream(LoaderConfig(data=packed.dest, batch_size=32, num_workers=0, seed=seed), rank=0, world_size=1)
        stream.set_epoch(epoch)
        return [k for batch in stream for k in batch.keys]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(1, 1)
    assert order(0, 1) != order(0, 2)


def test_set_epoch_reaches_persistent_workers(packed):
    loader = make_loader(LoaderConfig(data=packed.dest, batch_size=32, num_workers=2, seed=5), rank=0, world_size=1)

    def epoch(e: int) -> list[str]:
        loader.dataset.set_epoch(e)
        return keys_of(loader)

    first, second, first_again = epoch(0), epoch(1), epoch(0)
    assert first != second and first == first_again


def test_local_shard_changed_after_it_was_verified_is_caught(packed, tmp_path):
    dest = str(tmp_path / "ds")
    shutil.copytree(packed.dest, dest)
    config = LoaderConfig(data=dest, split="test", training=False, num_workers=0)
    assert keys_of(make_loader(config))  # read and verified once: now cached for this process
    shard = os.path.join(dest, packed.manifest.splits["test"].shards[0].name)
    data = bytearray(open(shard, "rb").read())
    data[3000] ^= 0xFF
    with open(shard, "wb") as f:
        f.write(data)
    with pytest.raises(CorruptShardError, match="sha256"):
        keys_of(make_loader(config))


def test_batches_hold_uint8_images_and_the_chosen_targets(packed, ann):
    config = LoaderConfig(data=packed.dest, split="val", training=False, batch_size=8, num_workers=0, targets=("Male", "Smiling"))
    rows = {f[:-4]: a for f, a in zip(ann.image_files, ann.attrs)}
    for batch in make_loader(config):
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 128, 128)
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        expected = np.stack([rows[k][[ATTRIBUTE_INDEX["Male"], ATTRIBUTE_INDEX["Smiling"]]] for k in batch.keys])
        np.testing.assert_array_equal(batch.targets.numpy(), expected)


def test_where_filter_keeps_only_matching_faces(packed, ann):
    where = parse_where("Attractive=1, Male=0")
    config = LoaderConfig(data=packed.dest, split="train", training=False, batch_size=16, num_workers=0, where=where, targets=("Attractive", "Male"))
    batches = list(make_loader(config))
    targets = torch.cat([b.targets for b in batches])
    assert (targets[:, 0] == 1).all() and (targets[:, 1] == 0).all()
    a, m = ATTRIBUTE_INDEX["Attractive"], ATTRIBUTE_INDEX["Male"]
    expected = {f[:-4] for f, at, p in zip(ann.image_files, ann.attrs, ann.partition) if p == 0 and at[a] == 1 and at[m] == 0}
    assert {k for b in batches for k in b.keys} == expected


def test_bad_names_and_conditions_are_refused():
    with pytest.raises(ValueError, match="unknown CelebA attribute 'Atractive'.*valid names: 5_o_Clock_Shadow"):
        parse_where("Atractive=1")
    with pytest.raises(ValueError, match="bad condition 'Male=2'"):
        parse_where("Male=2")


def test_corrupt_shard_is_named_not_skipped(packed, tmp_path):
    dest = str(tmp_path / "ds")
    shutil.copytree(packed.dest, dest)
    shard = packed.manifest.splits["val"].shards[0].name
    with open(os.path.join(dest, shard), "r+b") as f:
        f.seek(2000)
        f.write(b"\x00\x01\x02")
    config = LoaderConfig(data=dest, split="val", training=False, num_workers=0)
    with pytest.raises(CorruptShardError, match=f"shard {shard}: .*sha256.*deeprec verify"):
        list(make_loader(config))


def test_s3_reads_survive_connections_cut_mid_response(packed, synth_root, s3, monkeypatch):
    dest = f"s3://{BUCKET}/flaky"
    pack(synth_root, dest, TEST_PACK)
    host, port = s3.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port)), cut_every=3, cut_after=2000).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        retries_before = sum(storage.RETRIES.values())
        config = LoaderConfig(data=dest, split="train", training=False, batch_size=32, num_workers=0)
        through_proxy = sorted(keys_of(make_loader(config)))
    finally:
        proxy.stop()
    direct = sorted(keys_of(make_loader(LoaderConfig(data=packed.dest, split="train", training=False, num_workers=0))))
    assert through_proxy == direct
    assert proxy.cuts > 0
    assert sum(storage.RETRIES.values()) > retries_before
