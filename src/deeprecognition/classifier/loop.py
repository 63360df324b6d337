"""The classifier's per-worker training loop: plain PyTorch, under Ray Train or in one process.

Rebuilds the typed config, builds the model (`_build`), continues from the latest checkpoint
(`resume_latest`), builds this rank's loaders and wraps the model in DDP when there are several ranks
(`_setup`), then per epoch trains with Adam and BCE-with-logits, one sigmoid per label
(`_train_epoch`), evaluates, logs and reports, checkpointing when due (`_end_epoch`); at the end it
evaluates on test and writes the report (`_finish`). Images arrive as uint8 and become float on
the device. What a checkpoint holds is a `ClassifierState`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from deeprecognition import storage
from deeprecognition.classifier.evaluate import evaluate, majority_of
from deeprecognition.classifier.feature_cache import FeatureCache
from deeprecognition.classifier.models import InputNorm, build_model
from deeprecognition.classifier.report import report_files
from deeprecognition.config import ClassifierConfig, from_dict, to_dict
from deeprecognition.runs.background import BackgroundWriter
from deeprecognition.runs.distributed import data_parallel, unwrap
from deeprecognition.runs.report import RunLog
from deeprecognition.runs.resume import apply_hyperparameters, resume_latest, seed_rank_streams
from deeprecognition.runs.session import Session
from deeprecognition.shards.device_decode import images_on, require_cuda
from deeprecognition.shards.loader import Batch, make_loader
from deeprecognition.shards.manifest import Manifest, read_manifest

Split = DataLoader | FeatureCache  # a split's Batches: from the shards, or as cached backbone features


@dataclass
class EpochProgress:
    """Where this rank stands inside an epoch. A mid-epoch (preemption) checkpoint saves rank 0's,
    so the resumed run skips the batches already trained and ends the epoch with the same step
    count and the same train metrics as a run that was never interrupted. The sums stay on the
    device while the epoch runs (reading one per step would wait for the GPU)."""

    steps: int = 0
    loss_sum: float | Tensor = 0.0
    correct: float | Tensor = 0.0  # sum over images of the share of labels right
    seen: int = 0

    def add(self, loss: Tensor, right: Tensor, images: int) -> None:
        """One step: its mean `loss` over `images` images and which of their labels were `right` (B, T)."""
        self.steps += 1
        self.loss_sum += loss.double() * images
        self.correct += right.double().mean(1).sum()
        self.seen += images

    def loss(self) -> float:
        return float(self.loss_sum) / max(self.seen, 1)

    def accuracy(self) -> float:
        return float(self.correct) / max(self.seen, 1)

    def saved(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "loss_sum": float(self.loss_sum),
            "correct": float(self.correct),
            "seen": self.seen,
        }


@dataclass
class ClassifierState:
    """What a checkpoint holds. `epoch` is the epoch being trained (or just trained), `step` counts
    every step so far, `progress` is how far into `epoch` they are."""

    cfg: ClassifierConfig
    model: nn.Module  # the plain, whole model (with cached features only its head trains)
    optimizer: torch.optim.Optimizer
    attributes: tuple[str, ...]
    image_size: int  # the model's input side: the CNN's dense layer depends on it
    # The training split's majority answer: the floor of every later evaluation, on any dataset.
    majority: Tensor
    epoch: int = 0
    step: int = 0
    progress: EpochProgress = field(default_factory=EpochProgress)

    def saved(self, mid_epoch: bool = False) -> dict[str, Any]:
        """The checkpoint: `epoch` done, or with `mid_epoch` only `progress` into it."""
        state = {
            "image_size": self.image_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "config": to_dict(self.cfg),
            "attributes": list(self.attributes),
            "majority": self.majority.tolist(),
        }
        if mid_epoch:
            state["epoch_progress"] = self.progress.saved()
        return state

    def restore(self, saved: dict[str, Any]) -> list[str]:
        """Continue from the checkpoint `saved`, with the lr and weight decay the config asks for
        now; returns what those change."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        wanted = {"lr": self.cfg.optim.lr, "weight_decay": self.cfg.optim.weight_decay}
        changed = apply_hyperparameters(self.optimizer, wanted, "optimizer")
        # A mid-epoch checkpoint (written on a preemption notice) finishes its epoch; an epoch's own starts the next.
        mid_epoch = "epoch_progress" in saved
        self.epoch = saved["epoch"] if mid_epoch else saved["epoch"] + 1
        self.progress = EpochProgress(**saved["epoch_progress"]) if mid_epoch else EpochProgress()
        self.step = saved["step"]
        return changed


