"""`deeprec train classifier|gan`: a Ray Train TorchTrainer (Train V2) around a per-worker loop."""

from __future__ import annotations

import dataclasses
import os
from typing import TypeVar

from deeprecognition import storage
from deeprecognition.config import ClassifierConfig, GanConfig, to_dict
from deeprecognition.loops.classifier import train_loop_per_worker
from deeprecognition.shards.manifest import read_manifest

T = TypeVar("T", ClassifierConfig, GanConfig)


def check_before_workers(cfg: ClassifierConfig | GanConfig) -> None:
    """What would otherwise fail inside every worker after a 30 s start: fail on the driver."""
    cfg.validate()
    read_manifest(cfg.data.data)
    if isinstance(cfg, ClassifierConfig) and cfg.model.name == "resnet50":
        from deeprecognition.models.transfer import load_backbone_weights

        load_backbone_weights(cfg.model.weights)


def ray_storage_path(uri: str) -> str:
    """Ray wants an absolute local path or a URI; pyarrow reads AWS_ENDPOINT_URL for s3://."""
    return uri if storage.is_remote(uri) else os.path.abspath(storage.local_path(uri))


def absolute_paths(cfg: T) -> T:
    """Ray's workers run in their own working directory: a relative local path must not reach them."""
    data = dataclasses.replace(cfg.data, data=ray_storage_path(cfg.data.data))
    return dataclasses.replace(cfg, data=data, storage=ray_storage_path(cfg.storage))


def run(cfg: ClassifierConfig | GanConfig):
    """Fit the classifier or the GAN on the Ray cluster (RAY_ADDRESS, or a local one); returns
    Ray's Result. Classifier checkpoints are kept by validation accuracy, GAN ones by recency."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from deeprecognition.raycluster import ensure_ray, worker_runtime_env

    cfg = absolute_paths(cfg)
    check_before_workers(cfg)
    ensure_ray()
    scale = cfg.scale
    workers = (scale.elastic_min, scale.num_workers) if scale.elastic_min else scale.num_workers
    if isinstance(cfg, GanConfig):
        from deeprecognition.loops.gan import train_loop_per_worker as loop

        keep = CheckpointConfig(num_to_keep=scale.keep_checkpoints)
    else:
        loop = train_loop_per_worker
        keep = CheckpointConfig(num_to_keep=scale.keep_checkpoints, checkpoint_score_attribute="val/mean_accuracy", checkpoint_score_order="max")
    trainer = TorchTrainer(
        loop,
        train_loop_config=to_dict(cfg),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=scale.gpu),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=ray_storage_path(cfg.storage),
            failure_config=FailureConfig(max_failures=scale.max_failures, controller_failure_limit=3),
            checkpoint_config=keep,
            worker_runtime_env=worker_runtime_env(),
        ),
    )
    return trainer.fit()
