"""How well a conditional GAN obeys, measured by an independent judge (a trained classifier): the
share of generated faces the judge scores positive per attribute, for faces asked for an attribute
at 1 and at 0, and what asking for one attribute changes in all the others. Every rank of a run
draws and judges its part of each set, and the counts are summed: the same numbers as one process.

Control (`controlled`): per attribute, `samples` faces asked for it at 1 and the same latents asked
for it at 0, the rest of each face's attributes drawn from the data given that value (the data's
joint, gan/conditions.py); accuracy = (rate_when_1 + 1 - rate_when_0) / 2, 0.5 for a model that
ignores the attribute. Edits (STGAN's and AttGAN's measure): faces drawn from the data, each with
one attribute flipped and nothing else changed; edit_accuracy is the share the judge sees with the
attribute's new value. Contrast (`contrasted`): the study's question with everything else fixed:
the same latents and the same other attributes, drawn from the data, with one attribute at 1 and
then at 0; the judge's rate of every attribute it scores in both, beside the data's own rates among
the faces that have the attribute and those that do not (which move with the correlations too).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from deeprecognition.classifier.trained import TrainedClassifier
from deeprecognition.gan.conditions import LabelBank
from deeprecognition.gan.generate import draw_faces
from deeprecognition.runs.distributed import all_sum, world
from deeprecognition.shards.sampling import part_bounds

# The latents of control and contrast sets, apart from FID's (EVAL_SEED).
CONTROL_SEED = 4321


def attribute_rates(classifier: TrainedClassifier | None, images: Tensor, batch_size: int = 250) -> dict[str, float]:
    """The share of faces, over every rank's, the classifier scores positive per attribute."""
    if classifier is None:
        return {}
    counts = torch.zeros(len(classifier.attributes) + 1, dtype=torch.int64, device=classifier.device)
    for chunk in images.split(batch_size):
        counts[:-1] += (classifier.probabilities(chunk) >= 0.5).sum(0)
        counts[-1] += len(chunk)
    *positive, total = all_sum(counts).tolist()
    return dict(zip(classifier.attributes, (p / max(total, 1) for p in positive), strict=True))


def judged_rates(
    painter: nn.Module, latent: int, labels: Tensor, judge: TrainedClassifier, seed: int
) -> dict[str, float]:
    """The judge's positive rates over faces `painter` draws for (n, K) `labels` from the latents of
    `seed`, this rank drawing its part (a collective)."""
    rank, ranks = world()
    start, stop = part_bounds(len(labels), rank, ranks)
    faces = draw_faces(painter, latent, len(labels), seed, part=slice(start, stop), labels=labels)
    return attribute_rates(judge, faces)


def _check_judged(judge: TrainedClassifier, names: list[str]) -> None:
    missing = [n for n in names if n not in judge.attributes]
    if missing:
        raise ValueError(
            f"the judge {judge.checkpoint} does not score {', '.join(missing)}: train one on those "
            f"(deeprec train classifier --task all40) or ask for some of {', '.join(judge.attributes)}"
        )


def controlled(
    painter: nn.Module,
    latent: int,
    bank: LabelBank,
    judge: TrainedClassifier,
    names: list[str],
    samples: int,
    seed: int = CONTROL_SEED,
    edits: bool = True,
) -> dict[str, Any]:
    """{"control": {name: {rate_when_1, rate_when_0, accuracy, support_when_1, support_when_0,
    edit_accuracy}}, "control_mean_accuracy", "edit_mean_accuracy"}: see the module's docstring;
    without `edits` (training's evaluations) no edit figures."""
    _check_judged(judge, names)
    control: dict[str, dict[str, float]] = {}
    drawn = bank.draw(samples, {}, seed).labels
    for name in names:
        asked = {v: bank.draw(samples, {name: v}, seed) for v in (1, 0)}
        rate = {v: judged_rates(painter, latent, asked[v].labels, judge, seed)[name] for v in (1, 0)}
        control[name] = {
            "rate_when_1": rate[1],
            "rate_when_0": rate[0],
            "accuracy": (rate[1] + 1 - rate[0]) / 2,
            "support_when_1": asked[1].support,  # training faces with the value: 0 means never seen
            "support_when_0": asked[0].support,
        }
        if edits:
            column = bank.attributes.index(name)
            control[name]["edit_accuracy"] = _edit_accuracy(painter, latent, drawn, column, judge, name, seed)
    mean = sum(c["accuracy"] for c in control.values()) / len(control)
    report = {"control": control, "control_mean_accuracy": mean}
    if edits:
        report["edit_mean_accuracy"] = sum(c["edit_accuracy"] for c in control.values()) / len(control)
    return report


def _edit_accuracy(
    painter: nn.Module, latent: int, drawn: Tensor, column: int, judge: TrainedClassifier, name: str, seed: int
) -> float:
    """The share of faces with label vectors `drawn`, attribute `column` flipped, that the judge
    sees with the new value: the faces turned on and those turned off, judged as two sets."""
    correct = 0.0
    for value in (1, 0):
        rows = drawn[drawn[:, column] != value].clone()  # the faces the flip turns to `value`
        if not len(rows):
            continue
        rows[:, column] = value
        rate = judged_rates(painter, latent, rows, judge, seed)[name]
        correct += len(rows) * (rate if value else 1 - rate)
    return correct / len(drawn)


def conditional_score(fid: float, control: dict[str, Any], weight: float) -> float:
    """What the conditional sweep ranks by, lower better: FID plus `weight` per unit of control
    accuracy lost (weight 100: a point of accuracy is worth a point of FID)."""
    return fid + weight * (1 - control["control_mean_accuracy"])


def contrasted(
    painter: nn.Module,
    latent: int,
    bank: LabelBank,
    judge: TrainedClassifier,
    attribute: str,
    samples: int,
    data: LabelBank,
    seed: int = CONTROL_SEED,
) -> dict[str, dict[str, float | None]]:
    """{judged attribute: {rate_when_1, rate_when_0, data_rate_when_1, data_rate_when_0}} for asking
    `attribute` at 1 vs 0 with everything else fixed, the asked attribute itself among them; `data`:
    the real faces' labels over all 40 attributes (None where the data has no face on one side)."""
    column = bank.attributes.index(attribute)
    base = bank.draw(samples, {}, seed).labels
    rates = {}
    for value in (1, 0):
        labels = base.clone()
        labels[:, column] = value
        rates[value] = judged_rates(painter, latent, labels, judge, seed)
    real = {v: dict(zip(data.attributes, data.rates({attribute: v}).tolist())) for v in (1, 0)}
    return {
        name: {
            "rate_when_1": rates[1][name],
            "rate_when_0": rates[0][name],
            "data_rate_when_1": _number(real[1].get(name)),
            "data_rate_when_0": _number(real[0].get(name)),
        }
        for name in judge.attributes
    }


def _number(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else x
