"""Attribute metrics against hand-computed examples; counts that survive a round trip and a sum
across ranks; every rate reported beside its floor."""

from __future__ import annotations

import json

import pytest
import torch

from deeprecognition.classifier.metrics import AttributeMetrics, format_report, majority_vector

NAMES = ("a", "b", "c")
# Predictions are logit > 0 (a logit of exactly 0 is a negative answer).
LOGITS = torch.tensor(
    [
        [2.0, -1.0, 3.0],  # right, right, right
        [0.5, -2.0, 1.0],  # a: false positive
        [1.0, -0.1, -4.0],  # b: false negative
        [0.0, -3.0, 2.0],  # right, right, right
    ]
)
TARGETS = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=torch.uint8)
MAJORITY = torch.tensor([1, 0, 1])  # a "training split" majority: only sample 0 equals it


def metrics_of(logits=LOGITS, targets=TARGETS, names=NAMES, majority=MAJORITY) -> AttributeMetrics:
    metrics = AttributeMetrics(names, majority)
    metrics.update(logits, targets)
    return metrics


def test_every_number_of_a_hand_computed_example():
    m = metrics_of().compute()
    # a: tp 2, tn 1, fp 1, fn 0; b: tp 0, tn 3, fp 0, fn 1; c: all 4 right.
    assert m["samples"] == 4
    assert m["accuracy"] == {"a": 0.75, "b": 0.75, "c": 1.0}
    assert m["mean_accuracy"] == pytest.approx(2.5 / 3)
    assert m["balanced_accuracy"] == {"a": (1.0 + 0.5) / 2, "b": (0.0 + 1.0) / 2, "c": 1.0}
    assert m["mean_balanced_accuracy"] == pytest.approx(0.75)
    assert m["majority_baseline"] == {"a": 0.5, "b": 0.75, "c": 0.75}
    assert m["mean_majority_baseline"] == pytest.approx(2 / 3)
    assert m["exact_match"] == 0.5
    assert m["exact_match_majority_baseline"] == 0.25


def test_counts_layout_is_confusion_per_attribute_then_scalars():
    tp, tn, fp, fn = [2, 0, 3], [1, 3, 1], [1, 0, 0], [0, 1, 0]
    assert metrics_of().counts().tolist() == tp + tn + fp + fn + [2, 4, 1]  # exact, samples, majority exact


def test_float_targets_count_like_uint8():
    assert metrics_of(targets=TARGETS.float()).compute() == metrics_of().compute()


def test_counts_round_trip_and_halves_sum_to_the_whole():
    whole = metrics_of()
    again = AttributeMetrics.from_counts(NAMES, whole.counts(), MAJORITY)
    assert again.compute() == whole.compute()

    first, second = metrics_of(LOGITS[:2], TARGETS[:2]), metrics_of(LOGITS[2:], TARGETS[2:])
    summed = first.counts() + second.counts()  # what all_reduce(SUM) does across two ranks
    assert AttributeMetrics.from_counts(NAMES, summed, MAJORITY).compute() == whole.compute()
    first.merge(second)
    assert first.compute() == whole.compute()


def test_counts_is_a_copy():
    metrics = metrics_of()
    metrics.counts().zero_()
    assert metrics.compute()["samples"] == 4


def test_exact_match_differs_from_per_attribute_accuracy():
    # Each sample has exactly one label wrong, each time a different one.
    targets = torch.zeros(4, 4, dtype=torch.uint8)
    logits = torch.full((4, 4), -1.0) + 2 * torch.eye(4)
    m = metrics_of(logits, targets, names=("w", "x", "y", "z"), majority=None).compute()
    assert m["accuracy"] == {"w": 0.75, "x": 0.75, "y": 0.75, "z": 0.75}
    assert m["exact_match"] == 0.0


