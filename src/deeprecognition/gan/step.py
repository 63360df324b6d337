"""One GAN iteration, `gan_step`, and what it updates (`GanNets`, built by `make_nets`).

An iteration is one generator step, as Mimicry counts its 100k iterations: first optim.n_dis
discriminator steps, each on its own real batch, then one G step. Written so that DDP never sees an
unused parameter and gradients sync once per step: (1) D learns on real and generated faces, G runs
without gradients; (2) G learns through D's plain module with D's parameters frozen, so no D
gradient is computed or synced. Every rank takes the same steps in the same order. With
model.diffaugment every image D sees, in both steps, goes through the same random differentiable
transforms (gan/diffaugment.py), so G's gradients flow through them.

A conditional model (model.conditional) is given labels: each real batch its faces' own, each
generated batch rows drawn from the data's label vectors (`GanNets.bank`, gan/conditions.py) with
the step's noise. With the auxiliary head D also learns to name the real faces' attributes and G
to make D name the requested ones (D's attribute loss sees real faces only: trained on fakes too,
AC-GAN's classifier rewards G for easily classified, less varied faces).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deeprecognition.config import GanConfig
from deeprecognition.gan.conditions import LabelBank
from deeprecognition.gan.diffaugment import diff_augment
from deeprecognition.gan.models import build_gan, d_loss, ema_copy, ema_decay_at, g_loss, to_tanh_range, update_ema
from deeprecognition.runs.distributed import unwrap


@dataclass
class GanNets:
    """What a training step updates."""

    G: nn.Module  # DDP-wrapped when there are several ranks
    D: nn.Module
    ema: nn.Module  # G's exponential moving average, a plain module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    bank: LabelBank | None = None  # conditional: the label vectors fake faces are asked for, on the device

    def state(self) -> dict[str, Any]:
        return {
            "G": unwrap(self.G).state_dict(),
            "D": unwrap(self.D).state_dict(),
            "ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }

    def load(self, state: dict[str, Any]) -> None:
        """`state()`'s dict back into the networks, before DDP wraps them."""
        for key in ("G", "D", "ema", "opt_g", "opt_d"):
            getattr(self, key).load_state_dict(state[key])


def _optimizer(cfg: GanConfig, params, lr: float) -> torch.optim.Optimizer:
    if cfg.optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    return torch.optim.RMSprop(params, lr=lr)


def hyperparameters(cfg: GanConfig, lr: float) -> dict[str, Any]:
    """What the config sets on an optimiser (and a checkpoint's optimiser state must not override)."""
    if cfg.optim.optimizer == "adam":
        return {"lr": lr, "betas": (cfg.optim.beta1, cfg.optim.beta2)}
    return {"lr": lr}


def make_nets(cfg: GanConfig, image_size: int, device: torch.device, bank: LabelBank | None = None) -> GanNets:
    """G, D, G's EMA copy and both optimisers, initialised from the run's seed (the same on every
    rank); a conditional model's over the attributes of `bank`, which it keeps on `device`."""
    if cfg.model.conditional and (bank is None or bank.attributes != cfg.condition_attributes()):
        raise ValueError("a conditional GAN needs a label bank over model.attributes")
    torch.manual_seed(cfg.optim.seed)
    G, D = (m.to(device) for m in build_models(cfg, image_size))
    if device.type == "cuda":  # the images arrive channels_last; convolutions are faster so
        G, D = (m.to(memory_format=torch.channels_last) for m in (G, D))
    return GanNets(
        G,
        D,
        ema_copy(G),
        _optimizer(cfg, G.parameters(), cfg.optim.lr_g),
        _optimizer(cfg, D.parameters(), cfg.optim.lr_d),
        bank.to(device) if bank is not None else None,
    )


def build_models(cfg: GanConfig, image_size: int) -> tuple[nn.Module, nn.Module]:
    """The config's (G, D), conditional or not."""
    model = cfg.model
    conditions = len(cfg.condition_attributes())
    return build_gan(
        model.arch, model.latent, image_size, model.width, conditions, model.condition_embed, model.condition_head
    )


def generated(G: nn.Module, z: Tensor, labels: Tensor | None) -> Tensor:
    """G's faces for noise z, asked for `labels` when G is conditional (labels given)."""
    return G(z) if labels is None else G(z, labels)


def judged(D: nn.Module, images: Tensor, labels: Tensor | None) -> Tensor:
    """D's logits for images (with their labels when D is conditional): (B, 1), or (B, 1 + K) from
    an auxiliary head."""
    return D(images) if labels is None else D(images, labels)


