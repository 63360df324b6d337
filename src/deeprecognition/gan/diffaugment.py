"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"):
the same random, differentiable transforms on every image D sees, real and generated, in D's step
and in G's, so D cannot overfit the few real faces and G's gradients flow through the transforms.

The three policies and their constants are the paper's reference code's (DiffAugment_pytorch.py),
on images in [-1, 1]: color (brightness, saturation, contrast), translation (up to 1/8 of the side,
zero padding), cutout (a square of half the side). Every draw comes from torch's default generator
of the images' device, which the loop seeds per rank and iteration (runs/resume.seed_rank_streams):
a resumed run augments as an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from deeprecognition.config.gan import diffaugment_policies

TRANSLATION_RATIO = 1 / 8
CUTOUT_RATIO = 1 / 2


def _per_image(x: Tensor) -> Tensor:
    """One U[0, 1) draw per image, shaped to broadcast over (B, C, H, W)."""
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def brightness(x: Tensor) -> Tensor:
    return x + (_per_image(x) - 0.5)  # shifted by U[-0.5, 0.5)


def saturation(x: Tensor) -> Tensor:
    grey = x.mean(dim=1, keepdim=True)
    return (x - grey) * (_per_image(x) * 2) + grey  # colour scaled by U[0, 2)


def contrast(x: Tensor) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_image(x) + 0.5) + mean  # scaled by U[0.5, 1.5) about the mean


def _draw(x: Tensor, low: int, high: int) -> Tensor:
    """Per image, an integer in [low, high), shaped (B, 1, 1)."""
    return torch.randint(low, high, (x.shape[0], 1, 1), device=x.device)


def translation(x: Tensor, ratio: float = TRANSLATION_RATIO) -> Tensor:
    """Each image shifted by up to `ratio` of its side in each direction; what comes in is 0."""
    b, _, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy, dx = _draw(x, -shift_h, shift_h + 1), _draw(x, -shift_w, shift_w + 1)
    # Indices into the image padded by one zero pixel: every shifted-in pixel reads the padding.
    rows = (torch.arange(h, device=x.device)[None, :, None] + dy + 1).clamp(0, h + 1)  # (B, H, 1)
    cols = (torch.arange(w, device=x.device)[None, None, :] + dx + 1).clamp(0, w + 1)  # (B, 1, W)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # (B, H+2, W+2, C)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows, cols].permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)


def cutout(x: Tensor, ratio: float = CUTOUT_RATIO) -> Tensor:
    """Each image with a square of `ratio` of its side set to 0, centred anywhere (clipped at the edges)."""
    b, _, h, w = x.shape
    size_h, size_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy, cx = _draw(x, 0, h + (1 - size_h % 2)), _draw(x, 0, w + (1 - size_w % 2))
    rows = (torch.arange(size_h, device=x.device)[None, :, None] + cy - size_h // 2).clamp(0, h - 1)
    cols = (torch.arange(size_w, device=x.device)[None, None, :] + cx - size_w // 2).clamp(0, w - 1)
    mask = torch.ones(b, h, w, dtype=x.dtype, device=x.device)
    mask[torch.arange(b, device=x.device)[:, None, None], rows, cols] = 0
    return x * mask[:, None]  # (B, C, H, W)


# Keyed by the config's names (config/gan.py DIFFAUGMENT_POLICIES).
OPS: dict[str, tuple[Callable[[Tensor], Tensor], ...]] = {
    "color": (brightness, saturation, contrast),
    "translation": (translation,),
    "cutout": (cutout,),
}


def diff_augment(x: Tensor, policy: str) -> Tensor:
    """Images (B, C, H, W) in [-1, 1] through the policies, in the order given; "" returns x itself."""
    for name in diffaugment_policies(policy):  # an unknown name is refused by name
        for op in OPS[name]:
            x = op(x)
    return x
