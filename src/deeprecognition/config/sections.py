"""The config sections both tasks share: where a run lives, how it reads its dataset (and the one
builder of its LoaderConfigs), and how it scales."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deeprecognition.config.fields import check_fields, option
from deeprecognition.shards.cache import CACHE_SETTINGS, DEFAULT_CAP_GB
from deeprecognition.shards.choices import NEEDS_GPU, Decode
from deeprecognition.shards.sampling import Sampling

if TYPE_CHECKING:  # the loader's DataLoader machinery is imported only where a run builds its LoaderConfig
    from deeprecognition.shards.loader import LoaderConfig


@dataclass(kw_only=True)
class RunSettings:
    """Where a run lives, for both tasks."""

    storage: str = option("shards/runs", "where runs live: local folder or s3://bucket/prefix", flag=True)
    name: str = option("run", "run name; the same storage and name resume the run", flag=True)
    resume_from: str = option(
        "",
        "a checkpoint folder (local or s3://) the run starts from while it has none of its own: weights, "
        "optimisers, counters, then this config's optimiser settings (a PBT exploit's donor)",
    )


@dataclass(kw_only=True)
class LoaderSettings:
    """How a run reads its dataset: the fields both tasks' data configs share, and the one place a
    run's LoaderConfig is built from them."""

    data: str = option("shards/celeba-128", "a packed dataset: local folder or s3://", flag=True)
    batch_size: int = option(64, "per worker", flag=True)
    loader_workers: int = option(2, "DataLoader processes per training worker")
    sampling: Sampling = option(
        "epoch",
        "epoch: each epoch a seeded permutation of the train split, every image once (a few repeats even "
        "out the ranks); resample: shards drawn with replacement (~64% of images per epoch)",
    )
    cache: str = option(
        "auto",
        "where each node keeps the shards of an s3:// dataset, fetched once: auto ($DEEPREC_CACHE_DIR, else "
        "~/.cache/deeprecognition/shards), an absolute folder, or off (read from S3 each time)",
    )
    cache_gb: float = option(DEFAULT_CAP_GB, "the cache's cap; it never takes more than half the free disk either")
    decode: Decode = option("cpu", "cpu: JPEGs decoded by the loader's workers; gpu: on the training GPU (nvJPEG)")

    def loader(self, split: str, targets: tuple[str, ...], seed: int, **changes: Any) -> LoaderConfig:
        """The LoaderConfig this run reads `split` with; `changes` are the few fields a pass sets
        itself (an evaluation's batch size, a reference set read once in order)."""
        from deeprecognition.shards.loader import LoaderConfig

        config = LoaderConfig(
            data=self.data,
            split=split,
            targets=targets,
            batch_size=self.batch_size,
            sampling=self.sampling,
            num_workers=self.loader_workers,
            seed=seed,
            cache=self.cache,
            cache_gb=self.cache_gb,
            decode=self.decode,
        )
        return dataclasses.replace(config, **changes)


def check_cache_and_decode(data: LoaderSettings, gpu: bool) -> None:
    """data.cache, data.cache_gb and data.decode, which both data configs have."""
    if data.cache not in CACHE_SETTINGS and not os.path.isabs(data.cache):
        raise ValueError(f"data.cache must be auto, off or an absolute folder (each node's own), got {data.cache!r}")
    check_fields(positives=(("data.cache_gb", data.cache_gb),))
    if data.decode == "gpu" and not gpu:
        raise ValueError(f"{NEEDS_GPU}; this run has scale.gpu=false: add --gpu, or drop data.decode=gpu")


@dataclass(kw_only=True)
class ScaleConfig:
    num_workers: int = option(1, "Ray Train workers (DDP ranks)", flag=True)
    gpu: bool = option(False, "one GPU per worker", flag=True)
    max_failures: int = option(0, "worker failures survived by restarting from the latest checkpoint", flag=True)
    elastic_min: int | None = option(
        None, "keep training on as few as MIN workers after losing some", flag="--elastic", metavar="MIN"
    )
    keep_checkpoints: int = option(2, "the best N by the validation metric are kept (and the latest)")
    preemption_check_every: int = option(
        50,
        "steps (classifier) or iterations (GAN) between checks for a node drain, each a Ray collective of ~1-7 ms; "
        '0: never (README "Reliability")',
    )
    # Above the longest stretch one rank works alone (a synchronous final checkpoint of a few
    # hundred MB), far below NCCL's 30 minutes.
    collective_timeout_s: int = option(
        600,
        "a rank that waits longer in one collective fails the run instead of hanging it (a rank that died, "
        "or ranks that disagree on which collective comes next)",
    )
    start_timeout_s: int = option(
        1800,
        "wait this long for the cluster to make room for the workers (an autoscaler boots GPU nodes in minutes)",
        flag="--start-timeout",
        metavar="SECONDS",
    )
    gpu_type: str = option(
        "", "only GPUs of this type (Ray's accelerator_type: H100, A100, L40S, ...)", flag=True, metavar="NAME"
    )
    spread: bool = option(False, "workers on different nodes where possible, instead of packing onto one", flag=True)

    def positives(self) -> tuple[tuple[str, float | None], ...]:
        return (
            ("scale.num_workers", self.num_workers),
            ("scale.elastic_min", self.elastic_min),
            ("scale.keep_checkpoints", self.keep_checkpoints),
            ("scale.collective_timeout_s", self.collective_timeout_s),
            ("scale.start_timeout_s", self.start_timeout_s),
        )

    def check(self) -> None:
        if self.gpu_type and not self.gpu:
            raise ValueError(f"scale.gpu_type={self.gpu_type} needs scale.gpu=true (--gpu)")

    def non_negatives(self) -> tuple[tuple[str, float], ...]:
        return (
            ("scale.max_failures", self.max_failures),
            ("scale.preemption_check_every", self.preemption_check_every),
        )
