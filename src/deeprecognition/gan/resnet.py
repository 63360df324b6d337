"""SNGAN's ResNet generator and discriminator (Miyato et al. 2018), at Mimicry's sizes.

At `width` 64 the networks are Mimicry's SNGAN for the image side: at 64 and 128 px its
SNGAN-64 / SNGAN-128 (ngf = ndf = 1024 top channels, the models behind its CelebA FID 5.71 and
12.93), at 32 px its CIFAR SNGAN-32 (G 256 channels throughout, D 128). Other widths scale every
channel count in proportion. The depth follows the side: 3, 4 or 5 up-blocks from a 4x4 map.

Departures from Mimicry's code, both the SNGAN paper's own choice: nearest upsampling (Mimicry
uses bilinear), and D's residual ReLU not in place (Mimicry's in-place ReLU also rectifies the
input its shortcut sees).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

# Channels in units of `width`. G: the 4x4 map's, then each up-block's output. D: the first
# (optimised) block's, then each further block's with whether it halves the side. Mimicry's
# SNGAN-128 D ends in one block at 4x4 that keeps the side; its SNGAN-64 D ends at 2x2.
G_PLAN: dict[int, tuple[int, ...]] = {32: (4, 4, 4, 4), 64: (16, 8, 4, 2, 1), 128: (16, 16, 8, 4, 2, 1)}
D_PLAN: dict[int, tuple[int, tuple[tuple[int, bool], ...]]] = {
    32: (2, ((2, True), (2, False), (2, False))),
    64: (1, ((2, True), (4, True), (8, True), (16, True))),
    128: (1, ((2, True), (4, True), (8, True), (16, True), (16, False))),
}
BOTTOM = 4  # the generator's first map is 4x4
# Mimicry's (and SNGAN's Chainer code's) Xavier gains: sqrt(2) before a ReLU, 1 elsewhere.
RELU_GAIN = math.sqrt(2.0)


def check_resnet_size(image_size: int) -> None:
    if image_size not in G_PLAN:
        raise ValueError(f"the resnet arch has plans for {', '.join(map(str, G_PLAN))} px, got {image_size}")


def _conv(c_in: int, c_out: int, kernel: int, gain: float, sn: bool) -> nn.Module:
    """A `kernel` x `kernel` conv keeping the side, Xavier-initialised; spectrally normalised with `sn`."""
    conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
    nn.init.xavier_uniform_(conv.weight, gain)
    return spectral_norm(conv) if sn else conv


def _up(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")  # (B, C, s, s) -> (B, C, 2s, 2s)


class UpBlock(nn.Module):
    """(B, c_in, s, s) -> (B, c_out, 2s, 2s): BN, ReLU, upsample, 3x3 conv, BN, ReLU, 3x3 conv, plus
    a 1x1-conv shortcut of the upsampled input."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.b1, self.c1 = nn.BatchNorm2d(c_in), _conv(c_in, c_out, 3, RELU_GAIN, sn=False)
        self.b2, self.c2 = nn.BatchNorm2d(c_out), _conv(c_out, c_out, 3, RELU_GAIN, sn=False)
        self.shortcut = _conv(c_in, c_out, 1, 1.0, sn=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(_up(F.relu(self.b1(x))))  # (B, c_out, 2s, 2s)
        h = self.c2(F.relu(self.b2(h)))
        # A 1x1 conv commutes with nearest upsampling: the same output at a quarter of the cost.
        return h + _up(self.shortcut(x))


class DownBlock(nn.Module):
    """(B, c_in, s, s) -> (B, c_out, s/2, s/2), or s with `down` False: (ReLU,) 3x3 SN conv, ReLU,
    3x3 SN conv, 2x2 average pool, plus a shortcut (a 1x1 SN conv of the pooled input; the input
    itself when neither channels nor side change). The `first` block sees the image: no ReLU before
    its first conv, whose output width it keeps (SNGAN's "optimised" block)."""

    def __init__(self, c_in: int, c_out: int, down: bool = True, first: bool = False) -> None:
        super().__init__()
        hidden = c_out if first else c_in
        self.first, self.down = first, down
        self.c1 = _conv(c_in, hidden, 3, RELU_GAIN, sn=True)
        self.c2 = _conv(hidden, c_out, 3, RELU_GAIN, sn=True)
        learnt = first or down or c_in != c_out
        self.shortcut = _conv(c_in, c_out, 1, 1.0, sn=True) if learnt else nn.Identity()

    def _pool(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.first else F.relu(x)
        h = self.c2(F.relu(self.c1(h)))  # (B, c_out, s, s)
        # Pooling and a 1x1 conv commute (both linear): pooling first is 4x cheaper.
        return self._pool(h) + self.shortcut(self._pool(x))


class ResNetGenerator(nn.Module):
    """Noise -> a 4x4 map (linear) -> up-blocks -> BN, ReLU, 3x3 conv, tanh."""

    def __init__(self, latent: int = 128, image_size: int = 64, width: int = 64) -> None:
        super().__init__()
        check_resnet_size(image_size)
        channels = [width * c for c in G_PLAN[image_size]]
        self.latent, self.top = latent, channels[0]
        self.linear = nn.Linear(latent, BOTTOM * BOTTOM * self.top)
        nn.init.xavier_uniform_(self.linear.weight, 1.0)
        self.blocks = nn.Sequential(*(UpBlock(a, b) for a, b in zip(channels, channels[1:])))
        self.norm = nn.BatchNorm2d(channels[-1])
        self.out = _conv(channels[-1], 3, 3, 1.0, sn=False)

    def forward(self, z: Tensor) -> Tensor:
        """Noise (B, latent) -> images (B, 3, S, S) in [-1, 1]."""
        h = self.linear(z).view(-1, self.top, BOTTOM, BOTTOM)  # (B, top, 4, 4)
        h = self.blocks(h)  # (B, width * G_PLAN[S][-1], S, S)
        return torch.tanh(self.out(F.relu(self.norm(h))))  # (B, 3, S, S)


class ResNetDiscriminator(nn.Module):
    """Images -> residual blocks with spectral norm on every conv -> ReLU -> global sum pooling ->
    a spectrally normalised linear layer to one logit."""

    def __init__(self, image_size: int = 64, width: int = 64) -> None:
        super().__init__()
        check_resnet_size(image_size)
        first, rest = D_PLAN[image_size]
        blocks: list[nn.Module] = [DownBlock(3, width * first, first=True)]  # (B, width*first, S/2, S/2)
        c = width * first
        for units, down in rest:
            blocks.append(DownBlock(c, width * units, down))
            c = width * units
        self.blocks = nn.Sequential(*blocks)  # (B, c, 2 or 4 or 8, ...)
        linear = nn.Linear(c, 1)
        nn.init.xavier_uniform_(linear.weight, 1.0)
        self.linear = spectral_norm(linear)
        self.feature_dim = c

    def features(self, x: Tensor) -> Tensor:
        """Images (B, 3, S, S) -> (B, feature_dim): the last block's ReLU, sum-pooled over the map."""
        return F.relu(self.blocks(x)).sum(dim=(2, 3))

    def head(self, h: Tensor) -> Tensor:
        return self.linear(h)  # (B, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> logits (B, 1)."""
        return self.head(self.features(x))
