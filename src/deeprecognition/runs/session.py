"""Where a training loop's reports and checkpoints go: Ray Train when the loop runs under it,
else a local run folder, so the same loop runs in one plain process (world size 1)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from deeprecognition import storage
from deeprecognition.runs.catalog import RunInfo, run_at
from deeprecognition.runs.checkpoint import load_state, write_checkpoint
from deeprecognition.runs.distributed import world

# Checkpoint folders rank 0 may have handed to Ray's background upload at once. Ray runs those
# uploads one at a time (MAX_CHECKPOINT_UPLOAD_THREADS = 1 in ray/train/v2/_internal/execution/
# context.py) from an unbounded queue, and report(..., ASYNC) returns without waiting: a store
# slower than the checkpoint interval would pile up folders on the node's disk (346 MB each for the
# 128 px DCGAN) and checkpoints that are ever more out of date. So rank 0 waits, before writing a
# third folder, until Ray has deleted one (it does once that upload is done): one uploading, one
# queued behind it, and a slow store sets the pace as synchronous uploads did, only later. The other
# ranks wait for rank 0 at their next collective; a store that never finishes fails the run at
# scale.collective_timeout_s instead of hanging it, and a failed upload fails the worker (Ray raises
# it in the training thread), which ends the wait with the process.
UPLOADS_IN_FLIGHT = 2
UPLOADS = os.path.join(tempfile.gettempdir(), f"deeprec-uploads-{os.getuid()}")  # a folder per process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def _process_folder() -> str:
    """This process's folder under UPLOADS, once those of processes that died are removed: a
    killed worker leaves the checkpoints it had not uploaded yet (up to 2 x 346 MB each time)."""
    os.makedirs(UPLOADS, exist_ok=True)
    for name in os.listdir(UPLOADS):
        if name.isdigit() and not _alive(int(name)):
            shutil.rmtree(os.path.join(UPLOADS, name), ignore_errors=True)
    root = os.path.join(UPLOADS, str(os.getpid()))
    os.makedirs(root, exist_ok=True)
    return root


@dataclass
class UploadFolders:
    """Rank 0's folders for checkpoints uploaded in the background: at most `limit` on disk."""

    limit: int = UPLOADS_IN_FLIGHT
    root: str = field(default_factory=_process_folder)
    handed: int = 0

    def next(self) -> str:
        """A new folder's path, once fewer than `limit` are still waiting for their upload."""
        while len(os.listdir(self.root)) >= self.limit:
            time.sleep(0.05)
        self.handed += 1
        return os.path.join(self.root, f"checkpoint-{self.handed:06d}")


@dataclass
class Session:
    rank: int
    world_size: int
    device: torch.device
    under_ray: bool
    run_dir: str  # the run's folder (local mode: also its checkpoints)
    keep: int = 2  # local mode: checkpoints kept, the latest and the best keep - 1 others (catalog's ranking)
    _noticed: Any = field(default=None, repr=False)  # the preemption notice already checkpointed for
    _uploads: UploadFolders | None = field(
        default=None, repr=False
    )  # rank 0, under Ray, from its first background checkpoint

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
            left = (
                f"{max(0.0, info.deadline_ms / 1000 - time.time()):.0f} s" if info.deadline_ms else "no deadline given"
            )
            print(
                f"preemption notice: node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} "
                f"(ranks {info.preempted_ranks}) "
                f"draining, {left} left; checkpointing now",
                flush=True,
            )
        return True

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None, background: bool = False) -> None:
        """Every rank calls this, with the same `background`; rank 0's state becomes the checkpoint
        (metrics logs: report.RunLog).

        Under Ray, `background` (periodic checkpoints, and the reports without one between them)
        returns once rank 0 has written its folder: Ray uploads it in the background and registers
        it (what get_checkpoint, resumes and the catalog's ranking see) only once it is uploaded.
        Without it (the final and preemption checkpoints) it returns once this checkpoint and every
        one before it are in storage: Ray keeps reports in order, so this one waits for theirs.
        Outside Ray every checkpoint is written at once."""
        if self.under_ray:
            self._report_to_ray(metrics, state, background)
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

    def _report_to_ray(self, metrics: dict[str, Any], state: dict[str, Any] | None, background: bool) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        with contextlib.ExitStack() as stack:
            checkpoint = None
            if state is not None and self.rank == 0:
                folder = self._upload_folder() if background else stack.enter_context(tempfile.TemporaryDirectory())
                # Written here, before training goes on and changes the weights. The sha256 too: Ray
                # uploads the folder as it is handed over (0.02 s of 32 MB in `deeprec bench checkpoint`).
                write_checkpoint(folder, state, metrics)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            mode = CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=mode)
        if not background and self._uploads is not None:
            # A synchronous report returns after every report before it: their uploads are done.
            shutil.rmtree(self._uploads.root, ignore_errors=True)
            self._uploads = None

    def _upload_folder(self) -> str:
        """A folder for a background checkpoint; Ray deletes it once uploaded (ASYNC's default
        delete_local_checkpoint_after_upload)."""
        self._uploads = self._uploads or UploadFolders()
        return self._uploads.next()

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