@dataclass
class _Run:
    """What the phases share beside the state: the config, the session, the data and the log."""

    cfg: ClassifierConfig
    session: Session
    manifest: Manifest
    runner: nn.Module  # what trains: DDP's wrapper when there are several ranks, compiled with optim.compile
    norm: nn.Module  # the loaders' images -> the model's inputs (nothing to do on cached features)
    train: Split
    val: Split
    test: Split
    log: RunLog | None  # rank 0's

    @property
    def plain(self) -> nn.Module:
        """What evaluates: the module inside the runner, never DDP's wrapper (see `evaluate`)."""
        return unwrap(self.runner)


def uses_feature_cache(cfg: ClassifierConfig) -> bool:
    return cfg.model.name == "resnet50" and cfg.model.freeze == "all" and cfg.model.cache_features


def train_loop_per_worker(config: dict[str, Any]) -> None:
    with BackgroundWriter() as writer:  # rank 0's log writes, drained on the way out, failed or not
        _train(config, writer)


def _train(config: dict[str, Any], writer: BackgroundWriter) -> None:
    cfg = from_dict(ClassifierConfig, config).validate()
    session = Session.current(storage.join(cfg.storage, cfg.name), cfg.scale.gpu, cfg.scale.keep_checkpoints)
    require_cuda(cfg.data.decode, session.device)
    manifest = read_manifest(cfg.data.data)
    state = _build(cfg, session, manifest)
    resume_latest(
        state,
        session,
        lambda: f"at epoch {state.epoch} after {state.progress.steps} of its steps ({state.step} steps in all)",
    )
    seed_rank_streams(
        cfg.optim.seed, session.rank, state.step, session.device
    )  # each rank's own dropout masks (runs/resume.py)
    run = _setup(state, session, manifest, writer)
    for epoch in range(state.epoch, cfg.optim.epochs):
        state.epoch = epoch
        run.train.dataset.set_epoch(epoch)
        trained, seconds = _train_epoch(run, state)
        _end_epoch(run, state, images_per_s=trained * session.world_size / seconds if seconds else 0.0)
        state.progress = EpochProgress()  # the next epoch starts at its first batch
    _finish(run, state)


def _build(cfg: ClassifierConfig, session: Session, manifest: Manifest) -> ClassifierState:
    """The model and its optimiser, initialised from the run's seed."""
    attributes = cfg.attributes()
    torch.manual_seed(cfg.optim.seed)  # the same initial weights on every rank
    model = build_model(cfg, len(attributes), manifest.image.size).to(session.device)
    if session.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    return ClassifierState(cfg, model, optimizer, attributes, manifest.image.size, majority_of(manifest, attributes))


def _position(state: ClassifierState) -> str:
    return f"at epoch {state.epoch} after {state.progress.steps} of its steps ({state.step} steps in all)"


def _setup(state: ClassifierState, session: Session, manifest: Manifest, writer: BackgroundWriter) -> _Run:
    """This rank's data, the module that trains on it, and rank 0's log."""
    cfg = state.cfg
    norm: nn.Module = InputNorm(cfg.model.name).to(session.device)
    if uses_feature_cache(cfg):
        train, val, test = _feature_caches(cfg, session, state.model, norm, state.attributes)
        trainee, norm = state.model.head, nn.Identity()
    else:
        train, val, test = _loaders(cfg, session, state.attributes)
        trainee = state.model
    runner = data_parallel(trainee, session.device, session.world_size)
    if cfg.optim.compile:
        runner = torch.compile(runner)
    log = RunLog(session.run_dir, to_dict(cfg), state.epoch, writer=writer) if session.rank == 0 else None
    return _Run(cfg, session, manifest, runner, norm, train, val, test, log)


def _loaders(cfg: ClassifierConfig, session: Session, attributes: tuple[str, ...]) -> tuple[Split, Split, Split]:
    train = make_loader(
        cfg.data.loader("train", attributes, cfg.optim.seed),
        session.rank,
        session.world_size,
        pin_memory=session.device.type == "cuda",
    )
    val, test = (
        make_loader(
            cfg.data.loader(split, attributes, cfg.optim.seed, training=False), session.rank, session.world_size
        )
        for split in ("val", "test")
    )
    return train, val, test


def _feature_caches(
    cfg: ClassifierConfig, session: Session, model: nn.Module, norm: nn.Module, attributes: tuple[str, ...]
) -> tuple[Split, Split, Split]:
    """Train, val and test as cached backbone features (each image through the backbone once)."""
    caches = []
    for split, training in (("train", True), ("val", False), ("test", False)):
        loader = make_loader(
            # Decoded on the CPU whatever data.decode says: FeatureCache moves decoded images; each is read once.
            cfg.data.loader(split, attributes, cfg.optim.seed, training=False, decode="cpu"),
            session.rank,
            session.world_size,
        )
        caches.append(
            FeatureCache.build(
                model, norm, loader, session.device, training, session.world_size, cfg.optim.seed, session.rank
            )
        )
    train, val, test = caches
    return train, val, test


