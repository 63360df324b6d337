"""The loader: exact coverage in evaluation, exact epoch length in training, ranks' disjoint parts
and their padding, orders by seed and epoch, filters, targets, corruption, and S3 through a proxy
that cuts connections mid-response."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
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
from deeprecognition.errors import CorruptShardError, InputError
from deeprecognition.shards.loader import LoaderConfig, ShardStream, make_loader, parse_where
from deeprecognition.shards.pack import pack
from deeprecognition.shards.sampling import SplitIndex, epoch_order, resampled_rows, slot_rows
from deeprecognition.shards.verify import verify

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


def epoch_keys(config: LoaderConfig, ranks: int, epoch: int = 0) -> list[list[str]]:
    """Every rank's keys of one training epoch, each rank through its own DataLoader workers."""
    per_rank = []
    for rank in range(ranks):
        loader = make_loader(config, rank=rank, world_size=ranks)
        loader.dataset.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader.dataset)  # the step count DDP plans with
        per_rank.append([k for b in batches for k in b.keys])
    return per_rank


@pytest.mark.parametrize("ranks, workers", [(2, 2), (3, 2), (1, 0)])
def test_a_training_epoch_sees_every_image_once_with_equal_steps_on_every_rank(packed, ann, ranks, workers):
    config = LoaderConfig(data=packed.dest, split="train", batch_size=16, num_workers=workers)
    train = split_keys(ann, 0)
    per_rank = epoch_keys(config, ranks)
    seen = Counter(k for keys in per_rank for k in keys)
    assert set(seen) == train  # every image of the split, none of another
    slots = ranks * max(workers, 1)
    assert len({len(keys) for keys in per_rank}) == 1 and len(per_rank[0]) == max(workers, 1) * math.ceil(
        len(train) / slots
    )
    assert sum(seen.values()) - len(train) < slots  # the few repeats that even out the slots
    assert epoch_keys(config, ranks, epoch=1) != per_rank  # a new permutation each epoch


def matching_keys(ann, code: int, where: dict[str, int]) -> set[str]:
    """The keys of split `code` whose labels have every value in `where`, from the annotations."""
    return {
        f[:-4]
        for f, at, p in zip(ann.image_files, ann.attrs, ann.partition)
        if p == code and all(at[ATTRIBUTE_INDEX[name]] == value for name, value in where.items())
    }


@pytest.mark.parametrize(
    ("ranks", "workers", "where"),
    # 192 train samples (57 that match) in 5, 10 and 4 slots: parts of unequal length, padded.
    [(5, 0, ""), (5, 2, ""), (4, 0, "Male=0,Smiling=1")],
    ids=["5x1", "5x2", "4x1-where"],
)
def test_ranks_split_an_epoch_into_disjoint_parts_that_only_the_padding_repeats(packed, ann, ranks, workers, where):
    """The plan of shards/loader.py, checked on every key: the slots' parts cover the split's
    matching samples exactly once; the shorter parts are padded, each with the one sample just
    before it, so each key appears at most twice and only padding keys appear twice."""
    config = LoaderConfig(
        data=packed.dest, split="train", batch_size=8, num_workers=workers, where=parse_where(where), seed=4
    )
    expected = matching_keys(ann, 0, parse_where(where))
    slots = ranks * max(workers, 1)
    quota = math.ceil(len(expected) / slots)
    per_rank = epoch_keys(config, ranks)
    seen = Counter(k for keys in per_rank for k in keys)
    assert set(seen) == expected
    assert sum(seen.values()) == slots * quota  # every slot its quota ...
    padding = {k for k, n in seen.items() if n > 1}
    assert set(seen.values()) <= {1, 2} and len(padding) == slots * quota - len(expected)  # ... from fewer repeats
    assert padding  # the case under test: some parts are shorter
    for a in range(ranks):
        for b in range(a + 1, ranks):
            assert set(per_rank[a]) & set(per_rank[b]) <= padding
    if not workers:  # one slot per rank, in order: a padded part starts with the last sample of the part before
        for rank in range(1, ranks):
            if len(set(per_rank[rank])) < quota:
                assert per_rank[rank][0] == per_rank[rank - 1][-1]
    # Batch targets are the labels of their keys: the filter kept what the labels say.
    rows = {f[:-4]: a for f, a in zip(ann.image_files, ann.attrs)}
    for batch in make_loader(dataclasses.replace(config, targets=("Male", "Smiling")), rank=0, world_size=ranks):
        labels = np.stack([rows[k][[ATTRIBUTE_INDEX["Male"], ATTRIBUTE_INDEX["Smiling"]]] for k in batch.keys])
        np.testing.assert_array_equal(batch.targets.numpy(), labels)
    # The next epoch: a new order on every rank, the same coverage; the same seed and epoch: the same order.
    next_epoch = epoch_keys(config, ranks, epoch=1)
    assert all(a != b for a, b in zip(next_epoch, per_rank))
    assert {k for keys in next_epoch for k in keys} == expected
    assert epoch_keys(config, ranks) == per_rank
    assert epoch_keys(dataclasses.replace(config, seed=5), ranks) != per_rank


