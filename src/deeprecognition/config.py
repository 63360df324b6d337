"""Typed run configs, the study's experiments as presets, and `--a.b=v` overrides checked by type.

A config crosses into Ray as a plain dict (`to_dict`) and is rebuilt, with every field checked, on
the first line of the worker loop (`from_dict`), so a typo fails on the driver, not in a worker.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES, attribute_index
from deeprecognition.shards.cache import CACHE_SETTINGS, DEFAULT_CAP_GB
from deeprecognition.shards.device_decode import DECODES, NEEDS_GPU
from deeprecognition.shards.sampling import SAMPLING

T = TypeVar("T")

TASKS: dict[str, tuple[str, ...]] = {
    "attractive": ("Attractive",),
    "paper4": ("Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open"),
    "all40": CELEBA_ATTRIBUTES,
}
MODELS = ("cnn", "resnet50")


def task_attributes(task: str) -> tuple[str, ...]:
    """A named task, or a comma list of attribute names (each checked)."""
    if task in TASKS:
        return TASKS[task]
    names = tuple(n.strip() for n in task.split(",") if n.strip())
    if not names:
        raise ValueError(f"data.task is empty: use {', '.join(TASKS)} or a comma list of attribute names")
    for name in names:
        attribute_index(name)
    return names


def check_fields(
    choices: tuple[tuple[str, str, tuple[str, ...]], ...],
    positives: tuple[tuple[str, float | None], ...],
    non_negatives: tuple[tuple[str, float], ...] = (),
) -> None:
    """Refuse, by dotted field name, a value outside its choices, a count or rate that must be
    positive and is not (None passes: "not set"), or a negative one where 0 means "off"."""
    for name, value, allowed in choices:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    for name, count in positives:
        if count is not None and count <= 0:
            raise ValueError(f"{name} must be positive, got {count}")
    for name, count in non_negatives:
        if count < 0:
            raise ValueError(f"{name} must be 0 (off) or more, got {count}")


def check_cache_and_decode(data: DataConfig | GanDataConfig, gpu: bool) -> None:
    """data.cache, data.cache_gb and data.decode, which both data configs have."""
    if data.cache not in CACHE_SETTINGS and not os.path.isabs(data.cache):
        raise ValueError(f"data.cache must be auto, off or an absolute folder (each node's own), got {data.cache!r}")
    check_fields(choices=(("data.decode", data.decode, DECODES),), positives=(("data.cache_gb", data.cache_gb),))
    if data.decode == "gpu" and not gpu:
        raise ValueError(f"{NEEDS_GPU}; this run has scale.gpu=false: add --gpu, or drop data.decode=gpu")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "cnn"  # cnn | resnet50
    layers: int = 3  # cnn: conv blocks, 1..4 (32, 64, 128, 256 filters)
    dense: int = 128  # cnn: units of the one dense layer
    freeze: str = "paper"  # resnet50: all | none | paper (the study's first 45 Keras layers)
    weights: str = "imagenet"  # resnet50: imagenet (torch hub cache) | PATH | s3://... | none
    head_width: int = 512  # resnet50: first of the head's three dense layers
    cache_features: bool = True  # resnet50 with freeze=all: backbone once per image, head on the cache


@dataclass(kw_only=True)
class DataConfig:
    data: str = "shards/celeba-128"  # a packed dataset: local folder or s3://
    task: str = "attractive"  # attractive | paper4 | all40 | comma list of attributes
    batch_size: int = 64  # per worker
    loader_workers: int = 2  # DataLoader processes per training worker
    # epoch: each epoch a seeded permutation of the train split, every image once (a few repeats
    # even out the ranks); resample: shards drawn with replacement (~64% of images per epoch)
    sampling: str = "epoch"
    # An s3:// dataset's shards are fetched once per node into this cache (shards/cache.py): auto =
    # $DEEPREC_CACHE_DIR, else ~/.cache/deeprecognition/shards, on each node; off: read from S3 each time
    cache: str = "auto"
    cache_gb: float = DEFAULT_CAP_GB  # the cache's cap; it never takes more than half the free disk either
    decode: str = "cpu"  # JPEGs decoded by the loader's CPU workers, or gpu: on the training GPU (nvJPEG)


@dataclass(kw_only=True)
class OptimConfig:
    epochs: int = 10
    lr: float = 1e-3  # Adam
    weight_decay: float = 0.0
    seed: int = 0
    steps_per_epoch: int | None = None  # cap, for smoke runs; None: a full epoch of the train split
    compile: bool = False  # torch.compile the model (GPU)
    checkpoint_every: int = (
        1  # epochs between checkpoints; the last epoch's and preemption checkpoints are always written
    )


@dataclass(kw_only=True)
class ScaleConfig:
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    gpu: bool = False
    max_failures: int = 0  # worker failures survived by restarting from the latest checkpoint
    elastic_min: int | None = None  # continue on as few as this many workers after losing some
    keep_checkpoints: int = 2  # best N by validation metric (plus the latest)
    # Steps (classifier) or iterations (GAN) between checks for a node drain (a preemption notice),
    # each a Ray collective of ~1-7 ms; 0: never check. README "Reliability" has the arithmetic.
    preemption_check_every: int = 50
    # A rank that waits longer than this in one collective fails the run instead of hanging it
    # (a rank that died, or ranks that disagree on which collective comes next). Above the longest
    # stretch one rank works alone (a synchronous final checkpoint of a few hundred MB), far below
    # NCCL's 30 minutes.
    collective_timeout_s: int = 600
    # How long a run (or a sweep trial) waits for the cluster to make room for its workers: an
    # autoscaler boots GPU nodes in minutes (placement.py).
    start_timeout_s: int = 1800
    gpu_type: str = ""  # Ray's accelerator_type of the workers' GPUs (H100, A100, L40S, ...); "" any
    spread: bool = False  # one worker per node where possible, instead of packing a run that fits onto one node

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


@dataclass(kw_only=True)
class ClassifierConfig:
    storage: str = "shards/runs"  # where runs live: local folder or s3://
    name: str = "classifier"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def attributes(self) -> tuple[str, ...]:
        return task_attributes(self.data.task)

    def validate(self) -> ClassifierConfig:
        """Everything that can be checked before a worker starts."""
        self.attributes()
        if self.model.name not in MODELS:
            raise ValueError(f"model.name must be one of {', '.join(MODELS)}, got {self.model.name!r}")
        if not 1 <= self.model.layers <= 4:
            raise ValueError(f"model.layers must be 1..4 (the study's conv blocks), got {self.model.layers}")
        check_fields(
            choices=(
                ("model.freeze", self.model.freeze, ("all", "none", "paper")),
                ("data.sampling", self.data.sampling, SAMPLING),
            ),
            positives=(
                ("optim.epochs", self.optim.epochs),
                ("optim.lr", self.optim.lr),
                ("optim.steps_per_epoch", self.optim.steps_per_epoch),
                ("optim.checkpoint_every", self.optim.checkpoint_every),
                ("data.batch_size", self.data.batch_size),
                ("model.dense", self.model.dense),
                ("model.head_width", self.model.head_width),
                *self.scale.positives(),
            ),
            non_negatives=(
                ("optim.weight_decay", self.optim.weight_decay),
                ("data.loader_workers", self.data.loader_workers),
                *self.scale.non_negatives(),
            ),
        )
        check_cache_and_decode(self.data, self.scale.gpu)
        self.scale.check()
        return self


# ----- the study's experiments ---------------------------------------------------------------


def paper_cnn() -> ClassifierConfig:
    """The from-scratch CNN on Attractive (the study's runs trained Black_Hair by mistake); the
    study swept layers 1..4 by hand: `tune_configs/cnn_layers.yaml` runs that sweep."""
    return ClassifierConfig(
        name="paper-cnn",
        model=ModelConfig(name="cnn", layers=3),
        data=DataConfig(task="attractive"),
        optim=OptimConfig(epochs=10, lr=1e-3),
    )


def paper_multilabel() -> ClassifierConfig:
    """The 4-label CNN: one sigmoid per label with BCE (the study's softmax over 4 independent
    labels could not express two labels at once)."""
    return ClassifierConfig(
        name="paper-multilabel",
        model=ModelConfig(name="cnn", layers=3),
        data=DataConfig(task="paper4"),
        optim=OptimConfig(epochs=10, lr=1e-3),
    )


def paper_transfer() -> ClassifierConfig:
    """ResNet50 from ImageNet weights, backbone frozen as the study's first 45 Keras layers."""
    return ClassifierConfig(
        name="paper-transfer",
        model=ModelConfig(name="resnet50", freeze="paper", weights="imagenet"),
        data=DataConfig(task="attractive"),
        optim=OptimConfig(epochs=10, lr=1e-4),
    )


PRESETS: dict[str, Callable[[], ClassifierConfig]] = {
    "paper-cnn": paper_cnn,
    "paper-multilabel": paper_multilabel,
    "paper-transfer": paper_transfer,
}


def preset(name: str) -> ClassifierConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----- dicts and overrides --------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """value as `kind` (str from the command line, or a JSON value), or a ValueError naming the field."""
    options = (
        typing.get_args(kind)
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union
        else (kind,)
    )
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options):
        if type(None) in options:
            return None
        raise ValueError(f"{where} cannot be empty")
    for option in (o for o in options if o is not type(None)):
        if option is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif option is int and not isinstance(value, bool):
            if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
                return int(value)
        elif option is float and not isinstance(value, bool):
            try:
                return float(value)
            except (TypeError, ValueError):
                pass
        elif option is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{where} must be {names}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Rebuild a (nested) config dataclass, refusing unknown fields and wrong types by name."""
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - known
    if unknown:
        raise ValueError(
            f"unknown config field(s) {', '.join(prefix + u for u in sorted(unknown))}; known: {', '.join(prefix + k for k in sorted(known))}"
        )
    kwargs = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{name} must be a mapping of its fields")
            kwargs[name] = from_dict(kind, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, kind, prefix + name)
    return cls(**kwargs)


# Fields that configs of older checkpoints may hold and this release no longer has (the loader's
# shuffle buffer went with epoch permutations): dropped when such a checkpoint is loaded.
RETIRED_FIELDS = ("data.shuffle_buffer",)


def from_checkpoint(cls: type[T], data: dict[str, Any]) -> T:
    """A checkpoint's config: from_dict, less the retired fields an older release wrote."""
    data = copy.deepcopy(data)
    for dotted in RETIRED_FIELDS:
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return from_dict(cls, data)


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """["model.layers=4", "optim.lr=3e-4"] applied to a copy of cfg, each checked by field type."""
    data = to_dict(cfg)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: write FIELD=VALUE, e.g. model.layers=4")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: {part!r} is not a config section")
            node = node[part]
        if leaf not in node:
            raise ValueError(f"override {item!r}: unknown field {key!r}")
        node[leaf] = value
    return from_dict(type(cfg), data)


