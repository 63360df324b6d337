"""The classifier networks: the study's CNN (cnn.py) or the ResNet50 transfer model (transfer.py), as
the config picks, and the input normalisation each expects."""

from __future__ import annotations

import torch
from torch import nn

from deeprecognition.config import ClassifierConfig


def build_model(cfg: ClassifierConfig, num_outputs: int, image_size: int) -> nn.Module:
    """The network `cfg.model` names, with `num_outputs` logits; the ResNet50 with its backbone's
    weights when `cfg.model.weights` gives them."""
    if cfg.model.name == "cnn":
        from deeprecognition.classifier.cnn import PaperCNN

        return PaperCNN(layers=cfg.model.layers, num_outputs=num_outputs, image_size=image_size, dense=cfg.model.dense)
    from deeprecognition.classifier.transfer import ResNet50Transfer, load_backbone_weights

    model = ResNet50Transfer(num_outputs=num_outputs, freeze=cfg.model.freeze, head_width=cfg.model.head_width)
    weights = load_backbone_weights(cfg.model.weights)
    if weights is not None:
        model.backbone.load_state_dict(weights)
    return model


class InputNorm(nn.Module):
    """uint8 (B, 3, H, W) -> float, normalised on the device: the CPU only decodes JPEGs."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        if model_name == "resnet50":
            from deeprecognition.classifier.transfer import IMAGENET_MEAN, IMAGENET_STD

            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        else:  # the study's rescale to [0, 1]
            mean, std = torch.zeros(3), torch.ones(3)
        self.register_buffer("scale", (1 / (255 * std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale + self.shift
