"""GANs for CelebA faces: the study's Keras GAN in PyTorch, a modern DCGAN, SNGAN's ResNets (resnet.py),
their losses and EMA.

Images cross the model boundary in [-1, 1]: the generators end in tanh, so the discriminator must
see real images in the same range. The study fed real images in [0, 1] while its generator produced
[-1, 1], so D could tell real from fake by the pixel range alone; `to_tanh_range` fixes that here.
"""

from __future__ import annotations

import copy
import math
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from deeprecognition.config import Arch, GanLoss
from deeprecognition.config.gan import ConditionHead
from deeprecognition.gan.resnet import ResNetDiscriminator, ResNetGenerator
from deeprecognition.runs.distributed import unwrap

ARCHS: tuple[str, ...] = get_args(Arch)
LOSSES: tuple[str, ...] = get_args(GanLoss)
CONDITION_HEADS: tuple[str, ...] = get_args(ConditionHead)
# The study's LeakyReLU slope, also the DCGAN paper's.
SLOPE = 0.2


def _check_size(image_size: int) -> None:
    # Every model halves or doubles its side by 2 down to 4x4 (DCGAN) or from 16x16 (paper G).
    if image_size < 32 or image_size & (image_size - 1):
        raise ValueError(f"image size must be a power of two >= 32, got {image_size}")


