"""The GAN's per-worker loop: iteration-based, both networks under DDP, plain PyTorch.

Each iteration has two phases, written so that DDP never sees an unused parameter and gradients
sync once per phase: (1) D learns on real and generated faces, G runs without gradients; (2) G
learns through D's plain module with D's parameters frozen, so no D gradient is computed or synced.
"""

from __future__ import annotations

import io
import math
from typing import Any

import torch
from torch import nn

from deeprecognition import storage
from deeprecognition.checkpoint import restore_rng, rng_state
from deeprecognition.config import GanConfig, from_dict, to_dict
from deeprecognition.loops.session import Session
from deeprecognition.models.gan import build_gan, d_loss, ema_copy, g_loss, to_tanh_range, to_uint8, update_ema
from deeprecognition.report import RunLog
from deeprecognition.shards.loader import LoaderConfig, make_loader, parse_where
from deeprecognition.shards.manifest import read_manifest

MOSAIC = 36  # the study's 6x6 grid


def mosaic_png(images: torch.Tensor) -> bytes:
    """A square grid PNG of (N, 3, S, S) images in [-1, 1]."""
    from PIL import Image

    n, _, size, _ = images.shape
    side = math.ceil(math.sqrt(n))
    grid = torch.zeros((3, side * size, side * size), dtype=torch.uint8)
    for i, img in enumerate(to_uint8(images.float().cpu())):
        row, col = divmod(i, side)
        grid[:, row * size : (row + 1) * size, col * size : (col + 1) * size] = img
    buf = io.BytesIO()
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _optimizer(cfg: GanConfig, params, lr: float) -> torch.optim.Optimizer:
    if cfg.optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    return torch.optim.RMSprop(params, lr=lr)


def _real_batches(cfg: GanConfig, session: Session):
    """An endless stream of real uint8 batches matching --where, this rank's share."""
    config = LoaderConfig(
        data=cfg.data.data, split="train", targets=(), where=parse_where(cfg.data.where), batch_size=cfg.data.batch_size,
        num_workers=cfg.data.loader_workers, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.optim.seed,
    )
    loader = make_loader(config, session.rank, session.world_size, pin_memory=session.device.type == "cuda")
    epoch = 0
    while True:
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            if len(batch.keys) == cfg.data.batch_size:  # equal batches on every rank
                yield batch.images
        epoch += 1


def _clip(module: nn.Module, limit: float) -> None:
    if limit > 0:
        nn.utils.clip_grad_norm_(module.parameters(), limit)


def _step(cfg: GanConfig, nets: dict[str, Any], real: torch.Tensor, device: torch.device) -> dict[str, float]:
    G, D, opt_g, opt_d = nets["G"], nets["D"], nets["opt_g"], nets["opt_d"]
    plain_d = D.module if isinstance(D, nn.parallel.DistributedDataParallel) else D
    batch = real.shape[0]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    # (1) Update D: real faces vs generated ones (G without gradients)
    with torch.no_grad(), autocast:
        fake = G(torch.randn(batch, cfg.model.latent, device=device))
    with autocast:
        logits = D(torch.cat([to_tanh_range(real), fake.float()])).float()
        loss_d = d_loss(logits[:batch], logits[batch:], cfg.model.loss, cfg.optim.label_noise)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    _clip(D, cfg.optim.clip)
    opt_d.step()
    # (2) Update G through D's plain module, D frozen: only G's gradients exist, and only G syncs
    plain_d.requires_grad_(False)
    with autocast:
        loss_g = g_loss(plain_d(G(torch.randn(batch, cfg.model.latent, device=device))).float(), cfg.model.loss)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    plain_d.requires_grad_(True)
    _clip(G, cfg.optim.clip)
    opt_g.step()
    update_ema(nets["ema"], G, cfg.model.ema_decay)
    return {"loss/d": loss_d.item(), "loss/g": loss_g.item()}


def _state(cfg: GanConfig, nets: dict[str, Any], iteration: int, fixed: torch.Tensor) -> dict[str, Any]:
    unwrap = lambda m: m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m  # noqa: E731
    return {
        "G": unwrap(nets["G"]).state_dict(),
        "D": unwrap(nets["D"]).state_dict(),
        "ema": nets["ema"].state_dict(),
        "opt_g": nets["opt_g"].state_dict(),
        "opt_d": nets["opt_d"].state_dict(),
        "iteration": iteration,
        "step": iteration,
        "rng": rng_state(),
        "fixed_latents": fixed,
        "config": to_dict(cfg),
    }


def _build(cfg: GanConfig, session: Session, image_size: int) -> tuple[dict[str, Any], int, torch.Tensor]:
    """Networks, optimisers and EMA, restored from the latest checkpoint when there is one."""
    torch.manual_seed(cfg.optim.seed)
    G, D = (m.to(session.device) for m in build_gan(cfg.model.arch, cfg.model.latent, image_size))
    nets: dict[str, Any] = {"G": G, "D": D, "ema": ema_copy(G)}
    nets["opt_g"] = _optimizer(cfg, G.parameters(), cfg.optim.lr_g)
    nets["opt_d"] = _optimizer(cfg, D.parameters(), cfg.optim.lr_d)
    # The same 36 latent vectors for every mosaic of the run, as the study did.
    fixed = torch.randn(MOSAIC, cfg.model.latent, generator=torch.Generator().manual_seed(cfg.optim.seed))
    state, start = session.latest_state(), 0
    if state is not None:
        for key in ("G", "D", "ema", "opt_g", "opt_d"):
            nets[key].load_state_dict(state[key])
        restore_rng(state["rng"])
        start, fixed = state["iteration"], state["fixed_latents"]
        if session.rank == 0:
            print(f"resuming from iteration {start}", flush=True)
    if session.world_size > 1:
        for key in ("G", "D"):
            nets[key] = nn.parallel.DistributedDataParallel(nets[key], device_ids=[session.device.index] if session.device.type == "cuda" else None)
    return nets, start, fixed


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(GanConfig, config).validate()
    session = Session.current(storage.join(cfg.storage, cfg.name), cfg.scale.gpu, cfg.scale.keep_checkpoints)
    nets, start, fixed = _build(cfg, session, read_manifest(cfg.data.data).image.size)
    log = RunLog(session.run_dir, to_dict(cfg), start + 1, position="iteration") if session.rank == 0 else None
    sched = cfg.schedule
    reals = _real_batches(cfg, session)
    for iteration in range(start + 1, cfg.optim.iterations + 1):
        losses = _step(cfg, nets, next(reals).to(session.device, non_blocking=True), session.device)
        if log is not None and iteration % sched.log_every == 0:
            log.log({"iteration": iteration, "step": iteration, **losses})
        if session.rank == 0 and (iteration % sched.mosaic_every == 0 or iteration == cfg.optim.iterations):
            # dcgan draws with its EMA generator; the study's model with G itself, as it did.
            painter = nets["ema"] if cfg.model.arch == "dcgan" else nets["G"]
            with torch.no_grad():
                faces = painter(fixed.to(session.device))
            storage.write_bytes_atomic(storage.join(session.run_dir, "mosaics", f"iter-{iteration:06d}.png"), mosaic_png(faces))
        if iteration % sched.checkpoint_every == 0 or iteration == cfg.optim.iterations:
            session.report({"iteration": iteration, **losses}, _state(cfg, nets, iteration, fixed) if session.rank == 0 else None)
