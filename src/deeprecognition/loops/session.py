"""Where a training loop's reports and checkpoints go: Ray Train when the loop runs under it,
else a local run folder, so the same loop runs in one plain process (world size 1)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from deeprecognition import storage
from deeprecognition.catalog import RunInfo, run_at
from deeprecognition.checkpoint import load_state, write_checkpoint
from deeprecognition.distributed import world


@dataclass
class Session:
    rank: int
    world_size: int
    device: torch.device
    under_ray: bool
    run_dir: str  # the run's folder (local mode: also its checkpoints)
    keep: int = 2  # local mode: checkpoints kept, the latest and the best keep - 1 others (catalog's ranking)
    _noticed: Any = field(default=None, repr=False)  # the preemption notice already checkpointed for

    @classmethod
    def current(cls, run_dir: str, use_gpu: bool, keep: int) -> Session:
        try:
            import ray.train
            import ray.train.torch

            ctx = ray.train.get_context()
            return cls(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), True, run_dir, keep)
        except RuntimeError:  # not inside a Ray Train worker: one process, or a process group of torchrun's
            rank, world_size = world()
            cuda = use_gpu and torch.cuda.is_available()
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
            return cls(rank, world_size, device, False, run_dir, keep)

    def latest_state(self) -> dict[str, Any] | None:
        """The state of the latest checkpoint of this run, to resume from, or None."""
        if self.under_ray:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            return None if checkpoint is None else restore(checkpoint)
        run = self._local_run()
        return None if run is None else load_state(run.latest.uri)

    def _local_run(self) -> RunInfo | None:
        """This local run's checkpoints as catalog lists and ranks them; None before the first."""
        started = os.path.isdir(self.run_dir) and any(n.startswith("checkpoint_") for n in os.listdir(self.run_dir))
        return run_at(self.run_dir) if started else None

    def preemption_pending(self) -> bool:
        """Whether a node of this run is being drained (a spot reclaim notice, SIGTERM to a `ray
        start` node) and no checkpoint was written for that notice yet: the caller checkpoints now.

        Under Ray a collective (`ray.train.get_preemption_info`, rank 0's view broadcast to all):
        every rank calls it at the same steps. Outside Ray nothing can drain the process: False."""
        if not self.under_ray:
            return False
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or info == self._noticed:
            return False
        self._noticed = info
        if self.rank == 0:
            left = f"{max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s" if info.deadline_ms else "no deadline given"
            print(f"preemption notice: node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} (ranks {info.preempted_ranks}) "
                  f"draining, {left} left; checkpointing now", flush=True)
        return True

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
        """For a local run what Ray's CheckpointConfig(num_to_keep) does for a Ray run, by the same
        ranking (catalog.ray_checkpoint_config): `latest` and the best `keep - 1` others stay."""
        others = [c for c in run_at(self.run_dir).checkpoints if c.name != latest]
        for checkpoint in others[max(self.keep - 1, 0) :]:
            shutil.rmtree(os.path.join(self.run_dir, checkpoint.name))


def restore(checkpoint: Any) -> dict[str, Any]:
    """The state in a Ray Train checkpoint, downloaded whole from run storage and loaded as plain
    data. pyarrow gives up on a download whose response is cut mid-body: the whole download is
    retried here with backoff, each retry counted and logged."""

    def download_and_load() -> dict[str, Any]:
        with checkpoint.as_directory() as folder:
            return load_state(folder)

    return storage.retrying(f"restore {checkpoint.path}", download_and_load)