def _doublings(image_size: int, base: int) -> int:
    """How many stride-2 steps take a `base` x `base` map to `image_size`."""
    _check_size(image_size)
    return int(math.log2(image_size // base))


def _lrelu() -> nn.LeakyReLU:
    return nn.LeakyReLU(SLOPE, inplace=True)


class PaperGenerator(nn.Module):
    """The study's Keras generator: a 16x16 seed map, stride-2 upsampling, then wide 5x5 convs."""

    def __init__(self, latent: int = 32, image_size: int = 128) -> None:
        super().__init__()
        ups = _doublings(image_size, 16)
        self.latent = latent
        self.dense = nn.Sequential(nn.Linear(latent, 128 * 16 * 16), _lrelu())  # (B, 128*16*16)
        self.body = nn.Sequential(
            nn.Conv2d(128, 256, 5, padding=2),
            _lrelu(),  # (B, 256, 16, 16)
            *(
                layer
                for _ in range(ups)  # each: (B, 256, s, s) -> (B, 256, 2s, 2s)
                for layer in (nn.ConvTranspose2d(256, 256, 4, stride=2, padding=1), _lrelu())
            ),  # (B, 256, S, S)
            nn.Conv2d(256, 512, 5, padding=2),
            _lrelu(),  # (B, 512, S, S)
            nn.Conv2d(512, 512, 5, padding=2),
            _lrelu(),  # (B, 512, S, S)
            nn.Conv2d(512, 3, 7, padding=3),
            nn.Tanh(),  # (B, 3, S, S) in [-1, 1]
        )

    def forward(self, z: Tensor) -> Tensor:
        """Noise (B, latent) -> images (B, 3, S, S) in [-1, 1]."""
        x = self.dense(z).view(-1, 128, 16, 16)  # (B, 128, 16, 16)
        return self.body(x)  # (B, 3, S, S)


class PaperDiscriminator(nn.Module):
    """The study's Keras discriminator: four stride-2 convs, dropout, one logit."""

    def __init__(self, image_size: int = 128) -> None:
        super().__init__()
        _check_size(image_size)
        side = image_size // 16
        self.net = nn.Sequential(
            nn.Conv2d(3, 256, 3, padding=1),
            _lrelu(),  # (B, 256, S, S)
            *(
                layer
                for _ in range(4)  # each: (B, 256, s, s) -> (B, 256, s/2, s/2)
                for layer in (nn.Conv2d(256, 256, 4, stride=2, padding=1), _lrelu())
            ),  # (B, 256, S/16, S/16)
            nn.Flatten(),  # (B, 256 * (S/16)**2)
            nn.Dropout(0.4),
            nn.Linear(256 * side * side, 1),  # (B, 1) logit
        )
        self.feature_dim = 256 * side * side

    def features(self, x: Tensor) -> Tensor:
        """Images (B, 3, S, S) -> the last layer's input (B, feature_dim), after dropout."""
        return self.net[:-1](x)

    def head(self, h: Tensor) -> Tensor:
        return self.net[-1](h)  # (B, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> logits (B, 1)."""
        return self.head(self.features(x))


class DCGANGenerator(nn.Module):
    """Radford et al.'s generator: a 4x4 seed, channels halving as the side doubles, BN + ReLU."""

    def __init__(self, latent: int = 128, image_size: int = 64, width: int = 64) -> None:
        super().__init__()
        # Halving blocks from 4x4 up to S/2; the last transposed conv makes S. Channels start at
        # width * 2**blocks so that they reach `width` at S/2: width*8 at 64 px, width*16 at 128.
        blocks = _doublings(image_size, 4) - 1
        top = width * 2**blocks
        self.latent = latent
        layers: list[nn.Module] = [
            # No bias before BN: its mean subtraction would cancel it.
            nn.ConvTranspose2d(latent, top, 4, bias=False),  # (B, top, 4, 4)
            nn.BatchNorm2d(top),
            nn.ReLU(inplace=True),
        ]
        c = top
        for _ in range(blocks):  # each: (B, c, s, s) -> (B, c/2, 2s, 2s)
            layers += [
                nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(inplace=True),
            ]
            c //= 2
        # (B, width, S/2, S/2)
        layers += [nn.ConvTranspose2d(c, 3, 4, stride=2, padding=1), nn.Tanh()]  # (B, 3, S, S)
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """Noise (B, latent) -> images (B, 3, S, S) in [-1, 1]."""
        return self.net(z[:, :, None, None])  # (B, latent, 1, 1) -> (B, 3, S, S)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator with spectral norm instead of batch norm (Miyato et al.): D stays
    1-Lipschitz per layer, and its output does not depend on the other samples of the batch."""

    def __init__(self, image_size: int = 64, width: int = 64) -> None:
        super().__init__()
        downs = _doublings(image_size, 4)  # stride-2 convs from S to 4
        layers: list[nn.Module] = []
        c_in, c = 3, width
        for _ in range(downs):  # each: (B, c_in, s, s) -> (B, c, s/2, s/2)
            layers += [spectral_norm(nn.Conv2d(c_in, c, 4, stride=2, padding=1)), _lrelu()]
            c_in, c = c, c * 2
        # (B, c_in, 4, 4), c_in = width * 2**(downs-1)
        layers += [spectral_norm(nn.Conv2d(c_in, 1, 4)), nn.Flatten()]  # (B, 1, 1, 1) -> (B, 1)
        self.net = nn.Sequential(*layers)
        self.top, self.feature_dim = c_in, c_in * 4 * 4

    def features(self, x: Tensor) -> Tensor:
        """Images (B, 3, S, S) -> the 4x4 map the last conv reads, flattened (B, feature_dim)."""
        return self.net[:-2](x).flatten(1)

    def head(self, h: Tensor) -> Tensor:
        # The 4x4 conv over a 4x4 map is a linear layer on the flattened map.
        return self.net[-2:](h.view(len(h), self.top, 4, 4))  # (B, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> logits (B, 1)."""
        return self.head(self.features(x))


def draws_with_ema(arch: str) -> bool:
    """Which generator paints mosaics and faces for metrics: dcgan and resnet their EMA copy; the
    study's model G itself, as the study did."""
    return arch in ("dcgan", "resnet")


class ConditionalGenerator(nn.Module):
    """G(z, a): the attributes a (B, K) in {0, 1}, signed to {-1, 1} and embedded by a linear map,
    join the noise at the input of an unconditional generator. One way for every architecture (the
    study's G has no batch norm to condition), and every attribute reaches every channel of the
    seed map from the first layer on."""

    def __init__(self, base: nn.Module, attributes: int, embed: int) -> None:
        super().__init__()
        self.base, self.embed = base, nn.Linear(attributes, embed)
        self.latent = base.latent - embed

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """Noise (B, latent) and labels (B, K) -> images (B, 3, S, S) in [-1, 1]."""
        return self.base(torch.cat([z, self.embed(2 * labels - 1)], 1))


class ConditionalDiscriminator(nn.Module):
    """D(x, a) for multi-label conditions over an unconditional D's features phi(x) (B, F).

    projection (Miyato & Koyama 2018, one embedding v_k per attribute, signed by its value s_k in
    {-1, 1}): logit = head(phi) + sum_k s_k <v_k, phi>; flipping attribute k moves the logit by
    2 <v_k, phi>. auxiliary (AC-GAN): the logit and K attribute logits from phi, (B, 1 + K)."""

    def __init__(self, base: nn.Module, attributes: int, head: str, normed: bool) -> None:
        super().__init__()
        if head not in CONDITION_HEADS:
            raise ValueError(f"model.condition_head must be one of {CONDITION_HEADS}, got {head!r}")
        self.base, self.projection = base, head == "projection"
        layer = (
            nn.Linear(attributes, base.feature_dim, bias=False)
            if self.projection
            else nn.Linear(base.feature_dim, attributes)
        )
        self.conditions = spectral_norm(layer) if normed else layer

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        """Images (B, 3, S, S) and labels (B, K) -> (B, 1) logits, or (B, 1 + K) with the auxiliary head."""
        h = self.base.features(x)
        if self.projection:
            return self.base.head(h) + (self.conditions(2 * labels - 1) * h).sum(1, keepdim=True)
        return torch.cat([self.base.head(h), self.conditions(h)], 1)


def build_gan(
    arch: str,
    latent: int,
    image_size: int,
    width: int = 64,
    conditions: int = 0,
    embed: int = 64,
    head: str = "projection",
) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for `arch` in ARCHS; `width` sizes the DCGAN and the ResNets (the
    study's model has fixed widths). With `conditions` K > 0 they take K attributes too (G an
    `embed`-wide embedding, D the `head` in CONDITION_HEADS)."""
    G, D = _unconditional(arch, latent + (embed if conditions else 0), image_size, width)
    if not conditions:
        return G, D
    return ConditionalGenerator(G, conditions, embed), ConditionalDiscriminator(D, conditions, head, arch != "paper")


def _unconditional(arch: str, latent: int, image_size: int, width: int) -> tuple[nn.Module, nn.Module]:
    if arch == "paper":
        return PaperGenerator(latent, image_size), PaperDiscriminator(image_size)
    if arch == "dcgan":
        return DCGANGenerator(latent, image_size, width), DCGANDiscriminator(image_size, width)
    if arch == "resnet":
        return ResNetGenerator(latent, image_size, width), ResNetDiscriminator(image_size, width)
    raise ValueError(f"gan arch must be one of {ARCHS}, got {arch!r}")


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"gan loss must be one of {LOSSES}, got {loss!r}")


def d_loss(
    real_logits: Tensor,
    fake_logits: Tensor,
    loss: str,
    label_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Discriminator loss. For bce, each label moves toward the other class by U[0, label_noise]
    (the study's `labels += 0.05 * random`), which keeps D from growing overconfident."""
    _check_loss(loss)
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()

    def noise(like: Tensor) -> Tensor:
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return label_noise * u

    real_target = 1 - noise(real_logits)
    fake_target = noise(fake_logits)
    return F.binary_cross_entropy_with_logits(real_logits, real_target) + F.binary_cross_entropy_with_logits(
        fake_logits, fake_target
    )


def g_loss(fake_logits: Tensor, loss: str) -> Tensor:
    """Generator loss: non-saturating BCE (target 1) or the hinge generator loss."""
    _check_loss(loss)
    if loss == "hinge":
        return -fake_logits.mean()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def ema_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` for exponential moving averages of its weights."""
    ema = copy.deepcopy(unwrap(model)).eval()
    ema.requires_grad_(False)
    return ema


def ema_decay_at(decay: float, iteration: int) -> float:
    """The decay for the update after `iteration` updates: warmed up as (1 + i) / (10 + i), so an
    early EMA follows G instead of averaging in its random initialisation for thousands of steps."""
    return min(decay, (1 + iteration) / (10 + iteration))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float = 0.999) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied (averaging running
    statistics has no meaning; BatchNorm's are recomputed for the EMA weights before it draws, see
    standing_statistics)."""
    model = unwrap(model)
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers(), strict=True):
        e.copy_(b)


@torch.no_grad()
def standing_statistics(
    generator: nn.Module,
    latent: int,
    samples: int = 512,
    batch_size: int = 64,
    seed: int = 0,
    labels: Tensor | None = None,
) -> None:
    """Recompute a generator's BatchNorm running statistics for its own weights (BigGAN's "standing
    statistics"): the EMA generator's were copied from G, measured on activations of other weights.
    The average over `samples` seeded latents, so that every rank computes the same ones; the
    generator is left in eval mode. A generator without BatchNorm is left as it is. A conditional
    one is asked for `labels`, (samples, K): the draws from the data it paints."""
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    device = next(generator.parameters()).device
    draw = torch.Generator().manual_seed(seed)
    generator.train()
    for i in range(max(1, samples // batch_size)):
        z = torch.randn(batch_size, latent, generator=draw).to(device)
        generator(z) if labels is None else generator(z, labels[i * batch_size : (i + 1) * batch_size].to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    generator.eval()


def to_tanh_range(images_uint8: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float in [-1, 1], the generators' tanh range."""
    return images_uint8.float() / 127.5 - 1


def to_uint8(images_tanh: Tensor) -> Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255], rounded and clamped."""
    return ((images_tanh + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
