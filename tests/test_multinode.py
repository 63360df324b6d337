"""Losing machines and preemption, for real: a three-node Ray cluster on this machine
(tests/multinode.py: `ray.cluster_utils.Cluster`, a head and two one-CPU worker nodes, each worker
node running one DDP rank) loses a node in the middle of a classifier run and of a GAN run, or has
one drained as a spot reclaim; every run ends with exact counters. The preemption checkpoint's
resume is also checked in one process: bit for bit the weights of a run never interrupted.

Each cluster runs in a subprocess of its own, so the session's shared Ray is never touched.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from deeprecognition import storage
from deeprecognition.celeba.synthetic import write_synthetic
from deeprecognition.classifier import loop as classifier_loop
from deeprecognition.config import ClassifierConfig, GanConfig, apply_overrides, modern_dcgan, to_dict
from deeprecognition.gan import loop as gan_loop
from deeprecognition.runs.checkpoint import load_state
from deeprecognition.runs.report import read_history
from deeprecognition.runs.session import Session
from deeprecognition.shards.encode import ImageFormat
from deeprecognition.shards.pack import PackOptions, pack

from .conftest import BUCKET, COLLECTIVE_TIMEOUT_S
from .rayhead import _session_members

SCRIPT = os.path.join(os.path.dirname(__file__), "multinode.py")


@pytest.fixture(scope="module")
def faces(ray_cluster, tmp_path_factory) -> str:
    """400 synthetic faces at 64 px, 50 per shard: small enough for one-CPU nodes."""
    src = str(tmp_path_factory.mktemp("mn-src"))
    write_synthetic(src, n=400, seed=3)
    return pack(
        src, str(tmp_path_factory.mktemp("mn-data")), PackOptions(image=ImageFormat(size=64), samples_per_shard=50)
    ).dest


def classifier(data: str, storage_uri: str, name: str, *overrides: str) -> ClassifierConfig:
    base = [
        f"data.data={data}",
        f"storage={storage_uri}",
        f"name={name}",
        "data.task=Male,Smiling",
        "data.batch_size=16",
        "data.loader_workers=0",
        "model.layers=2",
        "scale.num_workers=2",
        "scale.max_failures=1",
        f"scale.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
    ]
    return apply_overrides(ClassifierConfig(), base + list(overrides))


def gan(data: str, storage_uri: str, name: str, *overrides: str) -> GanConfig:
    base = [
        f"data.data={data}",
        f"storage={storage_uri}",
        f"name={name}",
        "data.batch_size=8",
        "data.where=",
        "data.loader_workers=0",
        "model.width=16",
        "schedule.mosaic_every=1000",
        "schedule.log_every=1",
        "scale.num_workers=2",
        "scale.max_failures=1",
        f"scale.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
    ]
    return apply_overrides(modern_dcgan(), base + list(overrides))


def on_cluster(
    tmp_path, cfg: ClassifierConfig | GanConfig, scenario: str, timeout_s: float = 420, **settings
) -> tuple[dict, str]:
    """Run tests/multinode.py on `cfg`; its outcome and everything the cluster printed."""
    spec = {
        "kind": "gan" if isinstance(cfg, GanConfig) else "classifier",
        "scenario": scenario,
        "config": to_dict(cfg),
        "out": str(tmp_path / "outcome.json"),
        **settings,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "cluster.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, str(tmp_path / "spec.json")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout_s)
        finally:
            for pid in _session_members(proc.pid):  # the cluster's raylets and workers, whatever happened
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    text = (tmp_path / "cluster.log").read_text()
    assert proc.returncode == 0, text[-5000:]
    return json.loads((tmp_path / "outcome.json").read_text()), text


@pytest.mark.slow
def test_a_classifier_losing_a_node_shrinks_to_the_other_and_ends_with_exact_counters(faces, s3, tmp_path):
    epochs, steps = 4, 4
    runs = f"s3://{BUCKET}/multinode"
    cfg = classifier(
        faces, runs, "lost-node", f"optim.epochs={epochs}", f"optim.steps_per_epoch={steps}", "scale.elastic_min=1"
    )
    outcome, log = on_cluster(tmp_path, cfg, "lose-node")
    assert outcome["error"] is None, log[-5000:]
    assert (outcome["metrics"]["epoch"], outcome["metrics"]["step"]) == (epochs - 1, epochs * steps)
    resumed = int(re.search(r"resuming at epoch (\d+) after 0 of its steps", log).group(1))
    assert resumed > outcome["events"]["latest_when_lost"]["epoch"]  # from a checkpoint Ray had when the node died
    history = read_history(f"{runs}/lost-node")
    assert [m["epoch"] for m in history] == list(range(epochs))  # each epoch once: none lost, none twice
    assert [m["step"] for m in history] == [steps * (e + 1) for e in range(epochs)]
    assert [m["world_size"] for m in history] == [2] * resumed + [1] * (epochs - resumed)  # elastic: on the node left


@pytest.mark.slow
def test_a_gan_losing_a_node_waits_for_a_new_one_and_ends_at_its_iteration(faces, s3, tmp_path):
    total, every = 16, 4
    runs = f"s3://{BUCKET}/multinode"
    cfg = gan(faces, runs, "lost-node-gan", f"optim.iterations={total}", f"schedule.checkpoint_every={every}")
    outcome, log = on_cluster(tmp_path, cfg, "lose-node", replace_after_s=3)
    assert outcome["error"] is None, log[-5000:]
    assert outcome["metrics"]["iteration"] == total
    resumed = int(re.search(r"resuming from iteration (\d+)", log).group(1))
    assert outcome["events"]["latest_when_lost"]["iteration"] <= resumed < total and resumed % every == 0
    assert [m["iteration"] for m in read_history(f"{runs}/lost-node-gan")] == list(range(1, total + 1))
    assert outcome["events"]["replaced"] < outcome["events"]["ended"]  # it waited for the new node
    assert load_state(f"{runs}/lost-node-gan/{_latest_checkpoint(f'{runs}/lost-node-gan')}")["iteration"] == total


def _latest_checkpoint(run: str) -> str:
    return max(n for n in storage.list_folders(run) if n.startswith("checkpoint_"))


@pytest.mark.slow
def test_a_drained_node_gets_a_checkpoint_at_once_and_the_run_resumes_from_it(faces, s3, tmp_path):
    epochs, steps = 4, 5
    runs = f"s3://{BUCKET}/multinode"
    cfg = classifier(
        faces,
        runs,
        "drained",
        f"optim.epochs={epochs}",
        f"optim.steps_per_epoch={steps}",
        "scale.preemption_check_every=1",
    )
    outcome, log = on_cluster(tmp_path, cfg, "drain-node", drain_after_s=1, deadline_s=30, replace_after_s=3)
    assert outcome["error"] is None, log[-5000:]
    assert (outcome["metrics"]["epoch"], outcome["metrics"]["step"]) == (epochs - 1, epochs * steps)
    assert re.search(r"preemption notice: node\(s\) \w+ \(ranks \[\d\]\) draining, \d+ s left; checkpointing now", log)
    notice = outcome["events"]["latest_when_lost"]  # the checkpoint the loop wrote on the notice, before the node went
    assert notice["preemption_checkpoint"] and 0 < notice["step"] < epochs * steps
    epoch, done = map(int, re.search(r"resuming at epoch (\d+) after (\d+) of its steps", log).groups())
    assert steps * epoch + done >= notice["step"]  # lost at most what was trained after the notice
    history = read_history(f"{runs}/drained")
    assert [m["epoch"] for m in history] == list(range(epochs))
    assert [m["step"] for m in history] == [steps * (e + 1) for e in range(epochs)]


class _Reclaimed(Exception):
    """The node going away: the process ends without another word."""


def _preempt_then_reclaim(monkeypatch, notice_at: int, reclaimed_at: int) -> None:
    """The loops ask Session.preemption_pending at every step (preemption_check_every=1): a notice
    at check `notice_at`, then the node vanishes at check `reclaimed_at`."""
    calls = []

    def pending(self: Session) -> bool:
        calls.append(1)
        if len(calls) == reclaimed_at:
            raise _Reclaimed
        return len(calls) == notice_at

    monkeypatch.setattr(Session, "preemption_pending", pending)


def test_a_mid_epoch_preemption_checkpoint_resumes_to_the_weights_of_an_uninterrupted_run(
    faces, tmp_path, monkeypatch, capsys
):
    def cfg(name: str) -> dict:
        return to_dict(
            classifier(
                faces,
                str(tmp_path),
                name,
                "optim.epochs=2",
                "optim.steps_per_epoch=6",
                "scale.num_workers=1",
                "scale.preemption_check_every=1",
            )
        )

    classifier_loop.train_loop_per_worker(cfg("whole"))
    with monkeypatch.context() as patch:
        _preempt_then_reclaim(
            patch, notice_at=8, reclaimed_at=11
        )  # epoch 1: a notice after its 2nd step, gone after its 5th
        with pytest.raises(_Reclaimed):
            classifier_loop.train_loop_per_worker(cfg("preempted"))
    notice = load_state(str(tmp_path / "preempted" / "checkpoint_000001"))
    assert (notice["epoch"], notice["step"], notice["epoch_progress"]["steps"]) == (1, 8, 2)
    classifier_loop.train_loop_per_worker(cfg("preempted"))
    assert "resuming at epoch 1 after 2 of its steps (8 steps in all)" in capsys.readouterr().out
    whole, resumed = (load_state(str(tmp_path / run / "checkpoint_000001")) for run in ("whole", "preempted"))
    assert resumed["step"] == whole["step"] == 12 and "epoch_progress" not in resumed
    assert all(torch.equal(resumed["model"][k], whole["model"][k]) for k in whole["model"])  # bit for bit
    # Each epoch logged once, with the same train and validation figures (throughput aside)
    same = [
        {k: v for k, v in m.items() if k != "train/images_per_s"} for m in read_history(str(tmp_path / "preempted"))
    ]
    assert same == [
        {k: v for k, v in m.items() if k != "train/images_per_s"} for m in read_history(str(tmp_path / "whole"))
    ]


def test_a_gan_preemption_checkpoint_is_written_at_the_notice_and_resumed_from(faces, tmp_path, monkeypatch, capsys):
    cfg = to_dict(
        gan(
            faces,
            str(tmp_path),
            "g",
            "optim.iterations=9",
            "schedule.checkpoint_every=100",
            "scale.num_workers=1",
            "scale.preemption_check_every=1",
        )
    )
    with monkeypatch.context() as patch:
        _preempt_then_reclaim(patch, notice_at=5, reclaimed_at=7)
        with pytest.raises(_Reclaimed):
            gan_loop.train_loop_per_worker(cfg)
    assert sorted(os.listdir(tmp_path / "g")) == [
        "checkpoint_000005",
        "metrics.jsonl",
        "tensorboard",
        "training_options.json",
    ]
    assert (
        json.loads((tmp_path / "g" / "checkpoint_000005" / "metrics.json").read_text())["preemption_checkpoint"] is True
    )
    gan_loop.train_loop_per_worker(cfg)
    assert "resuming from iteration 5" in capsys.readouterr().out
    assert [m["iteration"] for m in read_history(str(tmp_path / "g"))] == list(range(1, 10))
    assert load_state(str(tmp_path / "g" / "checkpoint_000009"))["iteration"] == 9
