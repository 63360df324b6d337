"""The GAN's per-worker loop: iteration-based, both networks under DDP, plain PyTorch.

Each iteration has two phases, written so that DDP never sees an unused parameter and gradients
sync once per phase: (1) D learns on real and generated faces, G runs without gradients; (2) G
learns through D's plain module with D's parameters frozen, so no D gradient is computed or synced.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deeprecognition import storage
from deeprecognition.checkpoint import restore_rng, rng_state
from deeprecognition.config import GanConfig, from_dict, to_dict
from deeprecognition.generate import contact_sheet_png, draw_faces, evenly_spaced, grid_png
from deeprecognition.loops.gan_data import real_batches, reference_faces
from deeprecognition.loops.session import Session
from deeprecognition.models.gan import build_gan, d_loss, draws_with_ema, ema_copy, ema_decay_at, g_loss, to_tanh_range, to_uint8, update_ema
from deeprecognition.report import RunLog
from deeprecognition.shards.manifest import read_manifest

MOSAIC = 36  # the study's 6x6 grid
EVAL_SEED = 1234  # the same latents at every evaluation: metrics move with the model only


def _unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def _optimizer(cfg: GanConfig, params, lr: float) -> torch.optim.Optimizer:
    if cfg.optim.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(cfg.optim.beta1, cfg.optim.beta2))
    return torch.optim.RMSprop(params, lr=lr)


def _clip(module: nn.Module, limit: float) -> None:
    if limit > 0:
        nn.utils.clip_grad_norm_(module.parameters(), limit)


def gan_step(cfg: GanConfig, nets: dict[str, Any], real: torch.Tensor, noise: torch.Generator, iteration: int) -> dict[str, float]:
    G, D, opt_g, opt_d = nets["G"], nets["D"], nets["opt_g"], nets["opt_d"]
    plain_d = _unwrap(D)
    batch, device = real.shape[0], real.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    # (1) Update D: real faces vs generated ones (G without gradients)
    with torch.no_grad(), autocast:
        fake = G(torch.randn(batch, cfg.model.latent, device=device, generator=noise))
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
        loss_g = g_loss(plain_d(G(torch.randn(batch, cfg.model.latent, device=device, generator=noise))).float(), cfg.model.loss)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    plain_d.requires_grad_(True)
    _clip(G, cfg.optim.clip)
    opt_g.step()
    update_ema(nets["ema"], G, ema_decay_at(cfg.model.ema_decay, iteration))
    return {"loss/d": loss_d.item(), "loss/g": loss_g.item()}


def _state(cfg: GanConfig, nets: dict[str, Any], iteration: int, fixed: torch.Tensor, image_size: int) -> dict[str, Any]:
    # bf16 autocast needs no gradient scaler, so there is no scaler state to keep.
    return {
        "G": _unwrap(nets["G"]).state_dict(),
        "D": _unwrap(nets["D"]).state_dict(),
        "ema": nets["ema"].state_dict(),
        "opt_g": nets["opt_g"].state_dict(),
        "opt_d": nets["opt_d"].state_dict(),
        "iteration": iteration,
        "step": iteration,
        "image_size": image_size,
        "rng": rng_state(),
        "fixed_latents": fixed,
        "config": to_dict(cfg),
    }


def make_nets(cfg: GanConfig, image_size: int, device: torch.device) -> dict[str, Any]:
    """G, D, G's EMA copy and both optimisers, freshly initialised from the run's seed."""
    torch.manual_seed(cfg.optim.seed)
    G, D = (m.to(device) for m in build_gan(cfg.model.arch, cfg.model.latent, image_size, cfg.model.width))
    nets: dict[str, Any] = {"G": G, "D": D, "ema": ema_copy(G)}
    nets["opt_g"] = _optimizer(cfg, G.parameters(), cfg.optim.lr_g)
    nets["opt_d"] = _optimizer(cfg, D.parameters(), cfg.optim.lr_d)
    return nets


def _build(cfg: GanConfig, session: Session, image_size: int) -> tuple[dict[str, Any], int, torch.Tensor]:
    """Networks, optimisers and EMA, restored from the latest checkpoint when there is one."""
    nets = make_nets(cfg, image_size, session.device)
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


def _noise(cfg: GanConfig, session: Session, start: int) -> torch.Generator:
    """Each rank draws its own latents (the same ones would waste the ranks' generated halves),
    reproducibly from (seed, rank, the iteration the process starts at)."""
    return torch.Generator(session.device).manual_seed(cfg.optim.seed * 1_000_003 + session.rank * 10_007 + start)


def _painter(cfg: GanConfig, nets: dict[str, Any]) -> nn.Module:
    return nets["ema"] if draws_with_ema(cfg.model.arch) else _unwrap(nets["G"])


def ranks_in_sync(nets: dict[str, Any], session: Session) -> bool:
    """Whether every rank holds the same G, D and EMA weights (a collective: all ranks call it).
    Buffers are left out: BatchNorm statistics follow each rank's own batches between syncs."""
    if session.world_size == 1:
        return True
    fingerprint = torch.stack([p.detach().double().sum() for key in ("G", "D", "ema") for p in _unwrap(nets[key]).parameters()])
    gathered = [torch.empty_like(fingerprint) for _ in range(session.world_size)]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


class _Evaluation:
    """Rank 0's FID/KID and attribute rates every schedule.eval_every iterations."""

    def __init__(self, cfg: GanConfig, device: torch.device) -> None:
        from deeprecognition.gan_eval import GanEvaluator, pick_extractor
        from deeprecognition.trained import TrainedClassifier

        classifier = TrainedClassifier.load(cfg.eval.classifier, device) if cfg.eval.classifier else None
        extractor = pick_extractor(cfg.eval.inception_weights, classifier, device)
        real = reference_faces(cfg, cfg.eval.samples, device)
        self.evaluator = GanEvaluator(extractor, real.images, classifier)
        self.samples = cfg.eval.samples
        print(f"evaluating every {cfg.schedule.eval_every} iterations on {len(real.keys)} real faces; features: {extractor.name}", flush=True)

    def __call__(self, painter: nn.Module, latent: int) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):  # KID's subsets must not move the training RNG
            return self.evaluator(draw_faces(painter, latent, self.samples, EVAL_SEED))


