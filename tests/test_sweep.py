"""Ray Tune sweeps: every shipped sweep file validates; a bad one fails before any trial starts; the
cnn_layers smoke sweep (4 trials, each a Ray Train run, everything in S3) is interrupted and resumed
without running an ended trial again; ASHA stops a weak trial early."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from ray.tune.schedulers import PopulationBasedTraining

from deeprecognition import storage
from deeprecognition.cli import main
from deeprecognition.sweep.spec import load_spec
from deeprecognition.sweep.trial import TrialPlan
from deeprecognition.sweep.tuner import SweepOptions, _fresh, _scheduler, _searcher, param_space, run_sweep

from .conftest import BUCKET

SWEEPS = Path(__file__).resolve().parents[1] / "tune_configs"
# FID needs a trained classifier; validation only checks that the sweep names one.
GAN_EVAL = ("eval.classifier=s3://bucket/runs/cnn3-attractive",)


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("name", ["cnn_layers", "transfer", "gan", "gan_pbt", "gan_conditional"])
def test_every_shipped_sweep_file_validates(name, smoke):
    spec = load_spec(str(SWEEPS / f"{name}.yaml"), smoke=smoke, overrides=GAN_EVAL if "gan" in name else ())
    assert set(param_space(spec)) == {f.short for f in spec.search}
    if smoke:  # a laptop: one CPU worker per trial, a handful of trials
        # PBT's population trains side by side: its 4 trials at once, one CPU each.
        population = spec.num_samples if spec.scheduler.name == "pbt" else 2
        assert spec.trial.workers == 1 and not spec.trial.gpu and spec.max_concurrent <= min(population, 4)
    if name == "cnn_layers":  # the study's table: depths 1..4 on Attractive
        assert [(f.field, f.dist.kind, f.dist.values) for f in spec.search] == [("model.layers", "grid", (1, 2, 3, 4))]
        assert spec.base.attributes() == ("Attractive",) and spec.metric == "val/mean_accuracy"
    if name == "gan":
        assert (spec.metric, spec.mode, spec.scheduler.name, spec.scheduler.time_attr) == (
            "fid",
            "min",
            "asha",
            "training_iteration",
        )
    if name == "gan_pbt":  # PBT on FID, the learning rates perturbed every K iterations
        assert (spec.metric, spec.mode, spec.scheduler.name, spec.scheduler.time_attr) == (
            "fid",
            "min",
            "pbt",
            "iteration",
        )
        assert {"optim.lr_g", "optim.lr_d"} <= set(spec.scheduler.mutate)
        assert isinstance(_scheduler(spec), PopulationBasedTraining)
    if name == "gan_conditional":  # ranked on FID and control together, the heads compared
        assert (spec.metric, spec.mode) == ("score/conditional", "min") and spec.base.model.conditional
        assert spec.base.eval.control and spec.base.eval.control_weight == 100
        assert "model.condition_head" in {f.field for f in spec.search}


GOOD = {
    "preset": "paper-cnn",
    "search": {"model.layers": {"grid": [1, 2]}},
    "metric": "val/mean_accuracy",
    "mode": "max",
}
BAD = {
    "unknown field": ({"search": {"model.depth": {"grid": [1, 2]}}}, "unknown field 'model.depth'"),
    "unknown key": ({"schedular": "asha"}, "unknown key.*schedular"),
    "unknown distribution": ({"search": {"optim.lr": {"normal": [0.1, 1]}}}, "unknown distribution 'normal'"),
    "log of zero": ({"search": {"optim.lr": {"loguniform": [0, 0.1]}}}, r"loguniform needs 0 < low < high"),
    "uniform int": ({"search": {"model.layers": {"uniform": [1, 4]}}}, "float field"),
    "value the model refuses": ({"search": {"model.layers": {"grid": [3, 7]}}}, r"model.layers must be 1..4"),
    "reserved field": ({"set": {"scale.num_workers": 4}}, "trial.workers"),
    "metric never reported": ({"metric": "val/accuracy"}, "metric must be one"),
    "bad scheduler": ({"scheduler": {"name": "asha", "grace_period": 5, "max_t": 2}}, "grace_period <= max_t"),
    "too many workers": ({"trial": {"workers": 8}}, "8 CPU .* can hold at most 4 CPU"),
    "gpu on a CPU cluster": ({"trial": {"gpu": True}}, "can hold at most 0 GPU"),
    "loader CPUs of a GPU trial": ({"trial": {"gpu": True}, "set": {"data.loader_workers": 9}}, r"needs 1 GPU, 10 CPU"),
    "misspelt GPU type": ({"trial": {"gpu": True}, "set": {"scale.gpu_type": "a100"}}, "did you mean A100"),
    "negative retries": ({"trial": {"max_failures": -1}}, "trial.max_failures must be 0"),
    "unknown searcher": ({"searcher": "hyperopt"}, "searcher must be one of random, optuna, got 'hyperopt'"),
    "optuna on a grid": ({"searcher": "optuna"}, "searcher optuna draws every value: search model.layers with choice"),
    "pbt on a classifier": ({"scheduler": "pbt"}, "scheduler pbt needs a GAN preset"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_sweep_file_fails_before_any_trial(case, packed, tmp_path, capsys):
    change, message = BAD[case]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**GOOD, **change}))
    start = time.monotonic()
    assert main(["tune", str(tmp_path / "bad.yaml"), "--data", packed.dest, "--storage", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deeprec tune: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert time.monotonic() - start < 5 and not (tmp_path / "sweeps").exists()


PBT = {
    "preset": "dcgan",
    "set": {"schedule.eval_every": 10, "schedule.checkpoint_every": 10, "scale.keep_checkpoints": 3},
    "search": {"optim.lr_g": {"loguniform": [1.0e-5, 1.0e-3]}, "model.latent": {"choice": [32, 64]}},
    "metric": "fid",
    "mode": "min",
    "scheduler": {"name": "pbt", "time_attr": "iteration", "perturbation_interval": 20, "mutate": ["optim.lr_g"]},
}
PBT_SCHEDULER = PBT["scheduler"]
BAD_PBT = {
    "no mutable field": (
        {"scheduler": {**PBT_SCHEDULER, "mutate": []}},
        "scheduler.mutate: model.latent cannot change",
    ),
    "mutating an unsearched field": (
        {"scheduler": {**PBT_SCHEDULER, "mutate": ["optim.beta2"]}},
        "scheduler.mutate: optim.beta2 not searched",
    ),
    "a grid": ({"search": {"optim.lr_g": {"grid": [1.0e-4, 2.0e-4]}}}, "optim.lr_g: grid under scheduler pbt"),
    "a score without its checkpoint": (
        {"set": {"schedule.eval_every": 10, "schedule.checkpoint_every": 4, "scale.keep_checkpoints": 3}},
        r"schedule.eval_every \(10\) must be a multiple of schedule.checkpoint_every \(4\)",
    ),
    "too few checkpoints kept": (
        {"set": {"schedule.eval_every": 10, "schedule.checkpoint_every": 10}},
        "scale.keep_checkpoints of at least 3",
    ),
    "quantile": (
        {"scheduler": {**PBT_SCHEDULER, "quantile_fraction": 0.7}},
        r"quantile_fraction must be in \(0, 0.5\]",
    ),
    "interval": ({"scheduler": {**PBT_SCHEDULER, "perturbation_interval": 0}}, "perturbation_interval must be above 0"),
    "resampling": ({"scheduler": {**PBT_SCHEDULER, "resample_probability": 2}}, "resample_probability must be in"),
    "mutations under asha": ({"scheduler": {"name": "asha", "mutate": ["optim.lr_g"]}}, "scheduler.mutate is pbt's"),
    "optuna": ({"searcher": "optuna"}, "searcher optuna cannot drive scheduler pbt"),
    "a clock the loop lacks": ({"scheduler": {**PBT_SCHEDULER, "time_attr": "epoch"}}, "time_attr must be"),
}


@pytest.mark.parametrize("case", list(BAD_PBT))
def test_a_pbt_sweep_file_that_cannot_work_is_refused_by_key(case, tmp_path):
    change, message = BAD_PBT[case]
    (tmp_path / "pbt.yaml").write_text(yaml.safe_dump({**PBT, **change}))
    with pytest.raises(ValueError, match=message):
        load_spec(str(tmp_path / "pbt.yaml"))


def test_a_pbt_sweep_mutates_what_it_lists_and_passes_on_the_rest(tmp_path):
    (tmp_path / "pbt.yaml").write_text(yaml.safe_dump(PBT))
    spec = load_spec(str(tmp_path / "pbt.yaml"))
    pbt = _scheduler(spec)
    # latent is drawn once per trial and comes with the donor's checkpoint; lr_g is perturbed.
    assert list(pbt._hyperparam_mutations) == ["lr_g"] and pbt._perturbation_interval == 20
    assert spec.scheduler.mutate == ("optim.lr_g",)


def test_an_optuna_sweep_file_builds_optuna_and_a_missing_package_is_named(tmp_path, monkeypatch):
    spec = load_spec(str(SWEEPS / "gan.yaml"), overrides=GAN_EVAL)
    assert spec.searcher == "optuna" and len(spec.search) == 7 and spec.scheduler.name == "asha"
    searcher = _searcher(spec)
    assert type(searcher.searcher).__name__ == "OptunaSearch" and searcher.max_concurrent == spec.max_concurrent
    assert searcher.set_search_properties(spec.metric, spec.mode, param_space(spec))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ValueError, match="searcher optuna needs the optuna package: pip install optuna"):
        load_spec(str(SWEEPS / "gan.yaml"), overrides=GAN_EVAL)


def test_a_trial_whose_driver_dies_runs_again_as_many_times_as_the_file_says(tmp_path):
    (tmp_path / "retries.yaml").write_text(yaml.safe_dump({**GOOD, "trial": {"max_failures": 3}}))
    spec = load_spec(str(tmp_path / "retries.yaml"))
    plan = TrialPlan(kind=spec.kind, base={}, fields={}, metric=spec.metric, runs=str(tmp_path / "trials"))
    tuner = _fresh(spec, str(tmp_path), "retries", lambda values: None, plan)
    assert tuner._local_tuner.get_run_config().failure_config.max_failures == 3
    assert load_spec(str(SWEEPS / "cnn_layers.yaml")).trial.max_failures == 2  # the default


def _interrupt_after(log_uri: str, ended: int) -> threading.Thread:
    """Stop the sweep once `ended` trials are in its log, the way Ctrl+C does in a terminal. SIGUSR1
    is Tune's graceful stop too; SIGINT would reach pytest if it came after the sweep."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if storage.exists(log_uri) and len(storage.read_bytes(log_uri).splitlines()) >= ended:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_cnn_layers_smoke_sweep_in_s3_resumes_without_running_ended_trials_again(packed, s3, capsys):
    sweep = f"s3://{BUCKET}/sweeps/cnn_layers-smoke"
    args = [
        "tune",
        str(SWEEPS / "cnn_layers.yaml"),
        "--data",
        packed.dest,
        "--storage",
        f"s3://{BUCKET}/sweeps",
        "--smoke",
        "--json",
    ]
    # The first two trials run side by side; stopping when both have ended loses little work.
    watcher = _interrupt_after(f"{sweep}/trials.jsonl", ended=2)
    assert main(args) == 1  # interrupted: trials left to run
    watcher.join()
    first = json.loads(capsys.readouterr().out)
    ended = [t["trial_id"] for t in first["trials"] if t["status"] == "finished"]
    assert ended and len(ended) < 4 and {t["status"] for t in first["trials"]} <= {"finished", "unfinished"}
    runs_before = {tid: storage.read_bytes(f"{sweep}/trials/{tid}/metrics.jsonl") for tid in ended}

    assert main([*args, "--resume"]) == 0
    out = json.loads(capsys.readouterr().out)
    trials = out["trials"]
    assert (out["metric"], out["mode"]) == ("val/mean_accuracy", "max")
    assert sorted(t["config"]["layers"] for t in trials) == [1, 2, 3, 4]
    assert {t["trial_id"] for t in first["trials"]} <= {t["trial_id"] for t in trials}  # the same trials, resumed
    for t in trials:  # each a 1-worker Ray Train run with its checkpoints in the sweep's storage
        assert t["status"] == "finished" and t["progress"] == "2/2 epochs" and t["metrics"]["world_size"] == 1
        assert 0 <= t["metrics"]["val/mean_accuracy"] <= 1
        assert t["checkpoint"].startswith(f"{sweep}/trials/{t['trial_id']}/checkpoint_")
    scores = [t["metrics"]["val/mean_accuracy"] for t in trials]
    assert scores == sorted(scores, reverse=True) and out["best"] == trials[0]
    # Trials that had ended were not run again: their runs are untouched, each is logged once.
    assert {tid: storage.read_bytes(f"{sweep}/trials/{tid}/metrics.jsonl") for tid in ended} == runs_before
    logged = [
        json.loads(line)["trial_id"] for line in storage.read_bytes(f"{sweep}/trials.jsonl").decode().splitlines()
    ]
    assert sorted(logged) == sorted(t["trial_id"] for t in trials)
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{sweep}/results.csv").decode())))
    assert [r["trial_id"] for r in rows] == [t["trial_id"] for t in trials]
    assert storage.read_bytes(f"{sweep}/results.png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_asha_stops_a_weak_trial_early(packed, tmp_path):
    # Run one after the other, the second trial (lr 10: its loss explodes) meets the first's
    # loss at ASHA's first rung and is stopped there; the first trains to the end.
    sweep = {
        "preset": "paper-cnn",
        "set": {"optim.epochs": 3, "optim.steps_per_epoch": 3, "data.batch_size": 16, "data.loader_workers": 0},
        "search": {"optim.lr": {"grid": [1.0e-3, 10.0]}},
        "metric": "train/loss",
        "mode": "min",
        "scheduler": {"name": "asha", "grace_period": 1, "max_t": 3, "reduction_factor": 2},
        "max_concurrent": 1,
    }
    (tmp_path / "asha.yaml").write_text(yaml.safe_dump(sweep))
    result = run_sweep(
        SweepOptions(file=str(tmp_path / "asha.yaml"), data=packed.dest, storage=str(tmp_path / "sweeps"))
    )
    by_lr = {t.config["lr"]: t for t in result.trials}
    assert (by_lr[1e-3].status, by_lr[1e-3].progress) == ("finished", "3/3 epochs")
    assert (by_lr[10.0].status, by_lr[10.0].progress) == ("stopped", "1/3 epochs")
    assert result.best is by_lr[1e-3]
    # The stopped trial's Train run really stopped before its 3 epochs (the stop reaches the workers
    # a moment after the report: an epoch that short may be logged once more first).
    with open(os.path.join(result.path, "trials", by_lr[10.0].trial_id, "metrics.jsonl")) as f:
        assert len(f.readlines()) < 3
    assert os.path.exists(os.path.join(result.path, "results.png"))