def test_balanced_accuracy_exposes_the_majority_answer_on_an_imbalanced_attribute():
    targets = torch.tensor([[1]] + [[0]] * 9, dtype=torch.uint8)  # 10% positive
    always_no = metrics_of(torch.full((10, 1), -1.0), targets, names=("rare",), majority=None).compute()
    assert always_no["accuracy"]["rare"] == pytest.approx(0.9)
    assert always_no["majority_baseline"]["rare"] == pytest.approx(0.9)
    assert always_no["balanced_accuracy"]["rare"] == 0.5
    # Finding the positive at the cost of 2 false positives: lower accuracy, higher balanced.
    logits = torch.tensor([[1.0], [1.0], [1.0]] + [[-1.0]] * 7)
    finder = metrics_of(logits, targets, names=("rare",), majority=None).compute()
    assert finder["accuracy"]["rare"] == pytest.approx(0.8)
    assert finder["balanced_accuracy"]["rare"] == pytest.approx((1 + 7 / 9) / 2)


def test_balanced_accuracy_uses_the_defined_half_when_a_class_is_absent():
    logits = torch.tensor([[-1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])
    targets = torch.tensor([[0, 1], [0, 1], [0, 1]])  # "none" has no positives, "all" no negatives
    m = metrics_of(logits, targets, names=("none", "all"), majority=None).compute()
    assert m["balanced_accuracy"] == {"none": pytest.approx(2 / 3), "all": pytest.approx(2 / 3)}


def test_without_a_majority_vector_the_exact_match_floor_is_unknown():
    m = metrics_of(majority=None).compute()
    assert m["exact_match_majority_baseline"] is None
    assert "| **exact match** (all 3 right) | 50.00% | n/a (no majority vector given) | |" in format_report(m, "t")


def test_majority_vector_from_training_counts():
    assert majority_vector([6, 5, 4], samples=10).tolist() == [True, False, False]  # a tie is negative


def test_compute_is_json_ready():
    m = metrics_of().compute()
    assert json.loads(json.dumps(m)) == m
    assert all(type(v) is float for v in m["accuracy"].values()) and type(m["exact_match"]) is float


def test_report_shows_every_rate_beside_its_floor():
    report = format_report(metrics_of().compute(), "CelebA test")
    assert report.startswith("### CelebA test\n\n4 samples.\n")
    assert "| attribute | accuracy | majority baseline | balanced accuracy |" in report
    assert "| a | 75.00% | 50.00% | 75.00% |" in report
    assert "| b | 75.00% | 75.00% | 50.00% |" in report
    assert "| **mean** | 83.33% | 66.67% | 75.00% |" in report
    assert "| **exact match** (all 3 right) | 50.00% | 25.00% | |" in report


def test_refusals():
    metrics = AttributeMetrics(NAMES)
    with pytest.raises(ValueError, match="no samples counted"):
        metrics.compute()
    with pytest.raises(ValueError, match=r"expected logits and targets of shape \(B, 3\), got \(4, 2\)"):
        metrics.update(LOGITS[:, :2], TARGETS[:, :2])
    with pytest.raises(ValueError, match="majority has 2 entries for 3 attributes"):
        AttributeMetrics(NAMES, torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="expected 15 counts"):
        AttributeMetrics.from_counts(NAMES, torch.zeros(14, dtype=torch.int64))
    with pytest.raises(ValueError, match="cannot merge"):
        metrics_of().merge(metrics_of(majority=None))


def test_counts_live_on_the_given_device_before_any_update():
    """A rank with no evaluation batch still all_reduces its counts, which NCCL wants on the rank's
    GPU. The meta device stands in for CUDA here: the counts and the majority vector are created on
    the device they are given, not moved there by a first update that may never come."""
    metrics = AttributeMetrics(NAMES, MAJORITY, device=torch.device("meta"))
    assert metrics.counts().device.type == "meta" and metrics.majority.device.type == "meta"
    on_cpu = AttributeMetrics(NAMES, MAJORITY)
    on_cpu.update(LOGITS, TARGETS)
    assert on_cpu.counts().device.type == "cpu"
