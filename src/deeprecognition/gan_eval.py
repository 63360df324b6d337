"""GAN metrics: FID and KID (torchmetrics) with a pluggable feature extractor, and the share of
generated faces a trained classifier assigns to each attribute next to the same share in the data.

Features: the FID Inception network when its weights are at hand (`--inception-weights`, or
torch-fidelity's file in the torch hub cache; nothing is downloaded), else the penultimate layer of
a trained CelebA classifier. Numbers from the latter are labelled: they rank runs against each other
but are not comparable with published FID.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deeprecognition import storage
from deeprecognition.errors import InputError
from deeprecognition.trained import TrainedClassifier

# The FID Inception weights torch-fidelity (and torchmetrics) would download.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
NOT_COMPARABLE = "not comparable with published FID"


@dataclass
class FeatureExtractor:
    name: str  # how every output labels the metric
    features: Any  # uint8 (B, 3, H, W) -> (B, F) float


def cached_inception_weights() -> str:
    """torch-fidelity's FID Inception file in the torch hub cache, or "" (TORCH_HOME honoured)."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    return path if os.path.exists(path) else ""


def _local_weights(uri: str) -> str:
    if not storage.is_remote(uri):
        if not os.path.exists(uri):
            raise InputError(uri, f"no such Inception weights file: give the path of {INCEPTION_FILE} (torch-fidelity's FID Inception)")
        return uri
    local = os.path.join(tempfile.mkdtemp(prefix="deeprec-inception-"), os.path.basename(uri))
    with open(local, "wb") as f:
        f.write(storage.read_required(uri, f"the FID Inception weights ({INCEPTION_FILE})"))
    return local


def inception_extractor(weights: str, device: torch.device) -> FeatureExtractor:
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = _local_weights(weights)
    try:  # torch-fidelity unpickles the file freely: prove first that it holds plain tensors only
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler's refusal comes in several types
        raise InputError(weights, f"refused: not a plain-data weights file ({type(err).__name__})") from None
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path).to(device)
    return FeatureExtractor("inception-v3 pool3 (FID weights)", lambda images: net(images.to(device)).float())


def classifier_extractor(classifier: TrainedClassifier) -> FeatureExtractor:
    name = f"classifier penultimate layer ({classifier.checkpoint}); {NOT_COMPARABLE}"
    return FeatureExtractor(name, classifier.penultimate)


def pick_extractor(inception_weights: str, classifier: TrainedClassifier | None, device: torch.device) -> FeatureExtractor:
    weights = inception_weights or cached_inception_weights()
    if weights:
        return inception_extractor(weights, device)
    if classifier is None:
        raise ValueError(f"FID needs features: give --inception-weights ({INCEPTION_FILE}) or --classifier (a trained classifier checkpoint)")
    return classifier_extractor(classifier)


class _Precomputed(nn.Module):
    """torchmetrics' feature slot for features we extracted already: each image's features are
    computed once and feed both FID and KID."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _rates(classifier: TrainedClassifier, images: Tensor, batch_size: int = 250) -> dict[str, float]:
    positive = torch.cat([(classifier.probabilities(chunk) >= 0.5).float().cpu() for chunk in images.split(batch_size)])
    return dict(zip(classifier.attributes, positive.mean(0).tolist(), strict=True))


class GanEvaluator:
    """FID/KID of generated faces against one fixed set of real faces (their features computed
    once), and attribute rates of both."""

    def __init__(self, extractor: FeatureExtractor, real: Tensor, classifier: TrainedClassifier | None = None, batch_size: int = 250) -> None:
        if len(real) < 2:
            raise ValueError(f"FID needs at least 2 real faces, got {len(real)}")
        self.extractor, self.classifier, self.batch_size = extractor, classifier, batch_size
        real_features = self._features(real)
        self.fid, self.kid = self._metrics(real_features.shape[1], len(real))
        self.fid.update(real_features, real=True)
        self.kid.update(real_features, real=True)
        self.real_samples = len(real)
        self.data_rates = _rates(classifier, real) if classifier else {}

    def _features(self, images: Tensor) -> Tensor:
        return torch.cat([self.extractor.features(chunk).double().cpu() for chunk in images.split(self.batch_size)])

    @staticmethod
    def _metrics(num_features: int, samples: int):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        # reset() then clears only the generated side: the real statistics are computed once.
        fid = FrechetInceptionDistance(feature=_Precomputed(num_features), reset_real_features=False)
        with warnings.catch_warnings():  # KID keeps every feature vector: known, and small at our sample counts
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            kid = KernelInceptionDistance(feature=_Precomputed(num_features), reset_real_features=False, subset_size=min(1000, max(2, samples // 2)), subsets=50)
        return fid, kid

    def __call__(self, fake: Tensor) -> dict[str, Any]:
        """Metrics of (N, 3, S, S) uint8 generated faces."""
        if len(fake) < 2:
            raise ValueError(f"FID needs at least 2 generated faces, got {len(fake)}")
        self.fid.reset()
        self.kid.reset()
        # KID averages over random subsets of both sides: half the smaller side, so that they vary.
        self.kid.subset_size = min(1000, max(2, min(len(fake), self.real_samples) // 2))
        features = self._features(fake)
        self.fid.update(features, real=False)
        self.kid.update(features, real=False)
        kid_mean, kid_std = self.kid.compute()
        return {
            "fid": float(self.fid.compute()),
            "kid": float(kid_mean),
            "kid_std": float(kid_std),
            "feature_extractor": self.extractor.name,
            "attribute_rate": _rates(self.classifier, fake) if self.classifier else {},
            "data_attribute_rate": self.data_rates,
            "samples": len(fake),
        }


def evaluate_gan(checkpoint: str, data: str = "", classifier: str = "", inception_weights: str = "", samples: int = 1000, seed: int = 0, ema: bool | None = None) -> dict[str, Any]:
    """`deeprec evaluate-gan`: a GAN checkpoint's faces against the real faces it learned from
    (its run's --where and classifier filters, on DATA or the run's own dataset)."""
    import dataclasses

    from deeprecognition.generate import TrainedGan
    from deeprecognition.loops.gan_data import reference_faces

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gan = TrainedGan.load(checkpoint, ema=ema, device=device)
    cfg = gan.config
    if data:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data=data))
    judge = TrainedClassifier.load(classifier, device) if classifier else None
    extractor = pick_extractor(inception_weights, judge, device)
    real = reference_faces(cfg, samples, device)
    result = GanEvaluator(extractor, real.images, judge)(gan.faces(samples, seed))
    return {**result, "real_samples": len(real.keys), "checkpoint": gan.checkpoint, "iteration": gan.iteration, "where": cfg.data.where}
