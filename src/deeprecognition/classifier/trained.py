"""A trained classifier loaded from its checkpoint, for use outside its training loop: evaluation,
FID features, attribute rates of generated faces, and the GAN's "a network decides" filter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deeprecognition.classifier.models import InputNorm, build_model
from deeprecognition.config import ClassifierConfig, apply_overrides, from_checkpoint
from deeprecognition.errors import InputError
from deeprecognition.runs.catalog import best_checkpoint
from deeprecognition.runs.checkpoint import load_state


@dataclass
class TrainedClassifier:
    model: nn.Module  # in eval mode
    norm: InputNorm
    attributes: tuple[str, ...]
    image_size: int  # what it was trained on; other sizes are resized to it
    checkpoint: str  # the folder it came from
    config: ClassifierConfig
    majority: Tensor | None  # the training split's majority answer (None: a checkpoint written before it was kept)

    @classmethod
    def load(cls, uri: str, device: torch.device | str = "cpu") -> TrainedClassifier:
        """A checkpoint folder, or a run folder's best checkpoint (catalog's ranking: validation
        accuracy, never a mid-epoch one without it); local or s3://; plain data only."""
        folder = best_checkpoint(uri)
        state = load_state(folder)
        if "attributes" not in state or "image_size" not in state:
            raise InputError(
                folder,
                "is not a classifier checkpoint (no attributes or image_size): "
                "give one written by `deeprec train classifier`",
            )
        # The weights come from the checkpoint: never look for ImageNet weights here.
        cfg = apply_overrides(from_checkpoint(ClassifierConfig, state["config"]), ["model.weights=none"])
        attributes = tuple(state["attributes"])
        model = build_model(cfg, len(attributes), state["image_size"])
        model.load_state_dict(state["model"])
        norm = InputNorm(cfg.model.name)
        majority = torch.tensor(state["majority"], dtype=torch.bool) if "majority" in state else None
        return cls(model.to(device).eval(), norm.to(device), attributes, state["image_size"], folder, cfg, majority)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def penultimate_dim(self) -> int:
        return self.model.penultimate_dim

    def _inputs(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) on any device -> normalised floats at the classifier's own size."""
        x = self.norm(images.to(self.device, non_blocking=True))
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return x

    @torch.no_grad()
    def probabilities(self, images: Tensor) -> Tensor:
        """(B, len(attributes)) sigmoid scores."""
        return torch.sigmoid(self.model(self._inputs(images)).float())

    @torch.no_grad()
    def penultimate(self, images: Tensor) -> Tensor:
        """(B, F) activations of the last hidden layer: the FID features without Inception."""
        return self.model.penultimate(self._inputs(images)).float()

    def attribute_index(self, name: str) -> int:
        """Which output is `name`; "" means the classifier's only attribute."""
        if not name:
            if len(self.attributes) != 1:
                raise ValueError(
                    f"{self.checkpoint} scores {len(self.attributes)} attributes: "
                    f"name one ({', '.join(self.attributes)})"
                )
            return 0
        if name not in self.attributes:
            raise ValueError(f"{self.checkpoint} does not score {name!r}; it scores {', '.join(self.attributes)}")
        return self.attributes.index(name)
