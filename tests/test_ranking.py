"""One ranking of checkpoints everywhere: the lowest FID once measured (a checkpoint without it is
never best), else the highest validation accuracy (a mid-epoch checkpoint without it is never
best), else the latest by position, numerically. The same run gives the same best to the catalog,
the loaders, `generate`, `checkpoints pull --best`, the local session's pruning, and Ray's
CheckpointConfig."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from deeprecognition.classifier.models import build_model
from deeprecognition.classifier.trained import TrainedClassifier
from deeprecognition.cli import main
from deeprecognition.config import ClassifierConfig, GanConfig, apply_overrides, to_dict
from deeprecognition.gan.generate import TrainedGan
from deeprecognition.gan.models import build_gan
from deeprecognition.launch import build_trainer
from deeprecognition.runs.catalog import (
    CheckpointInfo,
    best,
    best_checkpoint,
    list_runs,
    rank,
    ray_checkpoint_config,
    with_ray_score,
)
from deeprecognition.runs.checkpoint import write_checkpoint
from deeprecognition.runs.placement import plan
from deeprecognition.runs.session import Session

SIDE = 32  # image side of the tiny models below


def _gan_state(metrics: dict[str, Any]) -> dict[str, Any]:
    cfg = apply_overrides(GanConfig(), ["model.arch=dcgan", "model.latent=8", "model.width=4"])
    generator, _ = build_gan("dcgan", 8, SIDE, 4)
    weights = generator.state_dict()
    return {
        "G": weights,
        "ema": weights,
        "iteration": metrics["iteration"],
        "step": metrics["step"],
        "image_size": SIDE,
        "fixed_latents": torch.zeros(4, 8),
        "config": to_dict(cfg),
    }


def _classifier_state(metrics: dict[str, Any]) -> dict[str, Any]:
    cfg = apply_overrides(ClassifierConfig(), ["model.layers=1", "data.task=Male"])
    model = build_model(cfg, 1, SIDE)
    return {
        "model": model.state_dict(),
        "epoch": metrics["epoch"],
        "step": metrics["step"],
        "image_size": SIDE,
        "attributes": ["Male"],
        "config": to_dict(cfg),
    }


def _gan_metrics(iteration: int, fid: float | None) -> dict[str, Any]:
    return {"iteration": iteration, "step": iteration, **({} if fid is None else {"fid": fid})}


# A GAN run checkpointed every 100 iterations and evaluated at 200 and 300 only, ending on a
# preemption checkpoint: FID at some checkpoints, not at others.
GAN_FIDS = ((100, None), (200, 40.0), (300, 55.0), (400, None))
# A classifier run whose last checkpoint is a mid-epoch one (a preemption notice): no validation.
CLASSIFIER_REPORTS = (
    {"epoch": 0, "step": 10, "val/mean_accuracy": 0.6},
    {"epoch": 1, "step": 20, "val/mean_accuracy": 0.8},
    {"epoch": 2, "step": 30, "val/mean_accuracy": 0.7},
    {"epoch": 3, "step": 35, "preemption_checkpoint": True},
)
# kind -> (each report's metrics, its checkpoint's state, the best, the latest, the loader)
RUNS: dict[str, tuple[list[dict], Callable[[dict], dict], str, str, Callable[[str], Any]]] = {
    "gan": (
        [_gan_metrics(i, fid) for i, fid in GAN_FIDS],
        _gan_state,
        "checkpoint_000200",
        "checkpoint_000400",
        TrainedGan.load,
    ),
    "classifier": (
        list(CLASSIFIER_REPORTS),
        _classifier_state,
        "checkpoint_000001",
        "checkpoint_000003",
        TrainedClassifier.load,
    ),
}


def _local_run(kind: str, folder: str) -> Session:
    """The run trained in one plain process: every report through the session, which prunes."""
    reports, state, *_ = RUNS[kind]
    session = Session.current(folder, use_gpu=False, keep=2)
    for metrics in reports:
        session.report(metrics, state(metrics))
    return session


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_every_reader_and_local_pruning_agree_on_the_best(kind, tmp_path, capsys):
    reports, _, best_name, latest_name, load = RUNS[kind]
    run = str(tmp_path / kind)
    session = _local_run(kind, run)
    assert sorted(os.listdir(run)) == sorted({best_name, latest_name})  # pruning kept the best, and the latest
    assert best(run).name == best_name
    assert os.path.basename(best_checkpoint(run)) == best_name
    assert os.path.basename(load(run).checkpoint) == best_name
    assert main(["checkpoints", "pull", run, str(tmp_path / "pulled"), "--best"]) == 0
    assert os.listdir(tmp_path / "pulled") == [best_name]
    assert best(run, latest=True).name == latest_name
    assert session.latest_state()["step"] == reports[-1]["step"]  # resumes from the latest, not the best


def test_generate_takes_the_best_fid_checkpoint_and_the_latest_on_request(tmp_path, capsys):
    run = str(tmp_path / "gan")
    _local_run("gan", run)
    assert TrainedGan.load(run).iteration == 200 and TrainedGan.load(run, latest=True).iteration == 400
    assert main(["generate", run, "--n", "4", "--out", str(tmp_path / "best.png")]) == 0
    assert "checkpoint_000200 (iteration 200)" in capsys.readouterr().out
    assert main(["generate", run, "--n", "4", "--out", str(tmp_path / "latest.png"), "--latest"]) == 0
    assert "checkpoint_000400 (iteration 400)" in capsys.readouterr().out


@pytest.mark.parametrize("metrics", [lambda n: {"iteration": n, "step": n}, lambda n: {}], ids=["by-step", "by-name"])
def test_the_latest_is_the_highest_position_past_999999(metrics, tmp_path):
    run = tmp_path / "long"
    for n in (999_999, 1_000_000):
        write_checkpoint(str(run / f"checkpoint_{n:06d}"), {"config": {}, "iteration": n}, metrics(n))
    assert (
        Session.current(str(run), use_gpu=False, keep=2).latest_state()["iteration"] == 1_000_000
    )  # string order says 999999
    assert best(str(run)).name == "checkpoint_1000000"  # no FID, no accuracy: the latest is best


GAN_WITH_EVAL = apply_overrides(GanConfig(), ["schedule.eval_every=100", "scale.keep_checkpoints=1"])
CLASSIFIER = apply_overrides(ClassifierConfig(), ["scale.keep_checkpoints=1"])


@pytest.mark.parametrize(
    ("cfg", "reports", "through"),
    [
        (
            GAN_WITH_EVAL,
            [_gan_metrics(i, fid) for i, fid in (*GAN_FIDS, (500, float("nan")), (600, None))],
            with_ray_score,
        ),
        (CLASSIFIER, list(CLASSIFIER_REPORTS), dict),
    ],
    ids=["gan", "classifier"],
)
def test_ray_orders_checkpoints_as_the_catalog_does_even_after_its_snapshot(cfg, reports, through):
    """Ray's own scoring and insertion (what its CheckpointManager keeps num_to_keep of), on the
    metrics as Ray reads them back from checkpoint_manager_snapshot.json after a restart."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager, _insert_into_sorted_list
    from ray.train._internal.session import _TrainingResult
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _TrainingResultState

    manager, ray_order, report_index = _CheckpointManager(ray_checkpoint_config(cfg)), [], {}
    for i, metrics in enumerate(reports):
        saved = _TrainingResultState(checkpoint_dir_name=f"checkpoint_{i}", metrics=through(metrics)).model_dump_json()
        restored = _TrainingResultState.model_validate_json(saved).metrics
        report_index[f"checkpoint_{i}"] = i
        _insert_into_sorted_list(
            ray_order, _TrainingResult(f"checkpoint_{i}", restored), manager._get_checkpoint_score, report_index
        )
    _, catalog_order = rank([CheckpointInfo("", f"checkpoint_{i}", "", 0, m) for i, m in enumerate(reports)])
    assert [r.checkpoint for r in reversed(ray_order)] == [c.name for c in catalog_order]  # Ray: best last
    assert catalog_order[0].name == "checkpoint_1"  # FID 40 / accuracy 0.8: the second report of each


