"""The GAN's per-worker loop: iteration-based, both networks under DDP, plain PyTorch.

Each iteration has two phases, written so that DDP never sees an unused parameter and gradients
sync once per phase: (1) D learns on real and generated faces, G runs without gradients; (2) G
learns through D's plain module with D's parameters frozen, so no D gradient is computed or synced.
Evaluation (FID/KID, attribute rates) runs on every rank together; mosaics are rank 0's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deeprecognition import storage
from deeprecognition.config import GanConfig, from_dict, to_dict
from deeprecognition.gan.data import real_batches
from deeprecognition.gan.generate import contact_sheet_png, evenly_spaced, grid_png
from deeprecognition.gan.models import (
    build_gan,
    d_loss,
    draws_with_ema,
    ema_copy,
    ema_decay_at,
    g_loss,
    standing_statistics,
    to_tanh_range,
    to_uint8,
    update_ema,
)
from deeprecognition.runs.background import BackgroundWriter
from deeprecognition.runs.catalog import with_ray_score
from deeprecognition.runs.report import RunLog
from deeprecognition.runs.resume import apply_hyperparameters, seed_rank_streams, stream_seed
from deeprecognition.runs.session import Session
from deeprecognition.shards.manifest import read_manifest

MOSAIC = 36  # the study's 6x6 grid
NOISE_STREAM = 2  # stream_seed's stream of the latents G draws in training


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@dataclass
class GanNets:
    G: nn.Module  # DDP-wrapped when there are several ranks
    D: nn.Module
    ema: nn.Module  # G's exponential moving average, a plain module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer

    def state(self) -> dict[str, Any]:
        return {
            "G": _unwrap(self.G).state_dict(),
            "D": _unwrap(self.D).state_dict(),
            "ema": self.ema.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
        }


def _optimizer(cfg: GanConfig, params, lr: float) -> torch.optim.Optimizer:
    if cfg.optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    return torch.optim.RMSprop(params, lr=lr)


def _hyperparameters(cfg: GanConfig, lr: float) -> dict[str, Any]:
    """What the config sets on an optimiser (and a checkpoint's optimiser state must not override)."""
    if cfg.optim.optimizer == "adam":
        return {"lr": lr, "betas": (cfg.optim.beta1, cfg.optim.beta2)}
    return {"lr": lr}


def clip_gradients(module: nn.Module, limit: float) -> None:
    """The study's Keras `clipvalue`: every gradient element into [-limit, limit]; 0 = off."""
    if limit > 0:
        nn.utils.clip_grad_value_(module.parameters(), limit)


def gan_step(cfg: GanConfig, nets: GanNets, real: Tensor, noise: torch.Generator, iteration: int) -> dict[str, Tensor]:
    """One iteration; the losses stay on the device (reading them would wait for the GPU)."""
    G, D = nets.G, nets.D
    plain_d = _unwrap(D)
    batch, device = real.shape[0], real.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    # (1) Update D: real faces vs generated ones (G without gradients)
    with torch.no_grad(), autocast:
        fake = G(torch.randn(batch, cfg.model.latent, device=device, generator=noise))
    with autocast:
        logits = D(torch.cat([to_tanh_range(real), fake.float()])).float()
        loss_d = d_loss(logits[:batch], logits[batch:], cfg.model.loss, cfg.optim.label_noise)
    nets.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    clip_gradients(D, cfg.optim.clip)
    nets.opt_d.step()
    # (2) Update G through D's plain module, D frozen: only G's gradients exist, and only G syncs
    plain_d.requires_grad_(False)
    with autocast:
        loss_g = g_loss(
            plain_d(G(torch.randn(batch, cfg.model.latent, device=device, generator=noise))).float(), cfg.model.loss
        )
    nets.opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    plain_d.requires_grad_(True)
    clip_gradients(G, cfg.optim.clip)
    nets.opt_g.step()
    update_ema(nets.ema, G, ema_decay_at(cfg.model.ema_decay, iteration))
    return {"loss/d": loss_d.detach(), "loss/g": loss_g.detach()}


def make_nets(cfg: GanConfig, image_size: int, device: torch.device) -> GanNets:
    """G, D, G's EMA copy and both optimisers, initialised from the run's seed (the same on every rank)."""
    torch.manual_seed(cfg.optim.seed)
    G, D = (m.to(device) for m in build_gan(cfg.model.arch, cfg.model.latent, image_size, cfg.model.width))
    if device.type == "cuda":  # the images arrive channels_last; convolutions are faster so
        G, D = (m.to(memory_format=torch.channels_last) for m in (G, D))
    return GanNets(
        G,
        D,
        ema_copy(G),
        _optimizer(cfg, G.parameters(), cfg.optim.lr_g),
        _optimizer(cfg, D.parameters(), cfg.optim.lr_d),
    )


def _build(cfg: GanConfig, session: Session, image_size: int) -> tuple[GanNets, int, Tensor]:
    """Networks, optimisers and EMA, restored from the latest checkpoint when there is one."""
    nets = make_nets(cfg, image_size, session.device)
    # The same 36 latent vectors for every mosaic of the run, as the study did.
    fixed = torch.randn(MOSAIC, cfg.model.latent, generator=torch.Generator().manual_seed(cfg.optim.seed))
    state, start = session.latest_state(), 0
    if state is not None:
        for key in ("G", "D", "ema", "opt_g", "opt_d"):
            getattr(nets, key).load_state_dict(state[key])
        changed = apply_hyperparameters(nets.opt_g, _hyperparameters(cfg, cfg.optim.lr_g), "G") + apply_hyperparameters(
            nets.opt_d, _hyperparameters(cfg, cfg.optim.lr_d), "D"
        )
        start, fixed = state["iteration"], state["fixed_latents"]
        if session.rank == 0:
            print(
                f"resuming from iteration {start}" + (f"; the config changes {', '.join(changed)}" if changed else ""),
                flush=True,
            )
    if session.world_size > 1:
        ids = [session.device.index] if session.device.type == "cuda" else None
        nets.G, nets.D = (nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in (nets.G, nets.D))
    return nets, start, fixed


def _reseed(cfg: GanConfig, session: Session, noise: torch.Generator, iteration: int) -> None:
    """Each rank's streams for `iteration` (see loops/resume.py): its label noise and its own
    latents (the same latents on every rank would waste the ranks' generated halves)."""
    seed_rank_streams(cfg.optim.seed, session.rank, iteration, session.device)
    noise.manual_seed(stream_seed(cfg.optim.seed, session.rank, iteration, NOISE_STREAM))


def _painter(cfg: GanConfig, nets: GanNets) -> nn.Module:
    """The generator mosaics, evaluations and checkpoints show: the EMA copy (dcgan), with BatchNorm
    statistics measured for its own weights, or G itself (the study's model, as the study did)."""
    if not draws_with_ema(cfg.model.arch):
        return _unwrap(nets.G)
    standing_statistics(nets.ema, cfg.model.latent)
    return nets.ema


def ranks_in_sync(modules: list[nn.Module], session: Session) -> bool:
    """Whether every rank holds the same weights in `modules` (a collective: all ranks call it).
    Buffers are left out: BatchNorm statistics follow each rank's own batches between syncs."""
    if session.world_size == 1:
        return True
    fingerprint = torch.stack([p.detach().double().sum() for m in modules for p in _unwrap(m).parameters()])
    gathered = [torch.empty_like(fingerprint) for _ in range(session.world_size)]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


class _Evaluation:
    """FID/KID and attribute rates every schedule.eval_every iterations, by every rank together."""

    def __init__(self, cfg: GanConfig, session: Session) -> None:
        from deeprecognition.classifier.trained import TrainedClassifier
        from deeprecognition.gan.data import reference_faces
        from deeprecognition.gan.metrics import GanEvaluator, pick_extractor

        classifier = TrainedClassifier.load(cfg.eval.classifier, session.device) if cfg.eval.classifier else None
        extractor = pick_extractor(cfg.eval.inception_weights, classifier, session.device)
        real = reference_faces(cfg, cfg.eval.samples, session.device, session.rank, session.world_size)
        self.evaluator = GanEvaluator(extractor, real, classifier)
        self.samples, self.latent = cfg.eval.samples, cfg.model.latent
        if session.rank == 0:
            print(
                f"evaluating every {cfg.schedule.eval_every} iterations on {real.total} real faces ({session.world_size} rank(s)); features: {extractor.name}",
                flush=True,
            )

    def __call__(self, painter: nn.Module) -> dict[str, float]:
        """What goes into metrics.jsonl, TensorBoard and the reports Tune's schedulers see."""
        result = self.evaluator(painter, self.latent, self.samples)
        scalars = {key: result[key] for key in ("fid", "kid")}
        scalars.update({f"rate/{name}": rate for name, rate in result["attribute_rate"].items()})
        scalars.update({f"data_rate/{name}": rate for name, rate in result["data_attribute_rate"].items()})
        return scalars


class _Losses:
    """Losses summed on the device between log lines; one read when a line is written."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, losses: dict[str, Tensor]) -> None:
        self.sums = {k: self.sums.get(k, 0) + v.float() for k, v in losses.items()}
        self.count += 1

    def means(self) -> dict[str, float]:
        """The mean of each loss over the iterations since the last call."""
        keys = list(self.sums)
        values = (torch.stack([self.sums[k] for k in keys]) / self.count).tolist() if self.count else []
        self.sums, self.count = {}, 0
        return dict(zip(keys, values))


def _due(every: int, iteration: int, last: bool) -> bool:
    """Every `every` iterations and at the last; 0: at the last only."""
    return last or (every > 0 and iteration % every == 0)


def _progress_line(metrics: dict[str, Any], total: int) -> str:
    line = f"iteration {metrics['iteration']}/{total}  loss D {metrics['loss/d']:.4f}  G {metrics['loss/g']:.4f}"
    if "fid" in metrics:
        line += f"  FID {metrics['fid']:.2f}  KID {metrics['kid']:.4f}"
    return line


def _write_mosaic(uri: str, faces: Tensor) -> None:
    storage.write_bytes_atomic(uri, grid_png(faces))


def _finish(session: Session, log: RunLog, last: dict[str, Any]) -> None:
    """Rank 0: the metrics log, the final metrics as report.json, the mosaics' contact sheet."""
    log.close()  # drains the background writes: every mosaic is in storage
    storage.write_bytes_atomic(storage.join(session.run_dir, "report.json"), json.dumps(last, indent=1).encode())
    folder = storage.join(session.run_dir, "mosaics")
    written = [int(n[5:-4]) for n in storage.list_names(folder) if n.startswith("iter-")]
    # A long run writes thousands of mosaics: read only the ones the sheet shows.
    chosen = {it: storage.read_bytes(storage.join(folder, f"iter-{it:06d}.png")) for it in evenly_spaced(written)}
    if chosen:
        storage.write_bytes_atomic(storage.join(folder, "contact-sheet.png"), contact_sheet_png(chosen))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    with BackgroundWriter() as writer:  # rank 0's mosaics and log writes, drained on the way out, failed or not
        _train(config, writer)


def _train(config: dict[str, Any], writer: BackgroundWriter) -> None:
    cfg = from_dict(GanConfig, config).validate()
    session = Session.current(storage.join(cfg.storage, cfg.name), cfg.scale.gpu, cfg.scale.keep_checkpoints)
    image_size = read_manifest(cfg.data.data).image.size
    nets, start, fixed = _build(cfg, session, image_size)
    noise = torch.Generator(session.device)
    rank0 = session.rank == 0
    log = RunLog(session.run_dir, to_dict(cfg), start + 1, position="iteration", writer=writer) if rank0 else None
    evaluation = _Evaluation(cfg, session) if cfg.schedule.eval_every else None
    sched, total, every = cfg.schedule, cfg.optim.iterations, cfg.scale.preemption_check_every
    reals = real_batches(cfg, session.rank, session.world_size, session.device)
    losses, metrics = _Losses(), {}
    for iteration in range(start + 1, total + 1):
        _reseed(cfg, session, noise, iteration)
        losses.add(gan_step(cfg, nets, next(reals).to(session.device, non_blocking=True), noise, iteration))
        last = iteration == total
        # A drain notice (a collective: every rank checks at the same iterations) checkpoints at once.
        preempted = bool(every) and iteration % every == 0 and session.preemption_pending()
        checkpoint_now = _due(sched.checkpoint_every, iteration, last) or preempted
        eval_now = evaluation is not None and _due(sched.eval_every, iteration, last)
        mosaic_now = rank0 and _due(sched.mosaic_every, iteration, last)
        if not (checkpoint_now or eval_now or mosaic_now or _due(sched.log_every, iteration, last)):
            continue
        metrics = {"iteration": iteration, "step": iteration, **losses.means()}
        painter = _painter(cfg, nets) if eval_now or mosaic_now or (checkpoint_now and rank0) else None
        if preempted:
            metrics["preemption_checkpoint"] = True
        if eval_now:
            metrics.update(evaluation(painter))
        if mosaic_now:
            with torch.no_grad():
                faces = to_uint8(painter(fixed.to(session.device)).float()).cpu()
            uri = storage.join(session.run_dir, "mosaics", f"iter-{iteration:06d}.png")
            writer.submit(uri, _write_mosaic, uri, faces)  # PNG and upload off the loop: the other ranks do not wait
        if checkpoint_now:
            metrics["ranks_in_sync"] = ranks_in_sync([nets.G, nets.D, nets.ema], session)
            if not metrics["ranks_in_sync"]:
                raise RuntimeError(
                    f"iteration {iteration}: the ranks' G/D/EMA weights differ; DDP lost sync, not checkpointing a diverged model"
                )
        if log is not None:
            log.log(metrics, flush=checkpoint_now or eval_now)
            if checkpoint_now or eval_now:
                print(_progress_line(metrics, total), flush=True)
        if checkpoint_now or eval_now:  # every rank reports together; Tune's schedulers see the metrics
            # bf16 autocast needs no gradient scaler, so there is no scaler state to keep.
            state = (
                {
                    **nets.state(),
                    "iteration": iteration,
                    "step": iteration,
                    "image_size": image_size,
                    "fixed_latents": fixed,
                    "config": to_dict(cfg),
                }
                if checkpoint_now and rank0
                else None
            )
            # The last and preemption checkpoints are in storage when this returns; the others upload while training goes on.
            session.report(
                with_ray_score(metrics) if checkpoint_now else metrics, state, background=not (last or preempted)
            )
    if log is not None and metrics:  # nothing to finish when the run was already at --iterations
        _finish(session, log, metrics)
