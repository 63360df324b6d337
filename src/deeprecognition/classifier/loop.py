"""The classifier's per-worker training loop: plain PyTorch, under Ray Train or in one process.

Rebuilds the typed config, builds this rank's loaders, wraps the model in DDP when there are several
ranks, trains with Adam and BCE-with-logits (one sigmoid per label), evaluates every epoch, reports
and checkpoints. Images arrive as uint8 and become float on the device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deeprecognition import storage
from deeprecognition.classifier.feature_cache import FeatureCache
from deeprecognition.classifier.metrics import AttributeMetrics, majority_vector
from deeprecognition.config import ClassifierConfig, from_dict, to_dict
from deeprecognition.runs.background import BackgroundWriter
from deeprecognition.runs.distributed import all_sum
from deeprecognition.runs.report import RunLog
from deeprecognition.runs.resume import apply_hyperparameters, seed_rank_streams
from deeprecognition.runs.session import Session
from deeprecognition.shards.device_decode import images_on, require_cuda
from deeprecognition.shards.loader import LoaderConfig, make_loader
from deeprecognition.shards.manifest import Manifest, read_manifest


def build_model(cfg: ClassifierConfig, num_outputs: int, image_size: int) -> nn.Module:
    if cfg.model.name == "cnn":
        from deeprecognition.classifier.cnn import PaperCNN

        return PaperCNN(layers=cfg.model.layers, num_outputs=num_outputs, image_size=image_size, dense=cfg.model.dense)
    from deeprecognition.classifier.transfer import ResNet50Transfer, load_backbone_weights

    model = ResNet50Transfer(num_outputs=num_outputs, freeze=cfg.model.freeze, head_width=cfg.model.head_width)
    weights = load_backbone_weights(cfg.model.weights)
    if weights is not None:
        model.backbone.load_state_dict(weights)
    return model


class InputNorm(nn.Module):
    """uint8 (B, 3, H, W) -> float, normalised on the device: the CPU only decodes JPEGs."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        if model_name == "resnet50":
            from deeprecognition.classifier.transfer import IMAGENET_MEAN, IMAGENET_STD

            mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        else:  # the study's rescale to [0, 1]
            mean, std = torch.zeros(3), torch.ones(3)
        self.register_buffer("scale", (1 / (255 * std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale + self.shift


def _loaders(cfg: ClassifierConfig, session: Session, attributes: tuple[str, ...]):
    common = dict(
        data=cfg.data.data,
        targets=attributes,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.loader_workers,
        seed=cfg.optim.seed,
        cache=cfg.data.cache,
        cache_gb=cfg.data.cache_gb,
        decode=cfg.data.decode,
    )
    train = make_loader(
        LoaderConfig(split="train", sampling=cfg.data.sampling, **common),
        session.rank,
        session.world_size,
        pin_memory=session.device.type == "cuda",
    )
    val, test = (
        make_loader(LoaderConfig(split=split, training=False, **common), session.rank, session.world_size)
        for split in ("val", "test")
    )
    return train, val, test


def majority_of(manifest: Manifest, attributes: tuple[str, ...]) -> torch.Tensor | None:
    """Each label's majority class in the train split: the floor every metric is shown with (the
    training loop stores it in every checkpoint); None for a dataset without training images."""
    shards = manifest.shards("train")
    if not shards:
        return None
    counts = torch.tensor([s.attribute_counts for s in shards]).sum(0)
    return majority_vector(counts[[manifest.attributes.index(a) for a in attributes]], manifest.splits["train"].samples)


def evaluate(
    model: nn.Module,
    norm: nn.Module,
    loader,
    attributes: tuple[str, ...],
    majority: torch.Tensor | None,
    device: torch.device,
) -> dict[str, Any]:
    """Metrics over the whole split, summed over every rank: every rank calls it, with or without
    batches of its own. `model` is the plain module, never DDP's wrapper, whose first forward after
    training broadcasts buffers from rank 0, a collective that a rank without batches never joins."""
    metrics = AttributeMetrics(attributes, majority, device)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            logits = model(norm(images_on(batch.images, device)))
            metrics.update(logits.float(), batch.targets.to(device, non_blocking=True))
    return AttributeMetrics.from_counts(attributes, all_sum(metrics.counts()).cpu(), majority).compute()


@dataclass
class EpochProgress:
    """Where this rank stands inside an epoch. A mid-epoch (preemption) checkpoint saves rank 0's,
    so the resumed run skips the batches already trained and ends the epoch with the same step
    count and the same train metrics as a run that was never interrupted. The sums stay on the
    device while the epoch runs (reading one per step would wait for the GPU)."""

    steps: int = 0
    loss_sum: float | torch.Tensor = 0.0
    correct: float | torch.Tensor = 0.0  # sum over images of the share of labels right
    seen: int = 0

    def saved(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "loss_sum": float(self.loss_sum),
            "correct": float(self.correct),
            "seen": self.seen,
        }


def _train_epoch(
    model,
    norm,
    loader,
    optimizer,
    cfg: ClassifierConfig,
    device: torch.device,
    progress: EpochProgress,
    after_step: Callable[[], None],
) -> tuple[int, float]:
    """Train one epoch from `progress.steps` on, updating `progress`; images trained and seconds."""
    model.train()
    loss_fn = nn.BCEWithLogitsLoss()
    trained, start = 0, time.perf_counter()
    limit = cfg.optim.steps_per_epoch or math.inf
    for index, batch in enumerate(loader):
        if index >= limit:
            break
        if index < progress.steps:  # trained before the mid-epoch checkpoint this run resumed from
            continue
        images = norm(images_on(batch.images, device))
        targets = batch.targets.to(device, non_blocking=True).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(images).float()
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.steps += 1
        progress.loss_sum += loss.detach().double() * len(batch.keys)
        progress.correct += ((logits.detach() > 0) == (targets > 0)).double().mean(1).sum()
        progress.seen += len(batch.keys)
        trained += len(batch.keys)
        after_step()
    if device.type == "cuda":  # the steps were only queued: time them done
        torch.cuda.synchronize(device)
    return trained, time.perf_counter() - start


def _state(
    cfg: ClassifierConfig,
    model: nn.Module,
    optimizer,
    epoch: int,
    step: int,
    attributes: tuple[str, ...],
    image_size: int,
    majority: torch.Tensor,
    progress: EpochProgress | None = None,
) -> dict[str, Any]:
    """`epoch` done (its `step` counts every step so far), or with `progress` only that far into it."""
    state = {
        "image_size": image_size,  # the model's input side: the CNN's dense layer depends on it
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": to_dict(cfg),
        "attributes": list(attributes),
        # The training split's majority answer: the floor of every later evaluation, on any dataset.
        "majority": majority.tolist(),
    }
    if progress is not None:
        state["epoch_progress"] = progress.saved()
    return state


def _resume(cfg: ClassifierConfig, session: Session, model: nn.Module, optimizer) -> tuple[int, int, EpochProgress]:
    """The epoch to start at, the steps so far, and how far into that epoch the latest checkpoint is."""
    state = session.latest_state()
    if state is None:
        return 0, 0, EpochProgress()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    changed = apply_hyperparameters(
        optimizer, {"lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}, "optimizer"
    )
    # A mid-epoch checkpoint (written on a preemption notice) finishes its epoch; an epoch's own starts the next.
    epoch, progress = (
        (state["epoch"], EpochProgress(**state["epoch_progress"]))
        if "epoch_progress" in state
        else (state["epoch"] + 1, EpochProgress())
    )
    if session.rank == 0:
        print(
            f"resuming at epoch {epoch} after {progress.steps} of its steps ({state['step']} steps in all)"
            + (f"; the config changes {', '.join(changed)}" if changed else ""),
            flush=True,
        )
    return epoch, state["step"], progress


def _feature_caches(
    cfg: ClassifierConfig, session: Session, model: nn.Module, norm: nn.Module, attributes: tuple[str, ...]
) -> list[FeatureCache]:
    """Train, val and test as cached backbone features (each image through the backbone once)."""
    caches = []
    for split, training in (("train", True), ("val", False), ("test", False)):
        loader = make_loader(
            # Decoded on the CPU whatever data.decode says: FeatureCache moves decoded images; each is read once.
            LoaderConfig(
                data=cfg.data.data,
                split=split,
                targets=attributes,
                training=False,
                batch_size=cfg.data.batch_size,
                num_workers=cfg.data.loader_workers,
                cache=cfg.data.cache,
                cache_gb=cfg.data.cache_gb,
            ),
            session.rank,
            session.world_size,
        )
        caches.append(
            FeatureCache.build(
                model, norm, loader, session.device, training, session.world_size, cfg.optim.seed, session.rank
            )
        )
    return caches


def uses_feature_cache(cfg: ClassifierConfig) -> bool:
    return cfg.model.name == "resnet50" and cfg.model.freeze == "all" and cfg.model.cache_features


def train_loop_per_worker(config: dict[str, Any]) -> None:
    with BackgroundWriter() as writer:  # rank 0's log writes, drained on the way out, failed or not
        _train(config, writer)


def _train(config: dict[str, Any], writer: BackgroundWriter) -> None:
    cfg = from_dict(ClassifierConfig, config).validate()
    attributes = cfg.attributes()
    session = Session.current(storage.join(cfg.storage, cfg.name), cfg.scale.gpu, cfg.scale.keep_checkpoints)
    require_cuda(cfg.data.decode, session.device)
    torch.manual_seed(cfg.optim.seed)  # the same initial weights on every rank
    manifest = read_manifest(cfg.data.data)
    model = build_model(cfg, len(attributes), manifest.image.size).to(session.device)
    if session.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    norm = InputNorm(cfg.model.name).to(session.device)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    start_epoch, step, resumed = _resume(cfg, session, model, optimizer)
    seed_rank_streams(
        cfg.optim.seed, session.rank, step, session.device
    )  # each rank's own dropout masks (loops/resume.py)
    if uses_feature_cache(cfg):
        train, val, test_loader = _feature_caches(cfg, session, model, norm, attributes)
        plain, plain_norm = model.head, nn.Identity()
    else:
        train, val, test_loader = _loaders(cfg, session, attributes)
        plain, plain_norm = model, norm
    runner = plain
    if session.world_size > 1:
        runner = nn.parallel.DistributedDataParallel(
            plain, device_ids=[session.device.index] if session.device.type == "cuda" else None
        )
    if cfg.optim.compile:
        runner = torch.compile(runner)
    majority = majority_of(manifest, attributes)
    log = RunLog(session.run_dir, to_dict(cfg), start_epoch, writer=writer) if session.rank == 0 else None
    every = cfg.scale.preemption_check_every

    def checkpoint(
        metrics: dict[str, Any], epoch: int, at: int, progress: EpochProgress | None = None, background: bool = False
    ) -> None:
        """Every rank reports; rank 0's state is the checkpoint (uploaded while training goes on with `background`)."""
        state = (
            _state(cfg, model, optimizer, epoch, at, attributes, manifest.image.size, majority, progress)
            if session.rank == 0
            else None
        )
        session.report(metrics, state, background)

    for epoch in range(start_epoch, cfg.optim.epochs):
        train.dataset.set_epoch(epoch)
        progress, resumed = resumed, EpochProgress()
        first = step - progress.steps  # steps before this epoch

        def after_step() -> None:
            """The next step's random streams; on a drain notice, a mid-epoch checkpoint at once (at
            most the steps after it are lost)."""
            at = first + progress.steps
            seed_rank_streams(cfg.optim.seed, session.rank, at, session.device)
            if every and at % every == 0 and session.preemption_pending():
                checkpoint(
                    {"epoch": epoch, "step": at, "world_size": session.world_size, "preemption_checkpoint": True},
                    epoch,
                    at,
                    progress,
                )

        trained, seconds = _train_epoch(runner, plain_norm, train, optimizer, cfg, session.device, progress, after_step)
        step = first + progress.steps
        result = evaluate(plain, plain_norm, val, attributes, majority, session.device)
        loss, train_acc = (
            float(progress.loss_sum) / max(progress.seen, 1),
            float(progress.correct) / max(progress.seen, 1),
        )
        metrics = {
            "epoch": epoch,
            "step": step,
            "world_size": session.world_size,  # shows an elastic run shrinking or growing
            "train/loss": loss,
            "train/mean_accuracy": train_acc,
            "train/images_per_s": trained * session.world_size / seconds if seconds else 0.0,
            "val/mean_accuracy": result["mean_accuracy"],
            "val/exact_match": result["exact_match"],
            "val/mean_majority_baseline": result["mean_majority_baseline"],
            **{f"val/acc/{name}": acc for name, acc in result["accuracy"].items()},
        }
        if session.rank == 0:
            print(
                f"epoch {epoch + 1}/{cfg.optim.epochs}  loss {loss:.4f}  val acc {result['mean_accuracy']:.4f} "
                f"(majority {result['mean_majority_baseline']:.4f})  {metrics['train/images_per_s']:.0f} img/s",
                flush=True,
            )
        if log is not None:
            log.log(metrics)
        last = epoch == cfg.optim.epochs - 1
        if last or (epoch + 1) % cfg.optim.checkpoint_every == 0:
            checkpoint(metrics, epoch, step, background=not last)  # the last one is in storage when fit() returns
        else:  # every epoch's metrics still reach Ray, and Tune's schedulers
            session.report(metrics, None, background=True)
    # A dataset packed from a partial CelebA copy may have no test images: report on val then.
    split, loader = ("test", test_loader) if manifest.splits["test"].samples else ("val", val)
    final = evaluate(plain, plain_norm, loader, attributes, majority, session.device)
    if log is not None:
        log.finish(final, f"{cfg.name}: {cfg.data.task} on {split} ({final['samples']} images)")
