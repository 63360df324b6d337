"""The classifier loop: learns in one plain process, resumes from its checkpoint, runs as a 2-worker
gloo DDP job on Ray Train with checkpoints in S3, and refuses bad configs before any worker starts."""

from __future__ import annotations

import json
import os

import pytest

from deeprecognition.celeba.synthetic import write_synthetic
from deeprecognition.checkpoint import load_state
from deeprecognition.config import ClassifierConfig, apply_overrides, to_dict
from deeprecognition.errors import InputError
from deeprecognition.evaluate import evaluate_checkpoint
from deeprecognition.launch import check_before_workers, run
from deeprecognition.loops.classifier import train_loop_per_worker
from deeprecognition.shards.encode import ImageFormat
from deeprecognition.shards.manifest import read_manifest
from deeprecognition.shards.pack import PackOptions, pack

from .conftest import BUCKET


@pytest.fixture(scope="module")
def faces64(ray_cluster, tmp_path_factory) -> str:
    """1,200 synthetic faces at 64 px: enough for a CNN to learn Male in a few CPU seconds."""
    src = str(tmp_path_factory.mktemp("s1200"))
    write_synthetic(src, n=1200, seed=3)
    return pack(src, str(tmp_path_factory.mktemp("p1200")), PackOptions(image=ImageFormat(size=64), samples_per_shard=200)).dest


def config(data: str, storage: str, *overrides: str) -> ClassifierConfig:
    base = [f"data.data={data}", f"storage={storage}", "data.task=Male,Smiling", "data.batch_size=32", "data.loader_workers=0", "model.layers=3"]
    return apply_overrides(ClassifierConfig(), base + list(overrides))


def epochs_logged(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f]


def test_one_process_run_learns_then_resumes_where_it_stopped(faces64, tmp_path):
    train_loop_per_worker(to_dict(config(faces64, str(tmp_path), "name=solo", "optim.epochs=3")))
    run_dir = str(tmp_path / "solo")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    assert last["val/acc/Male"] > 0.75  # majority class in val is about 0.6
    state = load_state(os.path.join(run_dir, "checkpoint_000002"))
    assert state["epoch"] == 2 and state["attributes"] == ["Male", "Smiling"]
    train_loop_per_worker(to_dict(config(faces64, str(tmp_path), "name=solo", "optim.epochs=5")))
    assert epochs_logged(run_dir) == [0, 1, 2, 3, 4]
    assert load_state(os.path.join(run_dir, "checkpoint_000004"))["step"] > state["step"]


def test_two_worker_ddp_run_on_ray_checkpoints_to_s3(faces64, s3):
    cfg = config(faces64, f"s3://{BUCKET}/runs", "name=ddp", "optim.epochs=2", "optim.steps_per_epoch=4", "scale.num_workers=2")
    result = run(cfg)
    assert result.error is None
    assert result.metrics["epoch"] == 1 and result.metrics["step"] == 8
    assert result.checkpoint.path.startswith(f"{BUCKET}/runs/ddp/")
    state = load_state(f"s3://{result.checkpoint.path}")
    assert state["epoch"] == 1 and state["config"]["scale"]["num_workers"] == 2
    # evaluate straight from the run folder in S3: its best checkpoint, on the test split
    report = evaluate_checkpoint(f"s3://{BUCKET}/runs/ddp", faces64, split="test")
    assert report["samples"] == read_manifest(faces64).splits["test"].samples
    assert set(report["attributes"]) == {"Male", "Smiling"}
    assert report["checkpoint"].startswith(f"s3://{BUCKET}/runs/ddp/checkpoint_")


def test_bad_configs_fail_on_the_driver(faces64, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(InputError, match="torch-home.*--weights"):
        check_before_workers(config(faces64, str(tmp_path), "model.name=resnet50", "model.weights=imagenet"))
    with pytest.raises(InputError, match="manifest.json: not found"):
        check_before_workers(config(str(tmp_path / "nothing"), str(tmp_path)))
    with pytest.raises(ValueError, match="model.layers must be 1..4"):
        check_before_workers(config(faces64, str(tmp_path), "model.layers=7"))
