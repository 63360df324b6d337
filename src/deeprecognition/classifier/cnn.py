"""The study's from-scratch CNN: 1-4 conv blocks, one dense layer, then one logit per label.

Block i (1-based) is a 3x3 convolution with "same" padding and (32, 64, 128, 256)[i-1] filters, a
ReLU and a 2x2 max-pool, so each block halves the image. The study swept the number of blocks.
The model returns raw logits: the loss is BCE-with-logits (one sigmoid per label, applied there).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# Filters of blocks 1..4; `layers` takes a prefix.
WIDTHS: tuple[int, ...] = (32, 64, 128, 256)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),  # (B, c_out, H, W): "same" padding
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # (B, c_out, H/2, W/2)
    )


class PaperCNN(nn.Module):
    def __init__(self, layers: int, num_outputs: int, image_size: int = 128, dense: int = 128) -> None:
        super().__init__()
        if not 1 <= layers <= len(WIDTHS):
            raise ValueError(f"model.layers must be 1..{len(WIDTHS)}, got {layers}")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be at least 1, got {num_outputs}")
        if image_size % 2**layers:
            raise ValueError(
                f"image size {image_size} must be divisible by 2**model.layers = {2**layers} "
                f"({layers} max-pools of 2 must not drop pixels)"
            )
        widths = WIDTHS[:layers]
        side = image_size // 2**layers
        self.blocks = nn.Sequential(
            *(conv_block(c_in, c_out) for c_in, c_out in zip((3, *widths), widths))
        )  # (B, 3, S, S) -> (B, widths[-1], S/2**layers, S/2**layers)
        self.dense = nn.Linear(widths[-1] * side * side, dense)  # (B, dense)
        self.penultimate_dim = dense
        self.out = nn.Linear(dense, num_outputs)  # (B, num_outputs)

    def penultimate(self, x: Tensor) -> Tensor:
        """Normalised float images (B, 3, S, S) -> the dense layer's activations (B, dense)."""
        x = self.blocks(x)  # (B, C, S/2**layers, S/2**layers), C = 32 * 2**(layers-1)
        x = torch.flatten(x, 1)  # (B, C * (S/2**layers)**2)
        return torch.relu(self.dense(x))  # (B, dense)

    def forward(self, x: Tensor) -> Tensor:
        """Normalised float images (B, 3, S, S) -> logits (B, num_outputs)."""
        return self.out(self.penultimate(x))  # (B, num_outputs) logits