def _train_epoch(run: _Run, state: ClassifierState) -> tuple[int, float]:
    """Train `state.epoch` from `state.progress.steps` on; the images trained and the seconds taken."""
    run.runner.train()
    trained, start = 0, time.perf_counter()
    limit = run.cfg.optim.steps_per_epoch or math.inf
    for index, batch in enumerate(run.train):
        if index >= limit:
            break
        if index < state.progress.steps:  # trained before the mid-epoch checkpoint this run resumed from
            continue
        _train_step(run, state, batch)
        trained += len(batch.keys)
        _after_step(run, state)
    if run.session.device.type == "cuda":  # the steps were only queued: time them done
        torch.cuda.synchronize(run.session.device)
    return trained, time.perf_counter() - start


def _train_step(run: _Run, state: ClassifierState, batch: Batch) -> None:
    device = run.session.device
    images = run.norm(images_on(batch.images, device))
    targets = batch.targets.to(device, non_blocking=True).float()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = run.runner(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.step += 1
    state.progress.add(loss.detach(), (logits.detach() > 0) == (targets > 0), len(batch.keys))


def _after_step(run: _Run, state: ClassifierState) -> None:
    """The next step's random streams; on a drain notice, a mid-epoch checkpoint at once (at most
    the steps after it are lost). The check is a collective: every rank makes it at the same steps."""
    cfg, session = run.cfg, run.session
    seed_rank_streams(cfg.optim.seed, session.rank, state.step, session.device)
    every = cfg.scale.preemption_check_every
    if every and state.step % every == 0 and session.preemption_pending():
        notice = {
            "epoch": state.epoch,
            "step": state.step,
            "world_size": session.world_size,
            "preemption_checkpoint": True,
        }
        _checkpoint(run, state, notice, mid_epoch=True)


def _end_epoch(run: _Run, state: ClassifierState, images_per_s: float) -> None:
    """Evaluate on val (every rank), print and log the epoch (rank 0), report it (every rank), with
    a checkpoint every optim.checkpoint_every epochs and at the last."""
    metrics = _epoch_metrics(run, state, _evaluate(run, state, run.val), images_per_s)
    if run.session.rank == 0:
        print(_epoch_line(metrics, run.cfg.optim.epochs), flush=True)
    if run.log is not None:
        run.log.log(metrics)
    last = state.epoch == run.cfg.optim.epochs - 1
    if last or (state.epoch + 1) % run.cfg.optim.checkpoint_every == 0:
        _checkpoint(run, state, metrics, background=not last)  # the last one is in storage when fit() returns
    else:  # every epoch's metrics still reach Ray, and Tune's schedulers
        run.session.report(metrics, None, background=True)


def _epoch_metrics(run: _Run, state: ClassifierState, val: dict[str, Any], images_per_s: float) -> dict[str, Any]:
    return {
        "epoch": state.epoch,
        "step": state.step,
        "world_size": run.session.world_size,  # shows an elastic run shrinking or growing
        "train/loss": state.progress.loss(),
        "train/mean_accuracy": state.progress.accuracy(),
        "train/images_per_s": images_per_s,
        "val/mean_accuracy": val["mean_accuracy"],
        "val/exact_match": val["exact_match"],
        "val/mean_majority_baseline": val["mean_majority_baseline"],
        **{f"val/acc/{name}": acc for name, acc in val["accuracy"].items()},
    }


def _epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    return (
        f"epoch {metrics['epoch'] + 1}/{epochs}  loss {metrics['train/loss']:.4f}  "
        f"val acc {metrics['val/mean_accuracy']:.4f} (majority {metrics['val/mean_majority_baseline']:.4f})  "
        f"{metrics['train/images_per_s']:.0f} img/s"
    )


def _checkpoint(
    run: _Run, state: ClassifierState, metrics: dict[str, Any], background: bool = False, mid_epoch: bool = False
) -> None:
    """Every rank reports; rank 0's state is the checkpoint (uploaded while training goes on with `background`)."""
    run.session.report(metrics, state.saved(mid_epoch) if run.session.rank == 0 else None, background)


def _evaluate(run: _Run, state: ClassifierState, split: Split) -> dict[str, Any]:
    return evaluate(run.plain, run.norm, split, state.attributes, state.majority, run.session.device)


def _finish(run: _Run, state: ClassifierState) -> None:
    """The final evaluation (every rank) and rank 0's report."""
    # A dataset packed from a partial CelebA copy may have no test images: report on val then.
    split, loader = ("test", run.test) if run.manifest.splits["test"].samples else ("val", run.val)
    final = _evaluate(run, state, loader)
    if run.log is not None:
        title = f"{run.cfg.name}: {run.cfg.data.task} on {split} ({final['samples']} images)"
        run.log.finish(final, report_files(final, title, run.log.history))
