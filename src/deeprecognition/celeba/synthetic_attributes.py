"""Attribute model of the synthetic CelebA, fitted once to the real list_attr_celeba.txt.

Male and Young are drawn first, jointly. Every other attribute except Attractive belongs to one group
whose joint pattern is drawn from the real conditional distribution given (Male, Young). The groups
hold the attributes that CelebA ties together beyond sex and age: hair colour, baldness, bangs, hat and
texture exclude each other in practice (no bald person with bangs); Goatee and Mustache come with
No_Beard=0 in 97% of cases; Smiling goes with High_Cheekbones and Mouth_Slightly_Open; Heavy_Makeup with
Wearing_Lipstick; Chubby with Double_Chin. Drawing whole patterns keeps each marginal, each within-group
correlation and each exclusion as in the real file; patterns seen fewer than MIN_PATTERN_COUNT times
are dropped, which moves no marginal by more than 0.001.

Attractive is, as in life, a noisy function of visible features: a logistic regression of the real
Attractive labels on ATTRACTIVE_FEATURES, sampled as Bernoulli(sigmoid(w.x + b)). A classifier that
knows those features perfectly is right with probability label_noise_ceiling(stats), 0.772
for the committed stats: Attractive is learnable, never perfectly.

The fitted numbers live in synthetic_stats.json (written by fit_stats), so generation needs no CelebA.
"""

from __future__ import annotations

import functools
import importlib.resources
import json

import numpy as np

from deeprecognition.celeba.annotations import Annotations
from deeprecognition.celeba.attributes import ATTRIBUTE_INDEX, CELEBA_ATTRIBUTES

STATS_RESOURCE = "synthetic_stats.json"

ROOT: tuple[str, ...] = ("Male", "Young")
GROUPS: tuple[tuple[str, ...], ...] = (
    (
        "Bald",
        "Bangs",
        "Black_Hair",
        "Blond_Hair",
        "Brown_Hair",
        "Gray_Hair",
        "Receding_Hairline",
        "Straight_Hair",
        "Wavy_Hair",
        "Wearing_Hat",
    ),
    ("No_Beard", "5_o_Clock_Shadow", "Goatee", "Mustache", "Sideburns"),
    ("Smiling", "High_Cheekbones", "Mouth_Slightly_Open", "Rosy_Cheeks", "Oval_Face"),
    ("Heavy_Makeup", "Wearing_Lipstick", "Arched_Eyebrows", "Wearing_Earrings"),
    ("Chubby", "Double_Chin", "Big_Nose", "Bags_Under_Eyes"),
)
# The visible features with |weight| > 0.4 in a real-data fit on all 39 others, plus Male.
ATTRACTIVE_FEATURES: tuple[str, ...] = (
    "Young",
    "Male",
    "Chubby",
    "Double_Chin",
    "Blurry",
    "Gray_Hair",
    "Bald",
    "Receding_Hairline",
    "Eyeglasses",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Heavy_Makeup",
    "Smiling",
    "Pale_Skin",
    "Oval_Face",
    "Pointy_Nose",
    "Big_Nose",
    "Mouth_Slightly_Open",
    "Narrow_Eyes",
    "Bushy_Eyebrows",
)
CORRELATION_PAIRS: tuple[tuple[str, str], ...] = (("Male", "Heavy_Makeup"), ("Smiling", "High_Cheekbones"))
MIN_PATTERN_COUNT = 20
CEILING_SAMPLES = 200_000


def _group_list() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(attributes, given) in drawing order; attributes in no named group are drawn alone."""
    grouped = {name for group in (ROOT, *GROUPS) for name in group} | {"Attractive"}
    singles = [(name,) for name in CELEBA_ATTRIBUTES if name not in grouped]
    return [(ROOT, ())] + [(group, ROOT) for group in (*GROUPS, *singles)]


def _bits_to_int(bits: np.ndarray) -> np.ndarray:
    """(N, k) 0/1 -> (N,) int, first column most significant."""
    weights = 1 << np.arange(bits.shape[1] - 1, -1, -1)
    return bits.astype(np.int64) @ weights


def _fit_group(attrs: np.ndarray, names: tuple[str, ...], given: tuple[str, ...]) -> dict:
    codes = _bits_to_int(attrs[:, [ATTRIBUTE_INDEX[n] for n in names]])
    cells = _bits_to_int(attrs[:, [ATTRIBUTE_INDEX[n] for n in given]]) if given else np.zeros(len(attrs), int)
    kept = [c for c, count in enumerate(np.bincount(codes)) if count >= MIN_PATTERN_COUNT]
    table = np.zeros((1 << len(given), len(kept)))
    for j, code in enumerate(kept):
        table[:, j] = np.bincount(cells[codes == code], minlength=table.shape[0])
    table /= table.sum(axis=1, keepdims=True)
    return {
        "attributes": list(names),
        "given": list(given),
        "patterns": [format(code, f"0{len(names)}b") for code in kept],
        "p": np.round(table, 6).tolist(),
    }


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 30) -> np.ndarray:
    """Newton/IRLS for an L2-regularised logistic regression; returns weights with the bias last."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(x1.shape[1])
    for _ in range(steps):
        p = _sigmoid(x1 @ w)
        hessian = (x1 * (p * (1 - p))[:, None]).T @ x1 + l2 * np.eye(len(w))
        w -= np.linalg.solve(hessian, x1.T @ (p - y) + l2 * w)
    return w


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _correlation(attrs: np.ndarray, a: str, b: str) -> float:
    return float(np.corrcoef(attrs[:, ATTRIBUTE_INDEX[a]], attrs[:, ATTRIBUTE_INDEX[b]])[0, 1])


