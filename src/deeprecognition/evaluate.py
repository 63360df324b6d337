"""`deeprec evaluate CHECKPOINT --data DATA`: a trained classifier's metrics on one split, each
shown next to its majority-class floor. CHECKPOINT is local or s3://, a checkpoint or a run."""

from __future__ import annotations

from typing import Any

import torch

from deeprecognition.checkpoint import best_checkpoint, load_state
from deeprecognition.config import ClassifierConfig, apply_overrides, from_dict
from deeprecognition.loops.classifier import InputNorm, build_model, evaluate, majority_of
from deeprecognition.shards.loader import LoaderConfig, make_loader
from deeprecognition.shards.manifest import read_manifest


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "test", batch_size: int = 256) -> dict[str, Any]:
    folder = best_checkpoint(checkpoint)
    state = load_state(folder)
    # The weights come from the checkpoint: never look for ImageNet weights here.
    cfg = apply_overrides(from_dict(ClassifierConfig, state["config"]), ["model.weights=none"])
    attributes = tuple(state["attributes"])
    manifest = read_manifest(data)
    model = build_model(cfg, len(attributes), manifest.image.size)
    model.load_state_dict(state["model"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = make_loader(LoaderConfig(data=data, split=split, targets=attributes, training=False, batch_size=batch_size, num_workers=2), rank=0, world_size=1)
    result = evaluate(model.to(device), InputNorm(cfg.model.name).to(device), loader, attributes, majority_of(manifest, attributes), device)
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
