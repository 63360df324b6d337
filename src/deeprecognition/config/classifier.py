"""The classifier's config and the study's classifier experiments as presets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES, attribute_index
from deeprecognition.config.fields import check_fields, option, with_default
from deeprecognition.config.sections import LoaderSettings, RunSettings, ScaleConfig, check_cache_and_decode

TASKS: dict[str, tuple[str, ...]] = {
    "attractive": ("Attractive",),
    "paper4": ("Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open"),
    "all40": CELEBA_ATTRIBUTES,
    # The 13 attributes STGAN and AttGAN edit, and their judge classifies.
    "stgan13": (
        "Bald",
        "Bangs",
        "Black_Hair",
        "Blond_Hair",
        "Brown_Hair",
        "Bushy_Eyebrows",
        "Eyeglasses",
        "Male",
        "Mouth_Slightly_Open",
        "Mustache",
        "No_Beard",
        "Pale_Skin",
        "Young",
    ),
}
# The choice fields' values; the modules that act on them read their tuples from these.
ModelName = Literal["cnn", "resnet50"]
Freeze = Literal["all", "none", "paper"]


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


@dataclass(kw_only=True)
class ModelConfig:
    name: ModelName = option("cnn", "cnn: trained from scratch; resnet50: ImageNet transfer", flag="--model")
    layers: int = option(3, "cnn: conv blocks, 1..4 (32, 64, 128, 256 filters)", flag=True)
    dense: int = option(128, "cnn: units of the one dense layer")
    freeze: Freeze = option("paper", "resnet50: backbone frozen; paper: the study's first 45 Keras layers", flag=True)
    weights: str = option("imagenet", "resnet50: imagenet (torch hub cache) | PATH | s3://... | none", flag=True)
    head_width: int = option(512, "resnet50: first of the head's three dense layers")
    cache_features: bool = option(True, "resnet50 with freeze=all: backbone once per image, head on the cache")


@dataclass(kw_only=True)
class DataConfig(LoaderSettings):
    task: str = option("attractive", "attractive | paper4 | all40 | stgan13 | comma list of attributes", flag=True)


@dataclass(kw_only=True)
class OptimConfig:
    epochs: int = option(10, "passes over the train split", flag=True)
    lr: float = option(1e-3, "Adam's learning rate", flag=True)
    weight_decay: float = option(0.0, "Adam's weight decay")
    seed: int = option(0, "initial weights and sample order")
    steps_per_epoch: int | None = option(None, "cap steps per epoch (smoke runs); none: the whole split", flag=True)
    compile: bool = option(False, "torch.compile the model (GPU)")
    checkpoint_every: int = option(
        1, "a checkpoint every N epochs; the last epoch's and preemption ones always", flag=True, metavar="N"
    )


@dataclass(kw_only=True)
class ClassifierConfig(RunSettings):
    name: str = with_default(RunSettings, "name", "classifier")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def attributes(self) -> tuple[str, ...]:
        return task_attributes(self.data.task)

    def validate(self) -> ClassifierConfig:
        """Everything that can be checked before a worker starts."""
        self.attributes()
        if not 1 <= self.model.layers <= 4:
            raise ValueError(f"model.layers must be 1..4 (the study's conv blocks), got {self.model.layers}")
        check_fields(
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


# The study's experiments.


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