def _reports_gan_checkpoints(config: dict[str, Any]) -> None:
    """A one-worker run reporting checkpoints through the session, as the GAN loop does."""
    session = Session.current(config["run_dir"], use_gpu=False, keep=1)
    for iteration, fid in config["fids"]:
        metrics = _gan_metrics(iteration, fid)
        session.report(with_ray_score(metrics), {"config": {}, "iteration": iteration})


def test_ray_keeps_the_best_fid_checkpoint_and_the_latest(ray_cluster, tmp_path):
    """A real Ray Train run under the RunConfig that `deeprec train gan` builds, its loop replaced by
    one that reports checkpoints with FID at some and not at others."""
    import ray.cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    cfg = apply_overrides(GAN_WITH_EVAL, [f"storage={tmp_path}", "name=gan"])
    trainer = TorchTrainer(
        _reports_gan_checkpoints,
        train_loop_config={"run_dir": str(tmp_path / "gan"), "fids": [*GAN_FIDS, (500, None)]},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=build_trainer(cfg, plan(cfg, shapes=[])).run_config,
    )
    assert trainer.fit().error is None
    [run] = list_runs(str(tmp_path / "gan"))
    assert sorted(c.metrics["iteration"] for c in run.checkpoints) == [
        200,
        500,
    ]  # the best FID (keep 1), and the latest
    assert run.best.metrics["iteration"] == 200 and run.latest.metrics["iteration"] == 500
