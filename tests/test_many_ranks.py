"""What many GPUs under NCCL need and gloo on CPU forgives: every rank joins every collective in the
same order with tensors on its device, evaluation shared by every rank, ranks with no evaluation
samples, each rank's own random streams. The loops run here on two real gloo ranks (separate
processes, as torchrun would start them) with every collective recorded and compared
(tests/collectives.py) and a 60 s collective timeout, so a mismatch fails instead of hanging.

On CPU every tensor is on "cpu", so the device half of the check cannot catch a CPU tensor on a
CUDA rank here; the counts' device is shown with the meta device in test_metrics.py instead.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from deeprecognition.cli import main
from deeprecognition.config import ClassifierConfig, apply_overrides, to_dict
from deeprecognition.gan.fid_stats import STATS_FOLDER
from deeprecognition.gan.metrics import evaluate_gan

from .collectives import assert_same_collectives, run_ranks
from .conftest import COLLECTIVE_TIMEOUT_S, repartitioned
from .test_gan import gan_config


def _gan_rank(rank: int, world_size: int, config: dict) -> None:
    from deeprecognition.gan.loop import train_loop_per_worker

    train_loop_per_worker(config)


def test_two_ranks_evaluate_the_gan_together_and_agree_with_evaluate_gan(faces64, judge, tmp_path, capsys):
    """With the standard Inception network (the default) and the classifier's attribute rates; the
    real set's statistics are computed by both ranks, cached beside the dataset, and evaluate-gan
    gets the ranks' numbers both from that cache and from embedding the real faces itself."""
    shutil.rmtree(os.path.join(faces64, STATS_FOLDER), ignore_errors=True)  # computed here, not by an earlier test
    cfg = gan_config(
        faces64,
        str(tmp_path),
        6,
        "schedule.eval_every=3",
        "schedule.checkpoint_every=3",
        "eval.samples=40",
        f"eval.classifier={judge}",
    )
    results = run_ranks(_gan_rank, 2, args=(to_dict(cfg),), timeout_s=COLLECTIVE_TIMEOUT_S)
    records = [r.record for r in results]
    assert_same_collectives(records)
    # Both ranks embedded their share and KID's subsets were shared out (one all_reduce of 50 scores).
    assert all(any(c.op == "all_reduce" and c.tensors[0].layout == "float64[50]" for c in record) for record in records)
    assert len(os.listdir(os.path.join(faces64, STATS_FOLDER))) == 1  # rank 0 saved the real set's statistics
    logged = {m["iteration"]: m for m in map(json.loads, open(tmp_path / "g" / "metrics.jsonl")) if "fid" in m}
    assert sorted(logged) == [3, 6]
    capsys.readouterr()
    for iteration, during in logged.items():
        # One process, the same 40 real faces and the same latents: the numbers the two ranks logged,
        # from the library and from the command line with its defaults.
        checkpoint = str(tmp_path / "g" / f"checkpoint_{iteration:06d}")
        if iteration == 3:
            after = evaluate_gan(checkpoint, classifier=judge, samples=40)
        else:
            assert main(["evaluate-gan", checkpoint, "--classifier", judge, "--samples", "40", "--json"]) == 0
            after = json.loads(capsys.readouterr().out)
        _assert_same_evaluation(after, during, iteration)
    shutil.rmtree(os.path.join(faces64, STATS_FOLDER))  # now one process embeds the real faces too
    _assert_same_evaluation(evaluate_gan(checkpoint, classifier=judge, samples=40), logged[6], 6)


def _assert_same_evaluation(after: dict, during: dict, iteration: int) -> None:
    assert after["real_samples"] == 40 and after["iteration"] == iteration
    assert "standard" in after["feature_extractor"]
    assert after["fid"] == pytest.approx(during["fid"], rel=1e-4, abs=1e-4)
    assert after["kid"] == pytest.approx(during["kid"], rel=1e-4, abs=1e-6)
    assert {f"rate/{k}": v for k, v in after["attribute_rate"].items()} == pytest.approx(
        {k: v for k, v in during.items() if k.startswith("rate/")}
    )


def _classifier_rank(rank: int, world_size: int, config: dict) -> list[list[bool]]:
    """Trains on this rank and returns the first dropout masks it drew (exactly: each is drawn again
    on ones from the same generator state, under fork_rng, before the real call)."""
    import torch.nn.functional as F

    from deeprecognition.classifier.loop import train_loop_per_worker

    masks: list[list[bool]] = []
    dropout = F.dropout

    def recording(input, p=0.5, training=True, inplace=False):  # noqa: A002 - F.dropout's own signature
        if training and len(masks) < 2:
            with torch.random.fork_rng(devices=[]):
                masks.append((dropout(torch.ones_like(input), p, True) == 0).flatten().tolist())
        return dropout(input, p, training, inplace)

    F.dropout = recording
    train_loop_per_worker(config)
    return masks


@pytest.fixture(scope="module")
def one_val_face(ray_cluster, tmp_path_factory) -> str:
    """Synthetic faces at 64 px whose val split is a single image: one rank gets none to evaluate."""
    return repartitioned(
        str(tmp_path_factory.mktemp("one-val-src")),
        str(tmp_path_factory.mktemp("one-val")),
        80,
        lambda i: 1 if i == 0 else 2 if i < 9 else 0,
    )


def test_a_rank_without_validation_samples_and_each_ranks_own_dropout_masks(one_val_face, tmp_path):
    """ResNet50 (BatchNorm buffers, dropout in its head) on two ranks: rank 1 gets no val image.
    Evaluating through DDP's wrapper would broadcast buffers from rank 0 alone (a real collective,
    which gloo hangs on too); identically seeded ranks would drop the same units."""
    overrides = [
        f"data.data={one_val_face}",
        f"storage={tmp_path}",
        "name=r50",
        "data.task=Male,Smiling",
        "data.batch_size=8",
        "data.loader_workers=0",
        "model.name=resnet50",
        "model.weights=none",
        "model.freeze=none",
        "model.head_width=16",
        "optim.epochs=1",
        "optim.steps_per_epoch=2",
        f"scale.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",
    ]
    results = run_ranks(
        _classifier_rank,
        2,
        args=(to_dict(apply_overrides(ClassifierConfig(), overrides)),),
        timeout_s=COLLECTIVE_TIMEOUT_S,
    )
    assert_same_collectives([r.record for r in results])
    masks = [r.value for r in results]
    assert all(len(m) == 2 for m in masks)
    assert masks[0] != masks[1]  # each rank its own stream
    logged = [json.loads(line) for line in open(tmp_path / "r50" / "metrics.jsonl")]
    assert logged[-1]["epoch"] == 0 and 0 <= logged[-1]["val/mean_accuracy"] <= 1
    report = json.load(open(tmp_path / "r50" / "report.json"))
    assert report["samples"] == 8  # the test split, counted over both ranks
    assert os.path.isdir(tmp_path / "r50" / "checkpoint_000000")