def fit_stats(ann: Annotations) -> dict:
    """Fit the attribute model to real annotations.

    The result, saved with json.dumps(stats, indent=1), is the committed synthetic_stats.json.
    """
    attrs = ann.attrs.astype(np.float64)
    feats = attrs[:, [ATTRIBUTE_INDEX[n] for n in ATTRACTIVE_FEATURES]]
    w = _fit_logistic(feats, attrs[:, ATTRIBUTE_INDEX["Attractive"]])
    return {
        "source": {"file": "list_attr_celeba.txt", "images": len(ann)},
        "frequencies": {n: round(float(f), 6) for n, f in zip(CELEBA_ATTRIBUTES, attrs.mean(axis=0))},
        "correlations": {f"{a}/{b}": round(_correlation(attrs, a, b), 6) for a, b in CORRELATION_PAIRS},
        "groups": [_fit_group(ann.attrs, names, given) for names, given in _group_list()],
        "attractive": {
            "features": list(ATTRACTIVE_FEATURES),
            "weights": np.round(w[:-1], 6).tolist(),
            "bias": round(float(w[-1]), 6),
        },
    }


@functools.lru_cache(maxsize=1)
def load_stats() -> dict:
    """The committed stats fitted to the real CelebA (package data)."""
    text = importlib.resources.files("deeprecognition.celeba").joinpath(STATS_RESOURCE).read_text("utf-8")
    return json.loads(text)


def _draw_group(attrs: np.ndarray, group: dict, u: np.ndarray) -> None:
    """Fill the group's columns of attrs from one uniform per image (inverse CDF within each cell)."""
    given = [ATTRIBUTE_INDEX[n] for n in group["given"]]
    cells = _bits_to_int(attrs[:, given]) if given else np.zeros(len(attrs), np.int64)
    cdf = np.cumsum(np.asarray(group["p"]), axis=1)
    cdf /= cdf[:, -1:]  # rounding in the JSON leaves rows a hair off 1
    choice = np.minimum((u[:, None] >= cdf[cells]).sum(axis=1), cdf.shape[1] - 1)
    patterns = np.array([[int(b) for b in p] for p in group["patterns"]], dtype=np.uint8)
    attrs[:, [ATTRIBUTE_INDEX[n] for n in group["attributes"]]] = patterns[choice]


def attractive_probability(attrs: np.ndarray, stats: dict) -> np.ndarray:
    """P(Attractive = 1 | visible features) under the fitted logistic regression; (N, 40) -> (N,)."""
    model = stats["attractive"]
    x = attrs[:, [ATTRIBUTE_INDEX[n] for n in model["features"]]].astype(np.float64)
    return _sigmoid(x @ np.asarray(model["weights"]) + model["bias"])


def sample_attributes(n: int, seed: int, stats: dict | None = None) -> np.ndarray:
    """(n, 40) uint8 0/1 attributes in CelebA order.

    Each image uses one row of uniforms from a single PCG64 stream, filled row by row, so the first
    k rows do not depend on n: sample_attributes(5, s) == sample_attributes(12, s)[:5].
    """
    stats = stats or load_stats()
    groups = stats["groups"]
    u = np.random.default_rng(np.random.SeedSequence(seed)).random((n, len(groups) + 1))
    attrs = np.zeros((n, len(CELEBA_ATTRIBUTES)), dtype=np.uint8)
    for k, group in enumerate(groups):
        _draw_group(attrs, group, u[:, k])
    attrs[:, ATTRIBUTE_INDEX["Attractive"]] = u[:, -1] < attractive_probability(attrs, stats)
    return attrs


def label_noise_ceiling(stats: dict | None = None) -> float:
    """Bayes-optimal accuracy on Attractive from perfect visible features: E[max(p, 1 - p)].

    Monte Carlo over CEILING_SAMPLES synthetic images with a fixed seed, so the number is stable.
    """
    stats = stats or load_stats()
    p = attractive_probability(sample_attributes(CEILING_SAMPLES, seed=0, stats=stats), stats)
    return float(np.maximum(p, 1.0 - p).mean())
