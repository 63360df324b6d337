"""Evaluation of a classifier: `evaluate`, the metrics over a whole split (by every rank of a
training run together, or by one process), and `deeprec evaluate CHECKPOINT --data DATA`, a
trained classifier's metrics on one split, each shown next to its majority-class floor. CHECKPOINT
is local or s3://, a checkpoint or a run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from deeprecognition.classifier.metrics import AttributeMetrics, majority_vector
from deeprecognition.classifier.trained import TrainedClassifier
from deeprecognition.errors import InputError
from deeprecognition.runs.distributed import all_sum
from deeprecognition.shards.device_decode import images_on
from deeprecognition.shards.loader import Batch, make_loader
from deeprecognition.shards.manifest import Manifest, read_manifest


def majority_of(manifest: Manifest, attributes: tuple[str, ...]) -> torch.Tensor | None:
    """Each label's majority class in the train split: the floor every metric is shown with (the
    training loop stores it in every checkpoint); None for a dataset without training images."""
    shards = manifest.shards("train")
    if not shards:
        return None
    counts = torch.tensor([s.attribute_counts for s in shards]).sum(0)
    return majority_vector(counts[[manifest.attributes.index(a) for a in attributes]], manifest.splits["train"].samples)


def evaluate(
    model: nn.Module,
    norm: nn.Module,
    loader: Iterable[Batch],
    attributes: tuple[str, ...],
    majority: torch.Tensor | None,
    device: torch.device,
) -> dict[str, Any]:
    """Metrics over the whole split, summed over every rank: every rank calls it, with or without
    batches of its own. `model` is the plain module, never DDP's wrapper, whose first forward after
    training broadcasts buffers from rank 0, a collective that a rank without batches never joins."""
    metrics = AttributeMetrics(attributes, majority, device)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            logits = model(norm(images_on(batch.images, device)))
            metrics.update(logits.float(), batch.targets.to(device, non_blocking=True))
    return AttributeMetrics.from_counts(attributes, all_sum(metrics.counts()).cpu(), majority).compute()


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "test", batch_size: int = 256) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifier = TrainedClassifier.load(checkpoint, device)
    attributes, cfg, folder = classifier.attributes, classifier.config, classifier.checkpoint
    manifest = read_manifest(data)
    if manifest.image.size != classifier.image_size:
        raise InputError(
            data,
            f"holds {manifest.image.size} px images; {folder} was trained on {classifier.image_size} px: "
            "evaluate on a dataset packed at that size",
        )
    loader = make_loader(
        cfg.data.loader(
            split,
            attributes,
            cfg.optim.seed,
            data=data,
            training=False,
            batch_size=batch_size,
            num_workers=2,
            decode=cfg.data.decode if device.type == "cuda" else "cpu",
        ),
        rank=0,
        world_size=1,
    )
    # The floor belongs to the model: its own training split's majority answer, whatever DATA holds.
    majority = classifier.majority if classifier.majority is not None else majority_of(manifest, attributes)
    result = evaluate(classifier.model, classifier.norm, loader, attributes, majority, device)
    return {
        "task": cfg.data.task,
        "checkpoint": folder,
        "split": split,
        "attributes": result["accuracy"],
        "mean_accuracy": result["mean_accuracy"],
        "exact_match": result["exact_match"],
        "balanced_accuracy": result["mean_balanced_accuracy"],
        "samples": result["samples"],
        "majority_baseline": result["majority_baseline"],
        "mean_majority_baseline": result["mean_majority_baseline"],
        "exact_match_majority_baseline": result["exact_match_majority_baseline"],
        "metrics": result,
    }