# ----- the GAN --------------------------------------------------------------------------------


@dataclass(kw_only=True)
class GanModelConfig:
    arch: str = "paper"  # paper (the study's Keras model) | dcgan
    latent: int = 32
    loss: str = "bce"  # bce (non-saturating) | hinge
    ema_decay: float = 0.999  # the EMA generator draws mosaics (dcgan)
    width: int = 64  # dcgan: channels of the last generator / first discriminator block


@dataclass(kw_only=True)
class GanDataConfig:
    data: str = "shards/celeba-128"
    where: str = "Attractive=1"  # the study trained on "Attractive" faces only
    batch_size: int = 16  # per worker
    loader_workers: int = 2
    sampling: str = "epoch"  # as DataConfig.sampling
    cache: str = "auto"  # as DataConfig.cache
    cache_gb: float = DEFAULT_CAP_GB
    decode: str = "cpu"  # as DataConfig.decode
    # The study's "a network decides which faces are attractive": keep the real faces that this
    # trained classifier (checkpoint or run folder) scores >= threshold on classifier_attribute.
    where_classifier: str = ""
    threshold: float = 0.5
    classifier_attribute: str = ""  # default: the classifier's only attribute


@dataclass(kw_only=True)
class GanOptimConfig:
    iterations: int = 1000
    optimizer: str = "rmsprop"  # rmsprop | adam
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    beta1: float = 0.5  # adam
    beta2: float = 0.999  # adam
    clip: float = 1.0  # element-wise gradient clip, Keras' clipvalue (the study's 1.0); 0 = off
    label_noise: float = 0.05
    seed: int = 0