def clip_gradients(module: nn.Module, limit: float) -> None:
    """The study's Keras `clipvalue`: every gradient element into [-limit, limit]; 0 = off."""
    if limit > 0:
        nn.utils.clip_grad_value_(module.parameters(), limit)


def _autocast(device: torch.device) -> torch.autocast:
    # bf16 on CUDA needs no gradient scaler; on CPU the step runs in float32.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _latents(cfg: GanConfig, batch: int, device: torch.device, noise: torch.Generator) -> Tensor:
    return torch.randn(batch, cfg.model.latent, device=device, generator=noise)


def gan_step(
    cfg: GanConfig,
    nets: GanNets,
    reals: Sequence[Tensor],
    noise: torch.Generator,
    iteration: int,
    labels: Sequence[Tensor] | None = None,
) -> dict[str, Tensor]:
    """One iteration: a D step on each of the optim.n_dis uint8 real batches `reals` (a conditional
    model: with their (B, K) float `labels`), in order, then one G step and the EMA's update. The
    losses (D's the mean over its steps) stay on the device: reading them would wait for the GPU."""
    if len(reals) != cfg.optim.n_dis:
        raise ValueError(f"gan_step needs optim.n_dis={cfg.optim.n_dis} real batches, got {len(reals)}")
    if (labels is not None) != (nets.bank is not None) or (labels is not None and len(labels) != len(reals)):
        raise ValueError("a conditional GAN's step needs one label batch per real batch, an unconditional one none")
    real_labels = labels if labels is not None else [None] * len(reals)
    loss_d = torch.stack([_d_step(cfg, nets, real, y, noise) for real, y in zip(reals, real_labels)]).mean()
    loss_g = _g_step(cfg, nets, reals[-1].shape[0], reals[-1].device, noise)
    update_ema(nets.ema, nets.G, ema_decay_at(cfg.model.ema_decay, iteration))
    return {"loss/d": loss_d, "loss/g": loss_g}


def _fake_labels(nets: GanNets, batch: int, noise: torch.Generator) -> Tensor | None:
    return nets.bank.sample(batch, noise) if nets.bank is not None else None


def _attribute_loss(cfg: GanConfig, logits: Tensor, labels: Tensor | None) -> Tensor | float:
    """The auxiliary head's loss: its attribute logits (every column after the first) against `labels`."""
    if labels is None or logits.shape[1] == 1:
        return 0.0
    return cfg.model.aux_weight * F.binary_cross_entropy_with_logits(logits[:, 1:], labels)


def _d_step(cfg: GanConfig, nets: GanNets, real: Tensor, real_labels: Tensor | None, noise: torch.Generator) -> Tensor:
    """(1) Update D: real faces vs generated ones (G without gradients)."""
    batch, device = real.shape[0], real.device
    fake_labels = _fake_labels(nets, batch, noise)
    with torch.no_grad(), _autocast(device):
        fake = generated(nets.G, _latents(cfg, batch, device, noise), fake_labels)
    seen = diff_augment(torch.cat([to_tanh_range(real), fake.float()]), cfg.model.diffaugment)
    both = None if real_labels is None else torch.cat([real_labels, fake_labels])
    with _autocast(device):
        logits = judged(nets.D, seen, both).float()
        loss = d_loss(logits[:batch, :1], logits[batch:, :1], cfg.model.loss, cfg.optim.label_noise)
        loss = loss + _attribute_loss(cfg, logits[:batch], real_labels)
    nets.opt_d.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(nets.D, cfg.optim.clip)
    nets.opt_d.step()
    return loss.detach()


def _g_step(cfg: GanConfig, nets: GanNets, batch: int, device: torch.device, noise: torch.Generator) -> Tensor:
    """(2) Update G through D's plain module, D frozen: only G's gradients exist, and only G syncs."""
    plain_d = unwrap(nets.D)
    plain_d.requires_grad_(False)
    labels = _fake_labels(nets, batch, noise)
    with _autocast(device):
        # In float32 as in D's step: the transforms' means and draws are not bf16's.
        fakes = diff_augment(
            generated(nets.G, _latents(cfg, batch, device, noise), labels).float(), cfg.model.diffaugment
        )
        logits = judged(plain_d, fakes, labels).float()
        loss = g_loss(logits[:, :1], cfg.model.loss) + _attribute_loss(cfg, logits, labels)
    nets.opt_g.zero_grad(set_to_none=True)
    loss.backward()
    plain_d.requires_grad_(True)
    clip_gradients(nets.G, cfg.optim.clip)
    nets.opt_g.step()
    return loss.detach()
