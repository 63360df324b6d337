"""Packing: round trips against the source on local and S3, determinism, resume after kill -9,
missing and undecodable images, verify catching corruption, stats."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from deeprecognition import storage
from deeprecognition.celeba.source import find_source, load_annotations
from deeprecognition.errors import InputError
from deeprecognition.shards.encode import ImageFormat, decode_source, resize
from deeprecognition.shards.loader import decode_image
from deeprecognition.shards.manifest import read_manifest
from deeprecognition.shards.pack import PackOptions, pack
from deeprecognition.shards.stats import dataset_stats
from deeprecognition.shards.tario import iter_samples, read_npy
from deeprecognition.shards.verify import verify

from .conftest import BUCKET, SYNTH_N, TEST_PACK
from .damage import flip_byte, truncate


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
        assert np.sum([s.attribute_counts for s in manifest.splits[split].shards], axis=0).tolist() == ann.attrs[ann.partition == code].sum(axis=0).tolist()
        assert all(s.samples <= TEST_PACK.samples_per_shard for s in manifest.splits[split].shards)


def test_npy_center_crop_is_pixel_exact(ray_cluster, synth_root, tmp_path):
    fmt = ImageFormat(size=64, resize="center-crop", encoding="npy")
    report = pack(synth_root, str(tmp_path / "npy"), PackOptions(image=fmt, samples_per_shard=100))
    samples = read_dataset(report.dest)
    assert report.manifest.image.encoding == "npy" and report.manifest.image.quality is None
    for key in list(samples)[:10]:
        np.testing.assert_array_equal(samples[key][2].numpy(), expected_image(synth_root, key + ".jpg", fmt))


def test_random_split_is_seeded_60_20_20(ray_cluster, synth_root, tmp_path):
    a = pack(synth_root, str(tmp_path / "a"), PackOptions(split="random", seed=3, samples_per_shard=100))
    b = pack(synth_root, str(tmp_path / "b"), PackOptions(split="random", seed=3, samples_per_shard=100))
    c = pack(synth_root, str(tmp_path / "c"), PackOptions(split="random", seed=4, samples_per_shard=100))
    counts = [a.manifest.splits[s].samples for s in ("train", "val", "test")]
    assert counts == [144, 48, 48]
    assert a.manifest.split_policy == {"name": "random", "seed": 3, "fractions": [0.6, 0.2, 0.2]}
    shas = lambda r: [s.sha256 for sp in r.manifest.splits.values() for s in sp.shards]  # noqa: E731
    assert shas(a) == shas(b) and shas(a) != shas(c)


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


def test_rerun_is_up_to_date_and_other_options_are_refused(packed, synth_root):
    again = pack(synth_root, packed.dest, TEST_PACK)
    assert again.up_to_date and again.built == 0
    with pytest.raises(InputError, match="manifest.json.*other options"):
        pack(synth_root, packed.dest, PackOptions(samples_per_shard=30))


def _pack_command(src: str, dest: str) -> list[str]:
    return [sys.executable, "-m", "deeprecognition", "pack", src, dest, "--samples-per-shard", "5", "--num-workers", "1", "--quiet"]


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
    assert sorted(storage.list_names(dest)) == sorted(["manifest.json", *(s.name for sp in clean.manifest.splits.values() for s in sp.shards)])


def _copy_source(synth_root: str, dest) -> str:
    shutil.copytree(synth_root, dest)
    return str(dest)


def test_missing_images_are_refused_or_counted(ray_cluster, synth_root, tmp_path):
    root = _copy_source(synth_root, tmp_path / "src")
    for name in ("000003.jpg", "000010.jpg", "000200.jpg"):
        os.remove(os.path.join(root, "img_align_celeba", name))
    with pytest.raises(InputError, match=r"img_align_celeba: 3 of 240 images listed .* absent \(first: 000003.jpg.*--allow-missing"):
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