def test_resampling_stays_an_option_with_the_same_epoch_length(packed, ann):
    config = LoaderConfig(data=packed.dest, split="train", batch_size=16, num_workers=2, sampling="resample")
    per_rank = epoch_keys(config, 2)
    assert {len(keys) for keys in per_rank} == {2 * math.ceil(len(split_keys(ann, 0)) / 4)}
    assert {k for keys in per_rank for k in keys} < split_keys(ann, 0)  # with replacement: some images unseen
    with pytest.raises(ValueError, match="sampling must be one of epoch, resample"):
        ShardStream(LoaderConfig(data=packed.dest, sampling="shuffled"), rank=0, world_size=1)


def test_a_filtered_epoch_is_exactly_the_matching_images(packed, ann):
    where = parse_where("Male=0")
    expected = {
        f[:-4]
        for f, at, p in zip(ann.image_files, ann.attrs, ann.partition)
        if p == 0 and at[ATTRIBUTE_INDEX["Male"]] == 0
    }
    per_rank = epoch_keys(LoaderConfig(data=packed.dest, split="train", batch_size=8, num_workers=2, where=where), 2)
    seen = Counter(k for keys in per_rank for k in keys)
    assert set(seen) == expected and sum(seen.values()) - len(expected) < 4
    assert len(per_rank[0]) == 2 * math.ceil(len(expected) / 4)  # the epoch length follows the filter


def test_evaluation_gives_every_slot_work_when_shards_are_fewer_than_slots(packed, ann):
    assert len(packed.manifest.splits["val"].shards) < 6  # 6 slots below: fewer shards than slots
    config = LoaderConfig(data=packed.dest, split="val", training=False, batch_size=4, num_workers=2)
    seen = Counter()
    for rank in range(3):
        loader = make_loader(config, rank=rank, world_size=3)
        stream = loader.dataset
        sizes = [len(stream.rows_for(slot, 6)) for slot in (2 * rank, 2 * rank + 1)]
        assert min(sizes) > 0 and max(sizes) - min(sizes) <= 1
        batches = list(loader)
        assert len(batches) == len(stream)
        seen.update(k for b in batches for k in b.keys)
    assert set(seen) == split_keys(ann, 1) and set(seen.values()) == {1}


def test_training_order_depends_on_epoch_and_seed_only(packed):
    def order(epoch: int, seed: int) -> list[str]:
        stream = ShardStream(
            LoaderConfig(data=packed.dest, batch_size=32, num_workers=0, seed=seed), rank=0, world_size=1
        )
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
    config = LoaderConfig(
        data=packed.dest, split="val", training=False, batch_size=8, num_workers=0, targets=("Male", "Smiling")
    )
    rows = {f[:-4]: a for f, a in zip(ann.image_files, ann.attrs)}
    for batch in make_loader(config):
        assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 128, 128)
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        expected = np.stack([rows[k][[ATTRIBUTE_INDEX["Male"], ATTRIBUTE_INDEX["Smiling"]]] for k in batch.keys])
        np.testing.assert_array_equal(batch.targets.numpy(), expected)