def _eval_scalars(result: dict[str, Any]) -> dict[str, float]:
    """What goes into metrics.jsonl, TensorBoard and the reports Tune's schedulers see."""
    scalars = {key: result[key] for key in ("fid", "kid")}
    scalars.update({f"rate/{name}": rate for name, rate in result["attribute_rate"].items()})
    scalars.update({f"data_rate/{name}": rate for name, rate in result["data_attribute_rate"].items()})
    return scalars


def _progress_line(metrics: dict[str, Any], total: int) -> str:
    line = f"iteration {metrics['iteration']}/{total}  loss D {metrics['loss/d']:.4f}  G {metrics['loss/g']:.4f}"
    if "fid" in metrics:
        line += f"  FID {metrics['fid']:.2f}  KID {metrics['kid']:.4f}"
    return line


def _finish(session: Session, log: RunLog, last: dict[str, Any]) -> None:
    """Rank 0: the metrics log, the final metrics as report.json, the mosaics' contact sheet."""
    log.flush()
    storage.write_bytes_atomic(storage.join(session.run_dir, "report.json"), json.dumps(last, indent=1).encode())
    folder = storage.join(session.run_dir, "mosaics")
    written = [int(n[5:-4]) for n in storage.list_names(folder) if n.startswith("iter-")]
    # A long run writes thousands of mosaics: read only the ones the sheet shows.
    chosen = {it: storage.read_bytes(storage.join(folder, f"iter-{it:06d}.png")) for it in evenly_spaced(written)}
    if chosen:
        storage.write_bytes_atomic(storage.join(folder, "contact-sheet.png"), contact_sheet_png(chosen))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = from_dict(GanConfig, config).validate()
    session = Session.current(storage.join(cfg.storage, cfg.name), cfg.scale.gpu, cfg.scale.keep_checkpoints)
    image_size = read_manifest(cfg.data.data).image.size
    nets, start, fixed = _build(cfg, session, image_size)
    noise = _noise(cfg, session, start)
    rank0 = session.rank == 0
    log = RunLog(session.run_dir, to_dict(cfg), start + 1, position="iteration") if rank0 else None
    evaluation = _Evaluation(cfg, session.device) if rank0 and cfg.schedule.eval_every else None
    sched, total, every = cfg.schedule, cfg.optim.iterations, cfg.scale.preemption_check_every
    reals = real_batches(cfg, session.rank, session.world_size, session.device)
    metrics: dict[str, Any] = {}
    for iteration in range(start + 1, total + 1):
        metrics = {"iteration": iteration, "step": iteration, **gan_step(cfg, nets, next(reals).to(session.device, non_blocking=True), noise, iteration)}
        last = iteration == total
        # A drain notice (a collective: every rank checks at the same iterations) checkpoints at once.
        preempted = bool(every) and iteration % every == 0 and session.preemption_pending()
        checkpoint_now = iteration % sched.checkpoint_every == 0 or last or preempted
        if preempted:
            metrics["preemption_checkpoint"] = True
        eval_now = bool(sched.eval_every) and (iteration % sched.eval_every == 0 or last)
        if evaluation is not None and eval_now:
            metrics.update(_eval_scalars(evaluation(_painter(cfg, nets), cfg.model.latent)))
        if rank0 and (iteration % sched.mosaic_every == 0 or last):
            with torch.no_grad():
                faces = to_uint8(_painter(cfg, nets)(fixed.to(session.device)).float())
            storage.write_bytes_atomic(storage.join(session.run_dir, "mosaics", f"iter-{iteration:06d}.png"), grid_png(faces))
        if checkpoint_now:
            metrics["ranks_in_sync"] = ranks_in_sync(nets, session)
            if not metrics["ranks_in_sync"]:
                raise RuntimeError(f"iteration {iteration}: the ranks' G/D/EMA weights differ; DDP lost sync, not checkpointing a diverged model")
        if log is not None and (iteration % sched.log_every == 0 or checkpoint_now or eval_now):
            log.log(metrics, flush=checkpoint_now or eval_now)
            if checkpoint_now or eval_now:
                print(_progress_line(metrics, total), flush=True)
        if checkpoint_now or eval_now:  # every rank reports together; Tune's schedulers see the metrics
            session.report(metrics, _state(cfg, nets, iteration, fixed, image_size) if checkpoint_now and rank0 else None)
    if log is not None and metrics:  # nothing to finish when the run was already at --iterations
        _finish(session, log, metrics)
