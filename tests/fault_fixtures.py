"""What the fault tests (test_faults*.py) share: a faulty object store in front of the moto
server, a folder's files, and checkpoint folders as the trainer writes them."""

from __future__ import annotations

import os

import torch

from deeprecognition.runs.checkpoint import write_checkpoint

from .faultproxy import FaultProxy


def proxy_to(s3: str, **faults) -> FaultProxy:
    """A started FaultProxy in front of the S3 server at `s3` with `faults` (see bench/netsim.py)."""
    host, port = s3.removeprefix("http://").split(":")
    return FaultProxy((host, int(port)), **faults).start()


def tree(root) -> dict[str, bytes]:
    """Every file under root by relative path, with its bytes."""
    return {
        os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(root)
        for n in names
    }


def fake_checkpoint(folder, epoch: int, values: int = 1_000_000) -> dict:
    """A checkpoint folder as the trainer writes it (state.pt, config.json, metrics.json, checksums.json)."""
    state = {
        "config": {"name": "r"},
        "model": {"w": torch.arange(values, dtype=torch.float32) + epoch},
        "epoch": epoch,
        "step": 10 * (epoch + 1),
    }
    write_checkpoint(str(folder), state, {"epoch": epoch, "step": state["step"], "val/mean_accuracy": 0.5 + epoch / 10})
    return state