def test_where_filter_keeps_only_matching_faces(packed, ann):
    where = parse_where("Attractive=1, Male=0")
    config = LoaderConfig(
        data=packed.dest,
        split="train",
        training=False,
        batch_size=16,
        num_workers=0,
        where=where,
        targets=("Attractive", "Male"),
    )
    batches = list(make_loader(config))
    targets = torch.cat([b.targets for b in batches])
    assert (targets[:, 0] == 1).all() and (targets[:, 1] == 0).all()
    a, m = ATTRIBUTE_INDEX["Attractive"], ATTRIBUTE_INDEX["Male"]
    expected = {
        f[:-4] for f, at, p in zip(ann.image_files, ann.attrs, ann.partition) if p == 0 and at[a] == 1 and at[m] == 0
    }
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


def test_full_celeba_epochs_cover_the_split_at_every_scale():
    """The issue's simulation at full CelebA scale (162,770 train images in 33 shards): resampled
    shards covered ~64% of the images per epoch; a planned epoch covers all of them."""
    sizes = [5000] * 32 + [2770]
    index = SplitIndex.of(np.zeros((sum(sizes), 40), np.uint8), sizes)
    rows = index.matching([])
    for ranks, workers in ((1, 2), (4, 2), (8, 4)):
        slots = ranks * workers
        quota = math.ceil(len(rows) / slots)
        order = epoch_order(index, rows, seed=0, epoch=3)
        parts = [slot_rows(order, slot, slots, pad_to=quota) for slot in range(slots)]
        assert {len(p) for p in parts} == {quota}
        assert len(np.unique(np.concatenate(parts))) == len(rows)
        resampled = np.concatenate([resampled_rows(index, rows, 0, 3, slot, quota) for slot in range(slots)])
        assert len(np.unique(resampled)) < 0.75 * len(rows)  # what `sampling="resample"` gives up


def test_the_label_index_is_checked_and_a_dataset_without_it_still_loads(packed, tmp_path):
    dest = str(tmp_path / "ds")
    shutil.copytree(packed.dest, dest)
    config = LoaderConfig(data=dest, split="train", training=False, batch_size=16, num_workers=0, targets=("Male",))
    expected = [(b.keys, b.targets) for b in make_loader(config)]
    manifest_file = os.path.join(dest, "manifest.json")
    manifest = json.load(open(manifest_file))
    labels = np.load(os.path.join(dest, "labels.npy"))
    labels[0, ATTRIBUTE_INDEX["Male"]] ^= 1  # one label changed, the manifest updated to match
    raw = io.BytesIO()
    np.save(raw, labels)
    with open(os.path.join(dest, "labels.npy"), "wb") as f:
        f.write(raw.getvalue())
    with pytest.raises(InputError, match="labels.npy: .*do not match manifest.json"):
        keys_of(make_loader(config))
    assert [(p.shard, "do not match" in p.problem) for p in verify(dest).problems] == [("labels.npy", True)]
    manifest["labels"] |= {"bytes": len(raw.getvalue()), "sha256": hashlib.sha256(raw.getvalue()).hexdigest()}
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
    first_shard = packed.manifest.splits["train"].shards[0].name
    with pytest.raises(CorruptShardError, match=f"{first_shard}: .*label index"):
        keys_of(make_loader(config))
    assert [(p.shard, "label index" in p.problem) for p in verify(dest).problems] == [(first_shard, True)]
    # Packed by an older release (no index): the loader reads the shards' labels, and the same
    # batches come out; packing again adds the index without rebuilding any shard.
    del manifest["labels"]
    with open(manifest_file, "w") as f:
        json.dump(manifest, f)
    os.remove(os.path.join(dest, "labels.npy"))
    got = [(b.keys, b.targets) for b in make_loader(config)]
    assert [k for k, _ in got] == [k for k, _ in expected] and all(
        torch.equal(a, b) for (_, a), (_, b) in zip(got, expected)
    )
    shards_before = {n: os.path.getmtime(os.path.join(dest, n)) for n in os.listdir(dest) if n.endswith(".tar")}
    assert pack(packed.manifest.source["root"], dest, TEST_PACK).up_to_date
    assert json.load(open(manifest_file))["labels"]["name"] == "labels.npy"
    assert {n: os.path.getmtime(os.path.join(dest, n)) for n in shards_before} == shards_before
    np.testing.assert_array_equal(
        np.load(os.path.join(dest, "labels.npy")), np.load(os.path.join(packed.dest, "labels.npy"))
    )
