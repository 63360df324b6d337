"""Where a training loop's reports and checkpoints go: Ray Train when the loop runs under it,
else a local run folder, so the same loop runs in one plain process (world size 1)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from deeprecognition.checkpoint import METRICS, load_state, write_checkpoint


@dataclass
class Session:
    rank: int
    world_size: int
    device: torch.device
    under_ray: bool
    run_dir: str  # the run's folder (local mode: also its checkpoints)
    keep: int = 2  # local mode: checkpoints kept, the best by val/mean_accuracy, plus the latest

    @classmethod
    def current(cls, run_dir: str, use_gpu: bool, keep: int) -> Session:
        try:
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), True, run_dir, keep)
        except RuntimeError:  # not inside a Ray Train worker
            device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
            return cls(0, 1, device, False, run_dir, keep)

    def latest_state(self) -> dict[str, Any] | None:
        """The state of the latest checkpoint of this run, to resume from, or None."""
        if self.under_ray:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            if checkpoint is None:
                return None
            with checkpoint.as_directory() as folder:
                return load_state(folder)
        done = sorted(n for n in os.listdir(self.run_dir) if n.startswith("checkpoint_")) if os.path.isdir(self.run_dir) else []
        return load_state(os.path.join(self.run_dir, done[-1])) if done else None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        """Every rank calls this; rank 0's state becomes the checkpoint (metrics logs: report.RunLog)."""
        if self.under_ray:
            import ray.train

            with tempfile.TemporaryDirectory() as folder:
                checkpoint = None
                if state is not None and self.rank == 0:
                    write_checkpoint(folder, state, metrics)
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=checkpoint)
            return
        os.makedirs(self.run_dir, exist_ok=True)
        if state is not None:
            # Written aside, then renamed: a half-written checkpoint is never the latest one.
            name = f"checkpoint_{state['epoch'] if 'epoch' in state else state['iteration']:06d}"
            partial = os.path.join(self.run_dir, f".{name}.tmp")
            write_checkpoint(partial, state, metrics)
            target = os.path.join(self.run_dir, name)
            shutil.rmtree(target, ignore_errors=True)  # the same epoch, from a run that died after it
            os.replace(partial, target)
            self._prune(latest=name)

    def _prune(self, latest: str) -> None:
        """What Ray's CheckpointConfig(num_to_keep) does for a Ray run, for a local one."""
        scored = []
        for name in os.listdir(self.run_dir):
            if name.startswith("checkpoint_") and name != latest:
                with open(os.path.join(self.run_dir, name, METRICS)) as f:
                    scored.append((json.load(f).get("val/mean_accuracy", float("-inf")), name))
        for _, name in sorted(scored, reverse=True)[max(self.keep - 1, 0) :]:
            shutil.rmtree(os.path.join(self.run_dir, name))
