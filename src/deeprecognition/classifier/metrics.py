"""Multi-label binary metrics kept as integer counts, so DDP ranks add them with one all_reduce.

A prediction is `logit > 0` (sigmoid > 0.5). Every rate comes with its floor:
- per attribute, the majority baseline max(p, 1-p), p the positive rate of the evaluated samples:
  the best any constant answer can score on them, so a model below it has learned nothing;
- for exact match (all labels of a sample right, the study's "multi-label accuracy"), the score of
  answering a fixed majority vector. That cannot come from per-attribute counts (it depends on how
  labels co-occur) and a vector chosen from the evaluated samples is only known at the end, so the
  caller passes it up front: the training split's majority (`majority_vector` over the manifest's
  positive counts). It is the floor a model could reach from the training distribution alone;
  without it the baseline is reported as None.
Balanced accuracy is (TPR + TNR) / 2; for an attribute with no positives (or no negatives) among
the evaluated samples only the defined half exists, so it is TNR (or TPR) alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

# Per attribute, in this order; then the scalars below.
CONFUSION = ("tp", "tn", "fp", "fn")
SCALARS = ("exact", "samples", "majority_exact")


def majority_vector(positives: Sequence[int], samples: int) -> Tensor:
    """The majority answer per attribute (bool (T,)); a tie counts as negative."""
    return torch.tensor([2 * p > samples for p in positives], dtype=torch.bool)


class AttributeMetrics:
    def __init__(
        self, names: Sequence[str], majority: Tensor | None = None, device: torch.device | str = "cpu"
    ) -> None:
        """Counts live on `device` from the start: a rank with nothing to count still hands a
        tensor on its own device to the all_reduce (NCCL refuses CPU tensors)."""
        self.names = tuple(names)
        t = len(self.names)
        if majority is not None:
            majority = torch.as_tensor(majority).flatten().to(device) != 0
            if majority.numel() != t:
                raise ValueError(f"majority has {majority.numel()} entries for {t} attributes")
        self.majority = majority
        self._counts = torch.zeros(len(CONFUSION) * t + len(SCALARS), dtype=torch.int64, device=device)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Count one batch: logits (B, T), targets (B, T) in {0, 1} (uint8 or float)."""
        t = len(self.names)
        if logits.dim() != 2 or logits.shape[1] != t or targets.shape != logits.shape:
            raise ValueError(
                f"expected logits and targets of shape (B, {t}), got {tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        pred = logits.detach().to(self._counts.device) > 0  # (B, T)
        true = targets.detach().to(pred.device) != 0  # (B, T)
        if self.majority is not None:
            majority_exact = (true == self.majority).all(1).sum()
        else:
            majority_exact = pred.new_zeros((), dtype=torch.int64)
        self._counts += torch.cat(
            [
                (pred & true).sum(0),  # tp (T,)
                (~pred & ~true).sum(0),  # tn
                (pred & ~true).sum(0),  # fp
                (~pred & true).sum(0),  # fn
                torch.stack([(pred == true).all(1).sum(), torch.tensor(len(pred), device=pred.device), majority_exact]),
            ]
        )

    def counts(self) -> Tensor:
        """A copy of every count as one flat int64 tensor, for `dist.all_reduce(..., SUM)`."""
        return self._counts.clone()

    @classmethod
    def from_counts(cls, names: Sequence[str], counts: Tensor, majority: Tensor | None = None) -> AttributeMetrics:
        metrics = cls(names, majority)
        if counts.shape != metrics._counts.shape:
            raise ValueError(
                f"expected {metrics._counts.numel()} counts for {len(metrics.names)} attributes, got "
                f"{tuple(counts.shape)}"
            )
        metrics._counts = counts.to(torch.int64).clone()
        return metrics

    def merge(self, other: AttributeMetrics) -> None:
        """Add another shard's counts (same attributes and majority vector) to these."""
        same_majority = (self.majority is None) == (other.majority is None) and (
            self.majority is None or torch.equal(self.majority.cpu(), other.majority.cpu())
        )
        if self.names != other.names or not same_majority:
            raise ValueError("cannot merge metrics over different attributes or majority vectors")
        self._counts = self._counts + other._counts.to(self._counts.device)

    def compute(self) -> dict:
        """Plain floats (JSON-ready): per-attribute dicts keyed by name, their means, exact match."""
        t = len(self.names)
        flat = self._counts.cpu().tolist()
        tp, tn, fp, fn = (flat[i * t : (i + 1) * t] for i in range(len(CONFUSION)))
        exact, n, majority_exact = flat[len(CONFUSION) * t :]
        if n == 0:
            raise ValueError("no samples counted: call update() before compute()")
        accuracy, balanced, baseline = {}, {}, {}
        for i, name in enumerate(self.names):
            pos, neg = tp[i] + fn[i], tn[i] + fp[i]
            accuracy[name] = (tp[i] + tn[i]) / n
            rates = [hits / total for hits, total in ((tp[i], pos), (tn[i], neg)) if total]  # TPR, TNR where defined
            balanced[name] = sum(rates) / len(rates)
            baseline[name] = max(pos, neg) / n
        return {
            "samples": n,
            "accuracy": accuracy,
            "mean_accuracy": _mean(accuracy),
            "balanced_accuracy": balanced,
            "mean_balanced_accuracy": _mean(balanced),
            "majority_baseline": baseline,
            "mean_majority_baseline": _mean(baseline),
            "exact_match": exact / n,
            "exact_match_majority_baseline": majority_exact / n if self.majority is not None else None,
        }


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def format_report(metrics: dict, title: str) -> str:
    """A Markdown table of `compute()`'s result: every rate beside its majority baseline."""
    lines = [
        f"### {title}",
        "",
        f"{metrics['samples']:,} samples.",
        "",
        "| attribute | accuracy | majority baseline | balanced accuracy |",
        "|---|---:|---:|---:|",
    ]
    for name, acc in metrics["accuracy"].items():
        lines.append(
            f"| {name} | {_pct(acc)} | {_pct(metrics['majority_baseline'][name])} | "
            f"{_pct(metrics['balanced_accuracy'][name])} |"
        )
    lines.append(
        f"| **mean** | {_pct(metrics['mean_accuracy'])} | {_pct(metrics['mean_majority_baseline'])} "
        f"| {_pct(metrics['mean_balanced_accuracy'])} |"
    )
    baseline = metrics["exact_match_majority_baseline"]
    lines.append(
        f"| **exact match** (all {len(metrics['accuracy'])} right) | {_pct(metrics['exact_match'])} "
        f"| {_pct(baseline)}{'' if baseline is not None else ' (no majority vector given)'} | |"
    )
    return "\n".join(lines) + "\n"
