"""`deeprec evaluate CHECKPOINT --data DATA`: a trained classifier's metrics on one split, each
shown next to its majority-class floor. CHECKPOINT is local or s3://, a checkpoint or a run."""

from __future__ import annotations

from typing import Any

import torch

from deeprecognition.classifier.loop import evaluate, majority_of
from deeprecognition.classifier.trained import TrainedClassifier
from deeprecognition.errors import InputError
from deeprecognition.shards.loader import LoaderConfig, make_loader
from deeprecognition.shards.manifest import read_manifest


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "test", batch_size: int = 256) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    classifier = TrainedClassifier.load(checkpoint, device)
    attributes, cfg, folder = classifier.attributes, classifier.config, classifier.checkpoint
    manifest = read_manifest(data)
    if manifest.image.size != classifier.image_size:
        raise InputError(
            data,
            f"holds {manifest.image.size} px images; {folder} was trained on {classifier.image_size} px: evaluate on a dataset packed at that size",
        )
    loader = make_loader(
        LoaderConfig(data=data, split=split, targets=attributes, training=False, batch_size=batch_size, num_workers=2),
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
