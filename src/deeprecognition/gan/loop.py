"""The GAN's per-worker loop: iteration-based, both networks under DDP, plain PyTorch.

Each iteration is one `gan_step` (gan/step.py): optim.n_dis D steps, each on its own real batch,
then one G step, written so that DDP never sees an unused parameter. Evaluation (FID/KID, attribute
rates) runs on every rank together; mosaics are rank 0's.

The loop: build the networks (`_build`), continue from the latest checkpoint (`resume_latest`), set up
DDP, the data and the log (`_setup`), then per iteration one step (`_train_iteration`), what the
schedule asks for at it (`due_at`, a `Due`) and that work (`_at_due`); at the end rank 0's report
(`_finish`). What a checkpoint holds is a `GanState`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from deeprecognition import storage
from deeprecognition.config import GanConfig, from_dict, to_dict
from deeprecognition.gan.conditions import MOSAIC_SIDE, LabelBank, mosaic_labels, mosaic_rows
from deeprecognition.gan.data import real_batches
from deeprecognition.gan.generate import mosaic_name, write_contact_sheet, write_mosaic
from deeprecognition.gan.metrics import TrainingEvaluation
from deeprecognition.gan.models import draws_with_ema, standing_statistics, to_uint8
from deeprecognition.gan.step import GanNets, gan_step, generated, hyperparameters, make_nets
from deeprecognition.runs.background import BackgroundWriter
from deeprecognition.runs.catalog import with_ray_score
from deeprecognition.runs.distributed import data_parallel, unwrap
from deeprecognition.runs.report import RunLog
from deeprecognition.runs.resume import apply_hyperparameters, resume_latest, seed_rank_streams, stream_seed
from deeprecognition.runs.session import Session
from deeprecognition.shards.loader import Batch, parse_where
from deeprecognition.shards.manifest import read_manifest

MOSAIC = 36  # the study's 6x6 grid
# The EMA generator's standing statistics: over these many seeded draws (and labels, conditional).
STANDING_SAMPLES, STANDING_SEED = 512, 0
NOISE_STREAM = 2  # stream_seed's stream of the latents G draws in training


@dataclass
class GanState:
    """What a checkpoint holds; `iteration` counts the iterations done."""

    cfg: GanConfig
    nets: GanNets
    image_size: int
    fixed: Tensor  # the same 36 latent vectors for every mosaic of the run, as the study did
    fixed_labels: Tensor | None = None  # conditional: the mosaic's 36 label vectors, row by row
    iteration: int = 0

    def saved(self) -> dict[str, Any]:
        # bf16 autocast needs no gradient scaler, so there is no scaler state to keep.
        return {
            **self.nets.state(),
            "iteration": self.iteration,
            "step": self.iteration,
            "image_size": self.image_size,
            "fixed_latents": self.fixed,
            "config": to_dict(self.cfg),
            **self._conditions(),
        }

    def _conditions(self) -> dict[str, Any]:
        """A conditional model's mosaic labels and the label vectors it draws from: `deeprec
        generate` needs the data's joint distribution without the data."""
        if self.nets.bank is None:
            return {}
        return {"fixed_labels": self.fixed_labels, "label_bank": self.nets.bank.saved()}

    def restore(self, saved: dict[str, Any]) -> list[str]:
        """Continue from the checkpoint `saved`, with the optimiser hyperparameters the config asks
        for now; returns what those change."""
        self.nets.load(saved)
        optim = self.cfg.optim
        changed_g = apply_hyperparameters(self.nets.opt_g, hyperparameters(self.cfg, optim.lr_g), "G")
        changed_d = apply_hyperparameters(self.nets.opt_d, hyperparameters(self.cfg, optim.lr_d), "D")
        self.iteration, self.fixed = saved["iteration"], saved["fixed_latents"]
        self.fixed_labels = saved.get("fixed_labels")
        return changed_g + changed_d


@dataclass(frozen=True)
class Due:
    """What an iteration calls for beside its training step."""

    checkpoint: bool  # every rank reports; rank 0's state becomes the checkpoint
    evaluate: bool  # FID/KID and attribute rates, by every rank together
    mosaic: bool  # rank 0's
    log: bool  # a metrics line
    preempted: bool  # a drain notice: checkpoint now
    last: bool

    @property
    def anything(self) -> bool:
        return self.checkpoint or self.evaluate or self.mosaic or self.log

    @property
    def report(self) -> bool:
        """Every rank reports together (Tune's schedulers see the metrics), rank 0 prints a line."""
        return self.checkpoint or self.evaluate

    @property
    def in_background(self) -> bool:
        """The last and preemption checkpoints are in storage when the report returns; the others
        upload while training goes on."""
        return not (self.last or self.preempted)


def due_at(cfg: GanConfig, session: Session, iteration: int) -> Due:
    """What the schedule asks for at `iteration`, and whether a drain notice came (every rank calls this)."""
    sched, last = cfg.schedule, iteration == cfg.optim.iterations
    every = cfg.scale.preemption_check_every
    # A drain notice (a collective: every rank checks at the same iterations) checkpoints at once.
    preempted = bool(every) and iteration % every == 0 and session.preemption_pending()
    return Due(
        checkpoint=_every(sched.checkpoint_every, iteration, last) or preempted,
        evaluate=bool(sched.eval_every) and _every(sched.eval_every, iteration, last),
        mosaic=session.rank == 0 and _every(sched.mosaic_every, iteration, last),
        log=_every(sched.log_every, iteration, last),
        preempted=preempted,
        last=last,
    )


def _every(every: int, iteration: int, last: bool) -> bool:
    """Every `every` iterations and at the last; 0: at the last only."""
    return last or (every > 0 and iteration % every == 0)


def ranks_in_sync(modules: list[nn.Module], session: Session) -> bool:
    """Whether every rank holds the same weights in `modules` (a collective: all ranks call it).
    Buffers are left out: BatchNorm statistics follow each rank's own batches between syncs."""
    if session.world_size == 1:
        return True
    fingerprint = torch.stack([p.detach().double().sum() for m in modules for p in unwrap(m).parameters()])
    gathered = [torch.empty_like(fingerprint) for _ in range(session.world_size)]
    dist.all_gather(gathered, fingerprint)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


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


@dataclass
class _Run:
    """What the phases share beside the state: the config, the session, the data and rank 0's outputs."""

    cfg: GanConfig
    session: Session
    writer: BackgroundWriter  # rank 0's mosaics and log writes
    log: RunLog | None  # rank 0's
    evaluation: TrainingEvaluation | None  # with schedule.eval_every
    reals: Iterator[Batch]  # this rank's real faces (and their labels), a batch at a time
    noise: torch.Generator  # the latents G draws in training
    losses: _Losses


def train_loop_per_worker(config: dict[str, Any]) -> None:
    with BackgroundWriter() as writer:  # rank 0's mosaics and log writes, drained on the way out, failed or not
        _train(config, writer)


def _train(config: dict[str, Any], writer: BackgroundWriter) -> None:
    cfg = from_dict(GanConfig, config).validate()
    session = Session.current(storage.join(cfg.storage, cfg.name), cfg.scale.gpu, cfg.scale.keep_checkpoints)
    state = _build(cfg, session, read_manifest(cfg.data.data).image.size)
    resume_latest(state, session, lambda: f"from iteration {state.iteration}")
    run = _setup(state, session, writer)
    metrics: dict[str, Any] = {}
    for iteration in range(state.iteration + 1, cfg.optim.iterations + 1):
        _train_iteration(run, state, iteration)
        due = due_at(cfg, session, iteration)
        if due.anything:
            metrics = _at_due(run, state, due)
    if run.log is not None and metrics:  # nothing to finish when the run was already at --iterations
        _finish(session, run.log, metrics)


def _build(cfg: GanConfig, session: Session, image_size: int) -> GanState:
    """Networks, optimisers and EMA, initialised from the run's seed, and the mosaics' latents; a
    conditional model's label bank and mosaic labels: rows of requested conditions (gan/conditions.py)
    over six latents, one per column, so each column is one face asked for each row's attributes."""
    attributes = cfg.condition_attributes()
    bank = LabelBank.of_dataset(cfg.data.data, parse_where(cfg.data.where), attributes) if attributes else None
    nets = make_nets(cfg, image_size, session.device, bank)
    draw = torch.Generator().manual_seed(cfg.optim.seed)
    if bank is None:
        return GanState(cfg, nets, image_size, torch.randn(MOSAIC, cfg.model.latent, generator=draw))
    columns = torch.randn(MOSAIC_SIDE, cfg.model.latent, generator=draw)
    rows = mosaic_rows(cfg.schedule.mosaic_conditions, attributes)
    if session.rank == 0:
        print(f"mosaic rows: {'; '.join(_named(r) for r in rows)}", flush=True)
    return GanState(cfg, nets, image_size, columns.repeat(MOSAIC_SIDE, 1), mosaic_labels(bank, rows, cfg.optim.seed))


def _named(conditions: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in conditions.items()) or "drawn from the data"


def _setup(state: GanState, session: Session, writer: BackgroundWriter) -> _Run:
    """G and D under DDP, this rank's data and noise, rank 0's log, the evaluation when scheduled."""
    cfg, nets = state.cfg, state.nets
    nets.G, nets.D = (data_parallel(m, session.device, session.world_size) for m in (nets.G, nets.D))
    noise = torch.Generator(session.device)
    log = (
        RunLog(session.run_dir, to_dict(cfg), state.iteration + 1, position="iteration", writer=writer)
        if session.rank == 0
        else None
    )
    evaluation = TrainingEvaluation(cfg, session, nets.bank) if cfg.schedule.eval_every else None
    reals = real_batches(cfg, session.rank, session.world_size, session.device)
    return _Run(cfg, session, writer, log, evaluation, reals, noise, _Losses())


def _train_iteration(run: _Run, state: GanState, iteration: int) -> None:
    """Each rank's streams for `iteration` (see runs/resume.py): its label noise, DiffAugment's draws
    and its own latents (the same latents on every rank would waste the ranks' generated halves);
    then one step on optim.n_dis fresh real batches, one per D step (every rank takes as many)."""
    cfg, session = run.cfg, run.session
    seed_rank_streams(cfg.optim.seed, session.rank, iteration, session.device)
    run.noise.manual_seed(stream_seed(cfg.optim.seed, session.rank, iteration, NOISE_STREAM))
    batches = [next(run.reals) for _ in range(cfg.optim.n_dis)]
    reals = [b.images.to(session.device, non_blocking=True) for b in batches]
    labels = [b.targets.to(session.device).float() for b in batches] if state.nets.bank is not None else None
    run.losses.add(gan_step(cfg, state.nets, reals, run.noise, iteration, labels))
    state.iteration = iteration


def _at_due(run: _Run, state: GanState, due: Due) -> dict[str, Any]:
    """What `due` asks for, in an order every rank keeps (evaluation, the sync check and the report
    are collectives); returns the iteration's metrics line."""
    rank0 = run.session.rank == 0
    metrics = {"iteration": state.iteration, "step": state.iteration, **run.losses.means()}
    # Rank 0 paints before a checkpoint too: the EMA's BatchNorm statistics it saves are then its own.
    painter = _painter(run.cfg, state.nets) if due.evaluate or due.mosaic or (due.checkpoint and rank0) else None
    if due.preempted:
        metrics["preemption_checkpoint"] = True
    if due.evaluate:
        metrics.update(run.evaluation(painter))
    if due.mosaic:
        _write_mosaic_later(run, state, painter)
    if due.checkpoint:
        metrics["ranks_in_sync"] = ranks_in_sync([state.nets.G, state.nets.D, state.nets.ema], run.session)
        if not metrics["ranks_in_sync"]:
            raise RuntimeError(
                f"iteration {state.iteration}: the ranks' G/D/EMA weights differ; "
                "DDP lost sync, not checkpointing a diverged model"
            )
    if run.log is not None:
        run.log.log(metrics, flush=due.report)
        if due.report:
            print(_progress_line(metrics, run.cfg.optim.iterations), flush=True)
    if due.report:
        saved = state.saved() if due.checkpoint and rank0 else None
        run.session.report(with_ray_score(metrics) if due.checkpoint else metrics, saved, due.in_background)
    return metrics


def _painter(cfg: GanConfig, nets: GanNets) -> nn.Module:
    """The generator mosaics, evaluations and checkpoints show: the EMA copy (dcgan, resnet), with BatchNorm
    statistics measured for its own weights, or G itself (the study's model, as the study did)."""
    if not draws_with_ema(cfg.model.arch):
        return unwrap(nets.G)
    labels = nets.bank.draw(STANDING_SAMPLES, {}, STANDING_SEED).labels if nets.bank is not None else None
    standing_statistics(nets.ema, cfg.model.latent, STANDING_SAMPLES, seed=STANDING_SEED, labels=labels)
    return nets.ema


def _write_mosaic_later(run: _Run, state: GanState, painter: nn.Module) -> None:
    """Rank 0: the fixed latents' faces, turned into a PNG and uploaded off the loop (the other
    ranks do not wait)."""
    labels = state.fixed_labels.to(run.session.device) if state.fixed_labels is not None else None
    with torch.no_grad():
        faces = to_uint8(generated(painter, state.fixed.to(run.session.device), labels).float()).cpu()
    uri = storage.join(run.session.run_dir, "mosaics", mosaic_name(state.iteration))
    run.writer.submit(uri, write_mosaic, uri, faces)


def _progress_line(metrics: dict[str, Any], total: int) -> str:
    line = f"iteration {metrics['iteration']}/{total}  loss D {metrics['loss/d']:.4f}  G {metrics['loss/g']:.4f}"
    if "fid" in metrics:
        line += f"  FID {metrics['fid']:.2f}  KID {metrics['kid']:.4f}"
    return line


def _finish(session: Session, log: RunLog, last: dict[str, Any]) -> None:
    """Rank 0: the metrics log, the final metrics as report.json, the mosaics' contact sheet."""
    log.finish(last, {})  # drains the background writes first: every mosaic is in storage
    write_contact_sheet(storage.join(session.run_dir, "mosaics"))
