"""`deeprec bench checkpoint`: how long a checkpoint blocks training, uploaded synchronously or in
the background, through a slow link to a local S3 server."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch


def bench_checkpoint(size_mb: float, bandwidth_mb_per_s: float, checkpoints: int, compute_s: float) -> dict:
    """Seconds every rank is blocked per checkpoint (the loops' Session.report, timed on the worker
    of a 1-worker Ray Train run), uploads synchronous against in the background, to a moto S3
    server on 127.0.0.1 behind a link of `bandwidth_mb_per_s` (netsim's proxy). Between checkpoints
    the worker computes for `compute_s` (more than one upload's worth lets the background upload
    end in time); one synchronous checkpoint first, not counted, pays for the first connection."""
    import ray

    from deeprecognition.bench.netsim import FaultProxy, s3_server
    from deeprecognition.runs.catalog import list_runs

    bucket, name = "deeprec-bench", "checkpoints"
    with s3_server(bucket) as url, tempfile.TemporaryDirectory() as scratch:
        proxy = FaultProxy.before(url, cut_every=0, bandwidth=bandwidth_mb_per_s * 1e6)
        endpoint_before = os.environ.get("AWS_ENDPOINT_URL")
        os.environ["AWS_ENDPOINT_URL"] = proxy.url  # this process's reads of the result (catalog)
        started = not ray.is_initialized()
        try:
            if started:
                ray.init(address="local", include_dashboard=False, log_to_driver=False)
            out = os.path.join(scratch, "blocked.json")
            config = {"size_mb": size_mb, "checkpoints": checkpoints, "compute_s": compute_s, "out": out}
            _fit_checkpointing_run(proxy.url, f"{bucket}/runs", name, config)
            with open(out) as f:
                blocked = json.load(f)
            [run] = list_runs(f"s3://{bucket}/runs/{name}")
        finally:
            proxy.stop()
            if started:
                ray.shutdown()
            _restore_env("AWS_ENDPOINT_URL", endpoint_before)
    sync, background = (sum(blocked[m]) / len(blocked[m]) for m in ("sync", "async"))
    return {
        "blocked_s_sync": round(sync, 3),
        "blocked_s_async": round(background, 3),
        "blocked_ratio_sync_over_async": round(sync / background, 1) if background else None,
        "blocked_s_each": {m: [round(s, 3) for s in blocked[m]] for m in ("sync", "async")},
        "write_s": round(blocked["write_s"], 3),  # torch.save + sha256 of one checkpoint to local disk, in both
        "sha256_s": round(blocked["sha256_s"], 3),
        "end_wait_s": round(blocked["end_wait_s"], 3),  # the final synchronous report, behind the last upload
        "complete_checkpoints": len(run.checkpoints),
        "incomplete_checkpoints": len(run.incomplete),
        "uploaded_mb": round(proxy.bytes_to_server / 1e6, 1),
        "size_mb": size_mb,
        "bandwidth_mb_per_s": bandwidth_mb_per_s,
        "checkpoints_per_mode": checkpoints,
        "compute_s": round(compute_s, 2),
    }


def _fit_checkpointing_run(endpoint: str, storage_path: str, name: str, config: dict) -> None:
    """A 1-worker Ray Train run of _checkpointing_worker, its storage at `storage_path` behind `endpoint`."""
    import pyarrow.fs
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # The filesystem itself, not an s3:// path: Ray's controller would resolve a path with its own
    # process's endpoint, which on a Ray started before this bench is not the proxy.
    link = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, region=os.environ["AWS_DEFAULT_REGION"])
    trainer = TorchTrainer(
        _checkpointing_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=link,
            failure_config=FailureConfig(controller_failure_limit=1),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _compute(seconds: float) -> None:
    """Training's stand-in: matrix products on this worker's core for `seconds`."""
    a = torch.randn(256, 256) / 16
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def _checkpointing_worker(config: dict) -> None:
    """bench_checkpoint's Ray Train worker: checkpoints of size_mb through Session.report, each
    after compute_s; how long each report blocked, into the file config["out"]."""
    from deeprecognition.runs.checkpoint import STATE, file_digest, write_checkpoint
    from deeprecognition.runs.session import Session

    torch.set_num_threads(1)
    session = Session.current("", use_gpu=False, keep=0)
    weights = torch.randn(int(config["size_mb"] * 1e6 / 4))  # float32: size_mb of incompressible bytes
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_checkpoint(folder, {"config": {}, "weights": weights}, {})
        blocked: dict[str, Any] = {"write_s": time.perf_counter() - start}
        start = time.perf_counter()
        file_digest(os.path.join(folder, STATE))
        blocked["sha256_s"] = time.perf_counter() - start
    schedule = (
        [("warm-up", False)] + [("sync", False)] * config["checkpoints"] + [("async", True)] * config["checkpoints"]
    )
    for step, (mode, background) in enumerate(schedule):
        _compute(config["compute_s"])
        weights.add_(1.0)  # training moves on: each checkpoint holds other bytes
        start = time.perf_counter()
        session.report(
            {"step": step, "mode": mode}, {"config": {}, "step": step, "weights": weights}, background=background
        )
        blocked.setdefault(mode, []).append(time.perf_counter() - start)
    start = time.perf_counter()
    session.report({"step": len(schedule), "mode": "end"}, None)
    blocked["end_wait_s"] = time.perf_counter() - start
    with open(config["out"], "w") as f:
        json.dump(blocked, f)
