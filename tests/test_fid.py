"""`deeprec fid A B` between a packed split, a folder of images and a GAN: the same faces read
from any two sources score 0, different faces do not, and the JSON says what each side was."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from deeprecognition.cli import main
from deeprecognition.config import apply_overrides, modern_dcgan, to_dict
from deeprecognition.errors import InputError
from deeprecognition.gan.fid import fid_between
from deeprecognition.gan.fid_stats import STATS_FOLDER
from deeprecognition.gan.loop import train_loop_per_worker
from deeprecognition.shards.loader import LoaderConfig, make_loader

N = 12  # faces per side: the standard network takes ~0.1 s a face on a 2-core CPU


@pytest.fixture(scope="module")
def test_faces_folder(faces64, tmp_path_factory) -> str:
    """The test split's first N faces of faces64, as lossless PNG files in shard order."""
    folder = tmp_path_factory.mktemp("folder")
    config = LoaderConfig(data=faces64, split="test", targets=(), training=False, batch_size=N, num_workers=0)
    images = next(iter(make_loader(config, rank=0, world_size=1))).images[:N]
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return str(folder)


def test_the_same_faces_score_zero_from_a_dataset_and_a_folder_and_others_do_not(faces64, test_faces_folder):
    same = fid_between(faces64, test_faces_folder, samples=N)
    other = fid_between(faces64, test_faces_folder, samples=N, split_a="val")
    assert same["samples_a"] == same["samples_b"] == N
    assert abs(same["fid"]) < 1e-3 * other["fid"]
    assert other["fid"] > 1.0 and other["a"].startswith("val split of")
    assert same["b"] == f"folder {test_faces_folder}" and "inception-v3" in same["feature_extractor"]


def test_a_gan_run_against_itself_scores_zero_and_the_json_names_its_checkpoint(faces64, tmp_path, capsys):
    overrides = [f"data.data={faces64}", f"storage={tmp_path}", "name=g", "optim.iterations=2", "model.width=16"]
    overrides += ["data.where=", "data.loader_workers=0", "schedule.checkpoint_every=2", "data.batch_size=8"]
    train_loop_per_worker(to_dict(apply_overrides(modern_dcgan(), overrides)))
    capsys.readouterr()
    assert main(["fid", str(tmp_path / "g"), str(tmp_path / "g"), "--samples", str(N), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert abs(result["fid"]) < 1e-3 and result["samples"] == N
    assert "(iteration 2)" in result["a"] and result["a"] == result["b"]


def test_a_folder_of_mixed_sizes_is_refused_naming_the_file(faces64, tmp_path):
    for name, side in (("a.png", 64), ("b.png", 32)):
        Image.fromarray(np.zeros((side, side, 3), dtype=np.uint8)).save(tmp_path / name)
    with pytest.raises(InputError, match=r"b\.png.*32x32, the folder's first image 64x64"):
        fid_between(faces64, str(tmp_path), samples=N)


def test_a_packed_splits_statistics_are_cached_beside_it_and_the_next_fid_reads_them(faces64, test_faces_folder):
    first = fid_between(faces64, test_faces_folder, samples=N)
    [path] = glob.glob(os.path.join(faces64, STATS_FOLDER, f"test-{N}-*.pt"))
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "mean": saved["mean"] + 1}, path)  # a mark only a read of the file can carry
    try:
        marked = fid_between(faces64, test_faces_folder, samples=N)
    finally:
        os.remove(path)
    # |mu + 1 - mu'|^2 = |mu - mu'|^2 + 2 sum(mu - mu') + 2048, and the same faces make mu = mu'
    assert abs(first["fid"]) < 1e-3 and marked["fid"] == pytest.approx(2048, abs=0.5)
