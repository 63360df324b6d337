"""What a loop sets up when it starts or continues a run, beside the weights: each rank's random
streams, and the optimiser hyperparameters the user asked for now.

Random streams: the model is initialised from the run's seed on every rank (DDP wants identical
weights), then before every step each rank's streams (dropout masks, the GAN's latents and label
noise) are seeded from (seed, rank, step). What a rank draws at a step depends on nothing else, so
a run resumed from any checkpoint, a mid-epoch one included, draws exactly what the uninterrupted
run drew, on any number of visible GPUs, and no checkpoint stores one rank's RNG state for all.
Seeding costs ~20 us a step (measured on the 2-core VM): a hash and host-side seeds, no device work.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from deeprecognition.runs.checkpoint import load_state

if TYPE_CHECKING:
    from deeprecognition.config import RunSettings
    from deeprecognition.runs.session import Session


def stream_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed, well mixed from (seed, rank, step, stream): nearby inputs give unrelated streams."""
    return int(np.random.SeedSequence([seed, rank, step, stream]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def seed_rank_streams(seed: int, rank: int, step: int, device: torch.device) -> None:
    """Seed this rank's generators for (seed, rank, step): torch's CPU one, its device's own (not
    every visible GPU's: torch.manual_seed would do that, at ~60 us a step), and Python's."""
    value = stream_seed(seed, rank, step)
    torch.default_generator.manual_seed(value)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(value)
    random.seed(stream_seed(seed, rank, step, stream=1))


def apply_hyperparameters(optimizer: torch.optim.Optimizer, wanted: Mapping[str, Any], name: str) -> list[str]:
    """After `optimizer.load_state_dict`, which restores the saved lr (and betas, weight decay):
    put back the values the run's config asks for. Returns what changed, e.g. "G lr 0.001 -> 0.0001"."""
    changed = []
    for group in optimizer.param_groups:
        for key, value in wanted.items():
            saved = tuple(group[key]) if isinstance(group[key], Sequence) else group[key]
            if saved != value:
                changed.append(f"{name} {key} {_shown(saved)} -> {_shown(value)}")
                group[key] = value
    return sorted(set(changed))


def _shown(value: Any) -> str:
    return f"({', '.join(f'{v:g}' for v in value)})" if isinstance(value, tuple) else f"{value:g}"


class Restorable(Protocol):
    """A loop's checkpointed state: its config, and how it restores itself from a saved one,
    returning the hyperparameters the config now changes."""

    cfg: RunSettings

    def restore(self, saved: dict[str, Any]) -> list[str]: ...


def resume_latest(state: Restorable, session: Session, position: Callable[[], str]) -> None:
    """Continue `state` from the run's latest checkpoint, or while the run has none from the
    config's `resume_from` (another run's checkpoint: a new run, not a resumed one, so Ray's own
    checkpoints of this run win once there are any); rank 0 says where (`position`, read after the
    restore) and what the config changes."""
    saved, origin = session.latest_state(), "resuming"
    if saved is None and state.cfg.resume_from:
        saved, origin = load_state(state.cfg.resume_from), f"starting from {state.cfg.resume_from}"
    if saved is None:
        return
    changed = state.restore(saved)
    if session.rank == 0:
        changes = f"; the config changes {', '.join(changed)}" if changed else ""
        print(f"{origin} {position()}{changes}", flush=True)
