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

from deeprecognition import storage
from deeprecognition.cli import main
from deeprecognition.sweep.spec import load_spec
from deeprecognition.sweep.trial import TrialPlan
from deeprecognition.sweep.tuner import SweepOptions, _fresh, param_space, run_sweep

from .conftest import BUCKET

SWEEPS = Path(__file__).resolve().parents[1] / "tune_configs"
# FID needs a trained classifier; validation only checks that the sweep names one.
GAN_EVAL = ("eval.classifier=s3://bucket/runs/cnn3-attractive",)


@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
@pytest.mark.parametrize("name", ["cnn_layers", "transfer", "gan"])
def test_every_shipped_sweep_file_validates(name, smoke):
    spec = load_spec(str(SWEEPS / f"{name}.yaml"), smoke=smoke, overrides=GAN_EVAL if name == "gan" else ())
    assert set(param_space(spec)) == {f.short for f in spec.search}
    if smoke:  # a laptop: one CPU worker per trial, a handful of trials
        assert spec.trial.workers == 1 and not spec.trial.gpu and spec.max_concurrent <= 2
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
