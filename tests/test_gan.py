"""The GAN loop: mosaics in storage, weights_only checkpoints, continuing a finished run, filters."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from deeprecognition.checkpoint import load_state
from deeprecognition.config import apply_overrides, modern_dcgan, to_dict
from deeprecognition.loops.gan import train_loop_per_worker

from .test_classifier import faces64  # noqa: F401  (the 64 px synthetic dataset fixture)


def gan_config(data: str, storage: str, iterations: int, *overrides: str):
    base = [f"data.data={data}", f"storage={storage}", "name=g", f"optim.iterations={iterations}", "data.batch_size=8",
            "data.loader_workers=0", "schedule.mosaic_every=3", "schedule.checkpoint_every=3", "schedule.log_every=1"]
    return apply_overrides(modern_dcgan(), base + list(overrides))


def test_gan_run_writes_mosaics_checkpoints_and_continues_at_its_iteration(faces64, tmp_path, capsys):  # noqa: F811
    train_loop_per_worker(to_dict(gan_config(faces64, str(tmp_path), 6)))
    run = tmp_path / "g"
    assert sorted(os.listdir(run / "mosaics")) == ["iter-000003.png", "iter-000006.png"]
    mosaic = Image.open(run / "mosaics" / "iter-000006.png")
    assert mosaic.size == (6 * 64, 6 * 64)  # the study's 6x6 grid of 64 px faces
    state = load_state(str(run / "checkpoint_000006"))
    assert state["iteration"] == 6 and state["fixed_latents"].shape == (36, 128)
    assert {"G", "D", "ema", "opt_g", "opt_d", "rng", "config"} <= set(state)
    capsys.readouterr()
    train_loop_per_worker(to_dict(gan_config(faces64, str(tmp_path), 9)))
    assert "resuming from iteration 6" in capsys.readouterr().out
    iterations = [json.loads(line)["iteration"] for line in open(run / "metrics.jsonl")]
    assert iterations == list(range(1, 10))
    assert all(abs(json.loads(line)["loss/d"]) < 1e3 for line in open(run / "metrics.jsonl"))
    resumed = load_state(str(run / "checkpoint_000009"))
    assert resumed["fixed_latents"].equal(state["fixed_latents"])  # mosaics stay comparable across the resume


def test_bad_gan_settings_are_refused_by_name(faces64, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="model.arch must be one of paper, dcgan"):
        gan_config(faces64, str(tmp_path), 3, "model.arch=stylegan").validate()
    with pytest.raises(ValueError, match="unknown CelebA attribute 'Atractive'"):
        gan_config(faces64, str(tmp_path), 3, "data.where=Atractive=1").validate()
