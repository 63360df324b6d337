"""The classifier loop: learns in one plain process, resumes from its checkpoint, runs as a 2-worker
gloo DDP job on Ray Train with checkpoints in S3, keeps two gloo ranks' weights identical while they
train on different batches, and refuses bad configs before any worker starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import pytest
import torch

from deeprecognition import storage
from deeprecognition.classifier.evaluate import evaluate_checkpoint, majority_of
from deeprecognition.classifier.loop import train_loop_per_worker
from deeprecognition.cli import main
from deeprecognition.config import ClassifierConfig, apply_overrides, to_dict
from deeprecognition.errors import InputError
from deeprecognition.launch import check_before_workers, run
from deeprecognition.runs.checkpoint import load_state
from deeprecognition.shards.loader import LoaderConfig, make_loader
from deeprecognition.shards.manifest import read_manifest

from .collectives import assert_same_collectives, run_ranks
from .conftest import BUCKET, COLLECTIVE_TIMEOUT_S, repartitioned


def config(data: str, storage: str, *overrides: str) -> ClassifierConfig:
    base = [
        f"data.data={data}",
        f"storage={storage}",
        "data.task=Male,Smiling",
        "data.batch_size=32",
        "data.loader_workers=0",
        "model.layers=3",
        f"scale.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
    ]
    return apply_overrides(ClassifierConfig(), base + list(overrides))


def epochs_logged_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def epochs_logged(run_dir: str) -> list[int]:
    return [m["epoch"] for m in epochs_logged_metrics(run_dir)]


def test_one_process_run_learns_then_resumes_where_it_stopped(faces64, tmp_path):
    train_loop_per_worker(to_dict(config(faces64, str(tmp_path), "name=solo", "optim.epochs=3")))
    run_dir = str(tmp_path / "solo")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = json.loads(f.readlines()[-1])
    assert last["val/acc/Male"] > 0.75  # majority class in val is about 0.6
    state = load_state(os.path.join(run_dir, "checkpoint_000002"))  # the latest is always kept
    assert state["epoch"] == 2 and state["attributes"] == ["Male", "Smiling"]
    train_loop_per_worker(to_dict(config(faces64, str(tmp_path), "name=solo", "optim.epochs=5")))
    assert epochs_logged(run_dir) == [0, 1, 2, 3, 4]
    assert load_state(os.path.join(run_dir, "checkpoint_000004"))["step"] > state["step"]
    kept = sorted(n for n in os.listdir(run_dir) if n.startswith("checkpoint_"))
    best = max(epochs_logged_metrics(run_dir)[:4], key=lambda m: (m["val/mean_accuracy"], m["epoch"]))[
        "epoch"
    ]  # a tie keeps the later
    assert kept == sorted({f"checkpoint_{best:06d}", "checkpoint_000004"})  # the best plus the latest
    # What the run leaves beside its checkpoints
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    assert report["samples"] == read_manifest(faces64).splits["test"].samples and "Male" in report["accuracy"]
    assert "| Male |" in open(os.path.join(run_dir, "report.md")).read()
    assert open(os.path.join(run_dir, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(os.path.join(run_dir, "training_options.json")))["optim"]["epochs"] == 5
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run_dir, "tensorboard")))
    # Two runs on one plot (the study's scratch-vs-transfer figure)
    shutil.copytree(run_dir, tmp_path / "solo-copy")
    png = str(tmp_path / "compare.png")
    assert main(["curves", run_dir, str(tmp_path / "solo-copy"), "--out", png]) == 0
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_two_worker_ddp_run_on_ray_checkpoints_to_s3(faces64, s3):
    cfg = config(
        faces64, f"s3://{BUCKET}/runs", "name=ddp", "optim.epochs=2", "optim.steps_per_epoch=4", "scale.num_workers=2"
    )
    result = run(cfg)
    assert result.error is None
    assert result.metrics["epoch"] == 1 and result.metrics["step"] == 8 and result.metrics["world_size"] == 2
    assert result.checkpoint.path.startswith(f"{BUCKET}/runs/ddp/")
    state = load_state(f"s3://{result.checkpoint.path}")
    assert state["epoch"] == 1 and state["config"]["scale"]["num_workers"] == 2
    # evaluate straight from the run folder in S3: its best checkpoint, on the test split
    report = evaluate_checkpoint(f"s3://{BUCKET}/runs/ddp", faces64, split="test")
    assert storage.exists(f"s3://{BUCKET}/runs/ddp/report.md") and storage.exists(f"s3://{BUCKET}/runs/ddp/curves.png")
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


def _train_worker_pids() -> set[int]:
    import ray
    from ray.util.state import list_actors

    # This session's cluster by its own address: another Ray head may run beside it (the jobs tests).
    alive = list_actors(
        address=ray.get_runtime_context().gcs_address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    return {a.pid for a in alive}


def fit_killing_a_worker(cfg, run_dir):
    """Fit on Ray in a thread, SIGKILL one training worker once the run's first checkpoint is
    written, wait for the end; returns (Ray's Result, the killed pid)."""
    outcome: dict = {}
    fit = threading.Thread(target=lambda: outcome.update(result=run(cfg)))
    fit.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (
        run_dir.exists() and any(p.name.startswith("checkpoint_") for p in run_dir.iterdir())
    ):
        time.sleep(0.05)
    victims = _train_worker_pids()
    assert victims, "no training worker alive after the first checkpoint"
    os.kill(min(victims), signal.SIGKILL)
    fit.join(timeout=400)
    return outcome["result"], min(victims)


def test_a_killed_worker_is_replaced_and_the_run_finishes_from_its_checkpoint(faces64, tmp_path):
    epochs, steps = 6, 5
    cfg = config(
        faces64,
        str(tmp_path),
        "name=killed",
        f"optim.epochs={epochs}",
        f"optim.steps_per_epoch={steps}",
        "scale.num_workers=2",
        "scale.max_failures=1",
    )
    result, victim = fit_killing_a_worker(cfg, tmp_path / "killed")
    assert result.error is None
    # Counters continue from the checkpoint instead of restarting: exactly `epochs` epochs of `steps`.
    assert result.metrics["epoch"] == epochs - 1
    assert result.metrics["step"] == epochs * steps
    assert victim not in _train_worker_pids()


def test_cli_reports_a_failed_run_in_one_line(faces64, tmp_path, capsys):
    # Passes the driver's checks, then fails in every worker: the dataset vanishes after the check.
    data = str(tmp_path / "data")
    shutil.copytree(faces64, data)
    os.remove(os.path.join(data, read_manifest(data).splits["train"].shards[0].name))
    code = main(
        [
            "train",
            "classifier",
            "--data",
            data,
            "--storage",
            str(tmp_path),
            "--name",
            "doomed",
            "--epochs",
            "1",
            "--set",
            "data.loader_workers=0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "the run failed: rank 0:" in err and "Traceback" not in err


def test_frozen_backbone_head_trains_on_cached_features_and_matches_the_full_model(faces64, tmp_path):
    cfg = config(
        faces64,
        str(tmp_path),
        "name=cached",
        "model.name=resnet50",
        "model.freeze=all",
        "model.weights=none",
        "optim.epochs=2",
        "optim.steps_per_epoch=6",
        "data.task=Male",
    )
    train_loop_per_worker(to_dict(cfg))
    run_dir = tmp_path / "cached"
    report = json.loads((run_dir / "report.json").read_text())
    # The checkpoint holds the whole model: run on images, it agrees with the head run on the cache.
    direct = evaluate_checkpoint(str(run_dir / "checkpoint_000001"), faces64, split="test")
    assert abs(direct["mean_accuracy"] - report["mean_accuracy"]) <= 1 / report["samples"]
    state = load_state(str(run_dir / "checkpoint_000001"))
    assert any(k.startswith("backbone.") for k in state["model"]) and any(k.startswith("head.") for k in state["model"])


def _training_rank(rank: int, world_size: int, config: dict) -> dict:
    """Runs our loop on this gloo rank; returns the CNN's parameters at its first forward and at the
    end, and a fingerprint of every batch it trained on (seen by a global forward pre-hook)."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from deeprecognition.classifier.cnn import PaperCNN

    seen: dict = {"batches": []}

    def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def before_forward(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, PaperCNN):
            if "model" not in seen:  # after DDP's constructor, before the first step
                seen["model"], seen["initial"] = module, parameters(module)
            if module.training:
                seen["batches"].append(args[0].double().sum().item())

    handle = register_module_forward_pre_hook(before_forward)
    try:
        train_loop_per_worker(config)
    finally:
        handle.remove()
    return {"initial": seen["initial"], "final": parameters(seen["model"]), "batches": seen["batches"]}


def test_two_gloo_ranks_of_our_loop_train_on_different_batches_and_end_with_the_same_moved_weights(faces64, tmp_path):
    """The classifier loop itself on two ranks (separate processes, as torchrun starts them): DDP
    averages the ranks' gradients, so ranks that train on different batches hold the same weights
    after every step; the weights moved; and rank 0's checkpoint holds exactly them."""
    epochs, steps = 2, 3
    cfg = config(faces64, str(tmp_path), "name=ddp2", f"optim.epochs={epochs}", f"optim.steps_per_epoch={steps}")
    results = run_ranks(_training_rank, 2, args=(to_dict(cfg),), timeout_s=COLLECTIVE_TIMEOUT_S)
    assert_same_collectives([r.record for r in results])
    rank0, rank1 = (r.value for r in results)
    assert len(rank0["batches"]) == len(rank1["batches"]) == epochs * steps  # equal steps: DDP needs them
    assert all(a != b for a, b in zip(rank0["batches"], rank1["batches"]))  # each rank its own images
    assert set(rank0["final"]) == set(rank1["final"]) == set(rank0["initial"])
    for name, weights in rank0["final"].items():
        assert torch.equal(rank0["initial"][name], rank1["initial"][name]), name
        assert torch.equal(weights, rank1["final"][name]), name
        assert not torch.equal(weights, rank0["initial"][name]), name
    saved = load_state(str(tmp_path / "ddp2" / f"checkpoint_{epochs - 1:06d}"))
    assert all(torch.equal(saved["model"][name], weights) for name, weights in rank0["final"].items())
    assert epochs_logged_metrics(str(tmp_path / "ddp2"))[-1]["world_size"] == 2


def test_a_continued_run_trains_at_the_learning_rate_it_is_given(faces64, tmp_path, capsys):
    quick = ("name=lr", "optim.steps_per_epoch=2")
    train_loop_per_worker(to_dict(config(faces64, str(tmp_path), *quick, "optim.epochs=1")))
    capsys.readouterr()
    train_loop_per_worker(to_dict(config(faces64, str(tmp_path), *quick, "optim.epochs=2", "optim.lr=0.0001")))
    assert "the config changes optimizer lr 0.001 -> 0.0001" in capsys.readouterr().out
    state = load_state(str(tmp_path / "lr" / "checkpoint_000001"))
    assert {group["lr"] for group in state["optimizer"]["param_groups"]} == {0.0001}


def test_evaluate_on_a_test_only_dataset_keeps_the_models_own_floor(faces64, tmp_path):
    train_loop_per_worker(
        to_dict(config(faces64, str(tmp_path), "name=floor", "optim.epochs=1", "optim.steps_per_epoch=2"))
    )
    run_dir = str(tmp_path / "floor")
    majority = torch.tensor(load_state(os.path.join(run_dir, "checkpoint_000000"))["majority"])
    assert majority.tolist() == majority_of(read_manifest(faces64), ("Male", "Smiling")).tolist()
    # The official release's test split alone, as a user packs it to evaluate on: no train split.
    test_only = repartitioned(str(tmp_path / "src"), str(tmp_path / "test-only"), 40, lambda i: 2)
    assert read_manifest(test_only).splits["train"].samples == 0
    report = evaluate_checkpoint(run_dir, test_only, split="test")
    labels = torch.cat(
        [
            b.targets
            for b in make_loader(
                LoaderConfig(data=test_only, split="test", training=False, num_workers=0, targets=("Male", "Smiling"))
            )
        ]
    )
    assert report["samples"] == 40
    assert report["exact_match_majority_baseline"] == pytest.approx(
        ((labels != 0) == majority).all(1).float().mean().item()
    )
