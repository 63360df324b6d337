"""Packing: round trips against the source on local and S3, a zipped copy read from S3 (bytes
fetched, faults), random splits that keep identities apart, determinism, resume after kill -9,
missing and undecodable images, verify catching corruption, stats."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from deeprecognition import storage
from deeprecognition.celeba.annotations import Annotations
from deeprecognition.celeba.source import find_source, load_annotations, open_images
from deeprecognition.errors import InputError
from deeprecognition.shards.encode import ImageFormat, decode_source, resize
from deeprecognition.shards.loader import decode_image
from deeprecognition.shards.manifest import read_manifest
from deeprecognition.shards.pack import PackReport, pack
from deeprecognition.shards.plan import PackOptions, PackPlan, make_plan, split_codes
from deeprecognition.shards.stats import dataset_stats
from deeprecognition.shards.tario import iter_samples, read_npy
from deeprecognition.shards.verify import verify

from .celeba_fixtures import make_annotations, make_jpegs, read_folder, upload_folder, write_layout, write_zip
from .conftest import BUCKET, SYNTH_N, TEST_PACK
from .damage import flip_byte, truncate
from .faultproxy import FaultProxy


def read_dataset(dataset: str) -> dict[str, tuple[str, np.ndarray, torch.Tensor, dict]]:
    """Every sample of a packed dataset: key -> (split, attrs, image, meta)."""
    manifest = read_manifest(dataset)
    out = {}
    for split, info in manifest.splits.items():
        for shard in info.shards:
            data = bytearray(storage.read_bytes(storage.join(dataset, shard.name)))
            for key, fields in iter_samples(data, shard.name):
                assert key not in out, f"{key} packed twice"
                image = decode_image(fields[manifest.image.encoding], manifest.image.encoding)
                out[key] = (split, read_npy(fields["attr.npy"]).copy(), image, json.loads(bytes(fields["meta.json"])))
    return out


def expected_image(root: str, file: str, fmt: ImageFormat) -> np.ndarray:
    with open(os.path.join(root, "img_align_celeba", file), "rb") as f:
        return np.asarray(resize(decode_source(f.read()), fmt)).transpose(2, 0, 1)


def test_round_trip_matches_source_labels_and_pixels(packed, synth_root):
    ann = load_annotations(find_source(synth_root))
    samples = read_dataset(packed.dest)
    assert sorted(samples) == sorted(f[:-4] for f in ann.image_files)
    for i, file in enumerate(ann.image_files):
        split, attrs, image, meta = samples[file[:-4]]
        assert split == ("train", "val", "test")[ann.partition[i]]
        np.testing.assert_array_equal(attrs, ann.attrs[i])
        assert meta == {"file": file, "partition": split, "identity": int(ann.identity[i])}
    # Pixels: the stored JPEG (q95) decodes to within JPEG error of the resized source.
    for file in ann.image_files[:20]:
        image = samples[file[:-4]][2].numpy().astype(int)
        assert image.shape == (3, 128, 128)
        assert np.abs(image - expected_image(synth_root, file, ImageFormat())).mean() < 3.0
    manifest = packed.manifest
    for code, split in enumerate(("train", "val", "test")):
        assert manifest.splits[split].samples == int((ann.partition == code).sum())
        assert (
            np.sum([s.attribute_counts for s in manifest.splits[split].shards], axis=0).tolist()
            == ann.attrs[ann.partition == code].sum(axis=0).tolist()
        )
        assert all(s.samples <= TEST_PACK.samples_per_shard for s in manifest.splits[split].shards)


def test_npy_center_crop_is_pixel_exact(ray_cluster, synth_root, tmp_path):
    fmt = ImageFormat(size=64, resize="center-crop", encoding="npy")
    report = pack(synth_root, str(tmp_path / "npy"), PackOptions(image=fmt, samples_per_shard=100))
    samples = read_dataset(report.dest)
    assert report.manifest.image.encoding == "npy" and report.manifest.image.quality is None
    for key in list(samples)[:10]:
        np.testing.assert_array_equal(samples[key][2].numpy(), expected_image(synth_root, key + ".jpg", fmt))


def test_random_split_is_seeded_60_20_20_and_keeps_identities_apart(ray_cluster, synth_root, tmp_path):
    a = pack(synth_root, str(tmp_path / "a"), PackOptions(split="random", seed=3, samples_per_shard=100))
    b = pack(synth_root, str(tmp_path / "b"), PackOptions(split="random", seed=3, samples_per_shard=100))
    c = pack(synth_root, str(tmp_path / "c"), PackOptions(split="random", seed=4, samples_per_shard=100))
    counts = [a.manifest.splits[s].samples for s in ("train", "val", "test")]
    # The synthetic copy has up to 20 images per identity: each cut lands within 10 of its target.
    assert sum(counts) == SYNTH_N and all(abs(n - f * SYNTH_N) <= 20 for n, f in zip(counts, (0.6, 0.2, 0.2)))
    assert a.manifest.split_policy == {
        "name": "random",
        "seed": 3,
        "fractions": [0.6, 0.2, 0.2],
        "identity_disjoint": True,
    }
    splits_of: dict[int, set[str]] = {}
    for split, _, _, meta in read_dataset(a.dest).values():
        splits_of.setdefault(meta["identity"], set()).add(split)
    assert all(len(splits) == 1 for splits in splits_of.values()), splits_of
    shas = lambda r: [s.sha256 for sp in r.manifest.splits.values() for s in sp.shards]  # noqa: E731
    assert shas(a) == shas(b) and shas(a) != shas(c)


def test_random_split_puts_each_identity_in_one_split_close_to_60_20_20():
    rng = np.random.default_rng(0)
    identity = np.repeat(np.arange(1, 301, dtype=np.int32), rng.integers(1, 40, size=300))  # 1 to 39 images each
    rng.shuffle(identity)
    ann = Annotations(
        [f"{i:06d}.jpg" for i in range(1, len(identity) + 1)],
        np.zeros((len(identity), 40), np.uint8),
        np.zeros(len(identity), np.uint8),
        identity,
    )
    keep = np.flatnonzero(rng.random(len(identity)) < 0.9)  # as with --allow-missing
    codes = split_codes(ann, keep, "random", seed=5)
    for person in np.unique(identity[keep]):
        assert len(set(codes[identity[keep] == person])) == 1, f"identity {person} is in two splits"
    for code, fraction in enumerate((0.6, 0.2, 0.2)):
        # Each cut lands within half an identity (up to 39 images) of its target.
        assert abs((codes == code).sum() - fraction * len(keep)) <= 39
    np.testing.assert_array_equal(codes, split_codes(ann, keep, "random", seed=5))
    assert not np.array_equal(codes, split_codes(ann, keep, "random", seed=6))


def _plan(root: str, options: PackOptions) -> PackPlan:
    source = find_source(root)
    with open_images(source) as images:
        return make_plan(source, load_annotations(source), images.names(), options)


def test_random_split_without_an_identity_file_warns_and_the_manifest_says_so(tmp_path, caplog):
    ann = make_annotations(n=50)
    write_layout(str(tmp_path), "kaggle-plain", ann, make_jpegs(ann.image_files))  # Kaggle ships no identity file
    with caplog.at_level(logging.WARNING, logger="deeprecognition.shards.plan"):
        plan = _plan(str(tmp_path), PackOptions(split="random", seed=1, samples_per_shard=10))
    assert "has no identity file" in caplog.text and "may be in train and in test" in caplog.text
    assert plan.split_policy == {"name": "random", "seed": 1, "fractions": [0.6, 0.2, 0.2], "identity_disjoint": False}
    assert [sum(len(s.files) for s in plan.shards if s.split == split) for split in ("train", "val", "test")] == [
        30,
        10,
        10,
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deeprecognition.shards.plan"):
        _plan(str(tmp_path), PackOptions(samples_per_shard=10))
    assert caplog.text == ""  # the official split is the official one, identities or not


def test_plan_id_of_a_random_split_covers_its_policy_and_official_ids_are_unchanged(synth_root):
    """pack keeps shards (and calls a dataset up to date) when their plan id matches: the id of a
    random split covers its policy, while official ids stay those of datasets packed before."""
    settings = lambda o: {k: v for k, v in dataclasses.asdict(o).items() if k != "num_workers"}  # noqa: E731
    for options in (PackOptions(split="random", seed=3, samples_per_shard=100), TEST_PACK):
        plan = _plan(synth_root, options)
        per_image_rule_id = hashlib.sha256(
            json.dumps([settings(options), plan.source_fingerprint], sort_keys=True).encode()
        ).hexdigest()[:16]
        assert (plan.plan_id == per_image_rule_id) == (options.split == "official")


def test_s3_pack_is_byte_identical_to_local(packed, synth_root):
    dest = f"s3://{BUCKET}/round-trip"
    report = pack(synth_root, dest, TEST_PACK)
    local = {s.name: s.sha256 for sp in packed.manifest.splits.values() for s in sp.shards}
    remote = {s.name: s.sha256 for sp in report.manifest.splits.values() for s in sp.shards}
    assert remote == local
    assert storage.list_names(dest + "/_pack") == []  # pack records are removed once the manifest is there
    assert verify(dest).ok
    from_s3, from_disk = read_dataset(dest), read_dataset(packed.dest)
    assert from_s3.keys() == from_disk.keys()
    for key in list(from_s3)[:10]:
        assert torch.equal(from_s3[key][2], from_disk[key][2])


@pytest.fixture(scope="module")
def zipped_on_s3(s3, synth_root, tmp_path_factory) -> tuple[str, int]:
    """The synthetic copy with its images in a deflated img_align_celeba.zip, on S3: (URI, zip bytes)."""
    root = str(tmp_path_factory.mktemp("zipped-celeba"))
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt"):
        shutil.copy(os.path.join(synth_root, name), root)
    zip_path = os.path.join(root, "img_align_celeba.zip")
    write_zip(zip_path, read_folder(os.path.join(synth_root, "img_align_celeba")), compression=zipfile.ZIP_DEFLATED)
    uri = f"s3://{BUCKET}/zipped-celeba"
    upload_folder(root, uri, s3)
    return uri, os.path.getsize(zip_path)


def _pack_through(proxy: FaultProxy, src: str, dest: str, monkeypatch) -> PackReport:
    try:
        monkeypatch.setenv(
            "AWS_ENDPOINT_URL", proxy.url
        )  # the pack's Ray tasks get it too (raycluster.worker_runtime_env)
        return pack(src, dest, TEST_PACK)
    finally:
        proxy.stop()


def _shard_shas(manifest) -> dict[str, str]:
    return {s.name: s.sha256 for sp in manifest.splits.values() for s in sp.shards}


def test_zip_on_s3_is_fetched_about_once_and_packs_what_the_folder_packs(
    packed, zipped_on_s3, s3, tmp_path, monkeypatch
):
    src, zip_bytes = zipped_on_s3
    proxy = FaultProxy.before(s3, cut_every=0)  # forwards everything, counting what the server sends
    report = _pack_through(proxy, src, str(tmp_path / "from-zip"), monkeypatch)
    assert len(report.manifest.splits["train"].shards) > 5  # each shard task opens the zip again
    # Every member once, plus a central directory per task, the annotations and HTTP headers; the
    # 50 MiB read-ahead blocks of s3fs's file would fetch the rest of the zip for every member.
    assert proxy.bytes_to_client <= 1.5 * zip_bytes, f"{proxy.bytes_to_client} bytes fetched for a {zip_bytes}-byte zip"
    assert _shard_shas(report.manifest) == _shard_shas(packed.manifest)


def test_zip_on_s3_through_a_store_that_cuts_packs_the_exact_dataset(packed, zipped_on_s3, s3, tmp_path, monkeypatch):
    src, _ = zipped_on_s3
    proxy = FaultProxy.before(s3, cut_every=3, cut_after=3000)  # mid-body for every member and directory
    report = _pack_through(proxy, src, str(tmp_path / "from-zip"), monkeypatch)
    assert proxy.cuts > 0 and report.retries > 0
    assert _shard_shas(report.manifest) == _shard_shas(packed.manifest)


def test_rerun_is_up_to_date_and_other_options_are_refused(packed, synth_root):
    again = pack(synth_root, packed.dest, TEST_PACK)
    assert again.up_to_date and again.built == 0
    with pytest.raises(InputError, match="manifest.json.*other options"):
        pack(synth_root, packed.dest, PackOptions(samples_per_shard=30))


def _pack_command(src: str, dest: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deeprecognition",
        "pack",
        src,
        dest,
        "--samples-per-shard",
        "5",
        "--num-workers",
        "1",
        "--quiet",
    ]


def test_kill_9_during_pack_then_rerun_gives_the_same_dataset(ray_cluster, packed, synth_root, tmp_path):
    import ray

    dest = str(tmp_path / "killed")
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.Popen(_pack_command(synth_root, dest), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(n.endswith(".tar") for n in storage.list_names(dest)):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards_at_kill = [n for n in storage.list_names(dest) if n.endswith(".tar")]
    assert shards_at_kill and "manifest.json" not in storage.list_names(dest)
    resumed = pack(synth_root, dest, PackOptions(samples_per_shard=5))
    clean = pack(synth_root, str(tmp_path / "clean"), PackOptions(samples_per_shard=5))
    assert resumed.kept >= 1
    assert resumed.manifest.splits == clean.manifest.splits
    assert sum(sp.samples for sp in resumed.manifest.splits.values()) == SYNTH_N
    assert resumed.manifest.labels == clean.manifest.labels
    assert sorted(storage.list_names(dest)) == sorted(
        ["manifest.json", "labels.npy", *(s.name for sp in clean.manifest.splits.values() for s in sp.shards)]
    )


def _copy_source(synth_root: str, dest) -> str:
    shutil.copytree(synth_root, dest)
    return str(dest)


def test_missing_images_are_refused_or_counted(ray_cluster, synth_root, tmp_path):
    root = _copy_source(synth_root, tmp_path / "src")
    for name in ("000003.jpg", "000010.jpg", "000200.jpg"):
        os.remove(os.path.join(root, "img_align_celeba", name))
    with pytest.raises(
        InputError, match=r"img_align_celeba: 3 of 240 images listed .* absent \(first: 000003.jpg.*--allow-missing"
    ):
        pack(root, str(tmp_path / "refused"), TEST_PACK)
    assert not os.path.exists(tmp_path / "refused" / "manifest.json")
    report = pack(root, str(tmp_path / "allowed"), PackOptions(samples_per_shard=25, allow_missing=True))
    assert report.manifest.skipped["missing"] == 3
    assert report.manifest.skipped["missing_files_first"] == ["000003.jpg", "000010.jpg", "000200.jpg"]
    assert sum(sp.samples for sp in report.manifest.splits.values()) == SYNTH_N - 3


def test_undecodable_jpeg_is_skipped_and_counted_or_strict_error(ray_cluster, synth_root, tmp_path):
    root = _copy_source(synth_root, tmp_path / "src")
    bad = os.path.join(root, "img_align_celeba", "000005.jpg")
    with open(bad, "r+b") as f:
        f.truncate(300)
    report = pack(root, str(tmp_path / "lenient"), TEST_PACK)
    assert report.manifest.skipped["undecodable"] == 1
    assert report.manifest.skipped["undecodable_files"] == ["000005.jpg"]
    assert sum(sp.samples for sp in report.manifest.splits.values()) == SYNTH_N - 1
    assert "000005" not in read_dataset(report.dest)
    with pytest.raises(InputError, match="000005.jpg: does not decode"):
        pack(root, str(tmp_path / "strict"), PackOptions(samples_per_shard=25, strict=True))
    assert not os.path.exists(tmp_path / "strict" / "manifest.json")


def test_verify_names_flipped_truncated_and_missing_shards(packed, tmp_path):
    dest = str(tmp_path / "corrupt")
    shutil.copytree(packed.dest, dest)
    assert verify(dest).ok
    shards = [s.name for sp in packed.manifest.splits.values() for s in sp.shards]
    flipped, truncated, missing = shards[0], shards[1], shards[-1]
    flip_byte(os.path.join(dest, flipped), 5000)
    truncate(os.path.join(dest, truncated), 4096)
    os.remove(os.path.join(dest, missing))
    report = verify(dest)
    problems = {p.shard: p.problem for p in report.problems}
    assert set(problems) == {flipped, truncated, missing}
    assert "sha256" in problems[flipped]
    assert "truncated" in problems[truncated]
    assert "missing" in problems[missing]


def test_stats_match_annotations_and_plot_is_a_png(packed, synth_root, tmp_path):
    ann = load_annotations(find_source(synth_root))
    plot = str(tmp_path / "stats.png")
    stats = dataset_stats(packed.dest, plot=plot)
    for code, split in enumerate(("train", "val", "test")):
        rows = ann.attrs[ann.partition == code]
        assert stats[split].samples == len(rows)
        assert stats[split].positives["Male"] == int(rows[:, 20].sum())
    img = Image.open(io.BytesIO(open(plot, "rb").read()))
    assert img.format == "PNG" and img.width > 400
