"""`deeprec train classifier|gan` and each trial of `deeprec tune`: a Ray Train TorchTrainer (Train V2)
around a per-worker loop; `train` is the command's body, with the one line it ends on."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch

from deeprecognition import storage
from deeprecognition.classifier.loop import train_loop_per_worker
from deeprecognition.config import STANDARD_INCEPTION, ClassifierConfig, GanConfig, to_dict
from deeprecognition.runs.catalog import ray_checkpoint_config
from deeprecognition.runs.placement import (
    Placement,
    check_gpu_type,
    plan,
    ray_start_timeout,
    scaling_config,
    wait_for_capacity,
)
from deeprecognition.shards.device_decode import check_decode
from deeprecognition.shards.manifest import read_manifest

if TYPE_CHECKING:
    from ray.train import Result, UserCallback
    from ray.train.torch import TorchTrainer

T = TypeVar("T", ClassifierConfig, GanConfig)
# The metrics of a finished run that `deeprec train` reports, the classifier's and the GAN's.
SUMMARY_METRICS = ("epoch", "iteration", "val/mean_accuracy", "fid", "kid")


def check_before_workers(cfg: ClassifierConfig | GanConfig) -> None:
    """What would otherwise fail inside every worker after a 30 s start: fail on the driver."""
    cfg.validate()
    check_decode(cfg.data.decode, read_manifest(cfg.data.data).image.encoding)  # gpu: JPEG datasets only
    if isinstance(cfg, ClassifierConfig) and cfg.model.name == "resnet50":
        from deeprecognition.classifier.transfer import load_backbone_weights

        load_backbone_weights(cfg.model.weights)
    if isinstance(cfg, GanConfig):
        _check_gan_inputs(cfg)


def _check_gan_inputs(cfg: GanConfig) -> None:
    """The classifiers and Inception weights a GAN run names must load, before workers start."""
    from deeprecognition.classifier.trained import TrainedClassifier
    from deeprecognition.gan.metrics import inception_extractor

    if cfg.data.where_classifier:
        TrainedClassifier.load(cfg.data.where_classifier).attribute_index(cfg.data.classifier_attribute)
    if cfg.eval.classifier:
        TrainedClassifier.load(cfg.eval.classifier)
    if cfg.schedule.eval_every and cfg.eval.features == "inception":  # converts the standard weights once, here
        inception_extractor(cfg.eval.inception_weights, torch.device("cpu"))


def ray_storage_path(uri: str) -> str:
    """Ray wants an absolute local path or a URI; pyarrow reads AWS_ENDPOINT_URL for s3://."""
    return uri if storage.is_remote(uri) else os.path.abspath(storage.local_path(uri))


def absolute_paths(cfg: T) -> T:
    """Ray's workers run in their own working directory: a relative local path must not reach them."""
    data = dataclasses.replace(cfg.data, data=ray_storage_path(cfg.data.data))
    if isinstance(cfg, GanConfig):
        data = dataclasses.replace(data, where_classifier=_absolute(cfg.data.where_classifier))
        evaluation = dataclasses.replace(
            cfg.eval,
            classifier=_absolute(cfg.eval.classifier),
            inception_weights=cfg.eval.inception_weights
            if cfg.eval.inception_weights == STANDARD_INCEPTION
            else _absolute(cfg.eval.inception_weights),
        )
        return dataclasses.replace(cfg, data=data, eval=evaluation, storage=ray_storage_path(cfg.storage))
    return dataclasses.replace(cfg, data=data, storage=ray_storage_path(cfg.storage))


def _absolute(uri: str) -> str:
    return ray_storage_path(uri) if uri else uri


def build_trainer(
    cfg: ClassifierConfig | GanConfig, placement: Placement, callbacks: Sequence[UserCallback] = ()
) -> TorchTrainer:
    """The TorchTrainer of a checked config with absolute paths, its run at `cfg.storage/cfg.name`,
    its workers placed as `placement` says. Checkpoints are kept by catalog's ranking
    (catalog.ray_checkpoint_config). `callbacks` see every report (a Tune sweep passes
    TuneReportCallback to carry the metrics to its scheduler)."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from deeprecognition.raycluster import train_logging_config, worker_runtime_env

    if isinstance(cfg, GanConfig):
        from deeprecognition.gan.loop import train_loop_per_worker as loop
    else:
        loop = train_loop_per_worker
    return TorchTrainer(
        loop,
        train_loop_config=to_dict(cfg),
        # A collective that waits longer fails the run (and Ray restarts it from its checkpoint)
        # instead of holding every GPU of the job until someone notices.
        torch_config=TorchConfig(timeout_s=cfg.scale.collective_timeout_s),
        scaling_config=scaling_config(cfg, placement),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=ray_storage_path(cfg.storage),
            # Waiting for capacity spends none of the controller's failure budget: the driver waits
            # first (fit), and Ray's own wait is as long as ours (placement.ray_start_timeout).
            failure_config=FailureConfig(max_failures=cfg.scale.max_failures, controller_failure_limit=3),
            checkpoint_config=ray_checkpoint_config(cfg),
            worker_runtime_env=worker_runtime_env(),
            logging_config=train_logging_config(),
            callbacks=list(callbacks),
        ),
    )


def fit(cfg: ClassifierConfig | GanConfig, callbacks: Sequence[UserCallback] = ()) -> Result:
    """Wait (up to scale.start_timeout_s) until the connected cluster can place the run's workers,
    then fit: what `deeprec train` and every sweep trial do."""
    check_gpu_type(cfg.scale.gpu_type)
    placement = plan(cfg)
    wait_for_capacity(placement, cfg.scale.start_timeout_s)
    with ray_start_timeout(None if cfg.scale.elastic_min else cfg.scale.start_timeout_s):
        return build_trainer(cfg, placement, callbacks).fit()


def run(cfg: ClassifierConfig | GanConfig) -> Result:
    """Fit the classifier or the GAN on the Ray cluster (RAY_ADDRESS, or a local one); returns
    Ray's Result."""
    from deeprecognition.raycluster import ensure_ray

    cfg = absolute_paths(cfg)
    check_before_workers(cfg)
    ensure_ray()
    return fit(cfg)


@dataclass(frozen=True)
class TrainOutcome:
    """How a `deeprec train` run ended, in the line the command prints."""

    ok: bool
    line: str


def train(cfg: ClassifierConfig | GanConfig) -> TrainOutcome:
    """`deeprec train`: run, then say what it reached and where its latest checkpoint is, or, when
    the workers failed past scale.max_failures, each rank's error."""
    from ray.train import TrainingFailedError

    try:
        result = run(cfg)
    except TrainingFailedError as err:
        return TrainOutcome(False, f"the run failed: {failure_summary(err)}")
    shown = {k: v for k, v in (result.metrics or {}).items() if k in SUMMARY_METRICS}
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
    latest = result.checkpoint.path if result.checkpoint else None
    return TrainOutcome(True, f"run {cfg.name} finished ({summary}): latest checkpoint {latest}")


def failure_summary(err: Exception) -> str:
    """The workers' own errors, one line each, instead of Ray's wrapped tracebacks."""
    failures = getattr(err, "worker_failures", None) or {}
    lines = [f"rank {rank}: {str(exc).strip().splitlines()[-1]}" for rank, exc in sorted(failures.items())]
    return "; ".join(lines) or str(err).strip().splitlines()[-1]