@dataclass(kw_only=True)
class GanScheduleConfig:
    # Every N iterations; 0 = only at the last iteration (mosaics, checkpoints, log lines) or never
    # (evaluation). Preemption notices checkpoint whatever these say.
    mosaic_every: int = 50
    checkpoint_every: int = 200
    log_every: int = 10
    eval_every: int = 0  # FID/KID and attribute rates


@dataclass(kw_only=True)
class GanEvalConfig:
    classifier: str = ""  # a trained classifier: attribute rates, and FID features without Inception
    inception_weights: str = ""  # FID Inception weights file (pt_inception-2015-12-05-*.pth) or s3://
    samples: int = 1000  # generated and real faces per evaluation


@dataclass(kw_only=True)
class GanConfig:
    storage: str = "shards/runs"
    name: str = "gan"
    model: GanModelConfig = field(default_factory=GanModelConfig)
    data: GanDataConfig = field(default_factory=GanDataConfig)
    optim: GanOptimConfig = field(default_factory=GanOptimConfig)
    schedule: GanScheduleConfig = field(default_factory=GanScheduleConfig)
    eval: GanEvalConfig = field(default_factory=GanEvalConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def validate(self) -> GanConfig:
        from deeprecognition.shards.loader import parse_where

        parse_where(self.data.where)
        sched, optim = self.schedule, self.optim
        check_fields(
            choices=(
                ("model.arch", self.model.arch, ("paper", "dcgan")),
                ("model.loss", self.model.loss, ("bce", "hinge")),
                ("optim.optimizer", optim.optimizer, ("rmsprop", "adam")),
                ("data.sampling", self.data.sampling, SAMPLING),
            ),
            positives=(
                ("optim.iterations", optim.iterations),
                ("optim.lr_g", optim.lr_g),
                ("optim.lr_d", optim.lr_d),
                ("data.batch_size", self.data.batch_size),
                ("model.latent", self.model.latent),
                ("model.width", self.model.width),
                ("eval.samples", self.eval.samples),
                *self.scale.positives(),
            ),
            non_negatives=(
                ("schedule.mosaic_every", sched.mosaic_every),
                ("schedule.checkpoint_every", sched.checkpoint_every),
                ("schedule.log_every", sched.log_every),
                ("schedule.eval_every", sched.eval_every),
                ("optim.clip", optim.clip),
                ("optim.label_noise", optim.label_noise),
                ("data.loader_workers", self.data.loader_workers),
                *self.scale.non_negatives(),
            ),
        )
        check_cache_and_decode(self.data, self.scale.gpu)
        if self.eval.samples < 2:
            raise ValueError(f"eval.samples must be at least 2 (FID needs a covariance), got {self.eval.samples}")
        if not 0 < self.data.threshold < 1:
            raise ValueError(f"data.threshold must be between 0 and 1, got {self.data.threshold}")
        if self.schedule.eval_every and not (self.eval.classifier or self.eval.inception_weights):
            raise ValueError(
                "schedule.eval_every needs eval.classifier (a trained classifier checkpoint) or eval.inception_weights"
            )
        self.scale.check()
        return self


def paper_gan() -> GanConfig:
    """The study's GAN: latent 32, batch 16, RMSprop 1e-4 with clipping, label noise 0.05, trained on
    Attractive faces; with real images scaled to [-1, 1] (the original fed [0, 1] to a tanh GAN)."""
    return GanConfig(name="paper-gan")


def modern_dcgan() -> GanConfig:
    """A DCGAN with spectral norm, hinge loss, Adam(2e-4, 0.0/0.9) and an EMA generator."""
    return GanConfig(
        name="dcgan",
        model=GanModelConfig(arch="dcgan", latent=128, loss="hinge"),
        data=GanDataConfig(batch_size=64),
        optim=GanOptimConfig(optimizer="adam", lr_g=2e-4, lr_d=2e-4, beta1=0.0, beta2=0.9, clip=0.0, label_noise=0.0),
    )


GAN_PRESETS: dict[str, Callable[[], GanConfig]] = {"paper-gan": paper_gan, "dcgan": modern_dcgan}
