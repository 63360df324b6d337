"""`deeprec bench pack|loader|train|gan|checkpoint`: throughput with its baselines measured in the
same run, on one core unless --num-workers says otherwise; checkpoint: how long a checkpoint blocks
training, uploaded synchronously or in the background. Targets live here and in the README's
table, never in tests."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from deeprecognition import storage
from deeprecognition.celeba.source import find_source, load_annotations, open_images
from deeprecognition.shards.encode import ImageFormat, decode_source, resize
from deeprecognition.shards.loader import LoaderConfig, decode_image, make_loader, read_shard
from deeprecognition.shards.manifest import read_manifest
from deeprecognition.shards.pack import PackOptions, build_shard
from deeprecognition.shards.plan import make_plan
from deeprecognition.shards.tario import iter_samples


@dataclass(frozen=True)
class Rate:
    samples: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0


def timed(run: Callable[[], Iterable[int]]) -> Rate:
    """Time a pass; run yields how many samples each step handled."""
    start = time.perf_counter()
    samples = sum(run())
    return Rate(samples, time.perf_counter() - start)


def loader_passes(data: str, split: str, num_workers: int, shards: int) -> Callable[[], Rate]:
    """Evaluation passes over the first `shards` shards of the split (whole shards, as training
    reads them) through one loader, as epochs go: each call times one more pass."""
    config = LoaderConfig(
        data=data, split=split, training=False, batch_size=256, num_workers=num_workers, first_shards=shards
    )
    loader = make_loader(config, rank=0, world_size=1)
    return lambda: timed(lambda: (len(batch.keys) for batch in loader))


def decode_limit_rate(data: str, split: str, limit: int) -> Rate:
    """Decode the stored image bytes in a tight loop: what a loader could reach at best."""
    manifest = read_manifest(data)
    payloads = []
    for shard in manifest.shards(split):
        payloads += [fields[manifest.image.encoding] for _, fields in iter_samples(read_shard(data, shard), shard.name)]
        if len(payloads) >= limit:
            break
    payloads = payloads[:limit]
    return timed(lambda: (decode_image(p, manifest.image.encoding) is not None for p in payloads))


def naive_rate(source_root: str, size: int, limit: int) -> Rate | None:
    """What a user writes first: open each source JPEG, decode, resize, to a tensor."""
    from torchvision.transforms.functional import pil_to_tensor

    if not source_root or not (storage.is_remote(source_root) or storage.exists(source_root)):
        return None
    source = find_source(source_root)
    names = list(open_images(source).names())[:limit]
    fmt = ImageFormat(size=size)

    def run() -> Iterable[int]:
        with open_images(source) as images:
            for name in names:
                pil_to_tensor(resize(decode_source(images.read(name)), fmt))
                yield 1

    return timed(run)


def webdataset_rate(data: str, split: str, limit: int) -> Rate | None:
    """webdataset's stock pipeline on the same shards (local datasets only)."""
    import webdataset as wds

    if storage.is_remote(data):
        return None
    urls = [storage.join(data, s.name) for s in read_manifest(data).shards(split)]
    stream = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        .decode("torchrgb8")
        .to_tuple("jpg;png;npy", "attr.npy")
    )

    def run() -> Iterable[int]:
        for i, _ in enumerate(stream, 1):
            yield 1
            if i >= limit:
                return

    return timed(run)


def best_rates(repeats: int, measures: dict[str, Callable[[], Rate | None]]) -> dict[str, Rate | None]:
    """Each measurement's fastest pass, the measurements interleaved round by round: load from
    elsewhere on the machine only ever slows a pass down, and drifts affect all of them alike."""
    best: dict[str, Rate | None] = {}
    for _ in range(repeats):
        for name, measure in measures.items():
            rate = measure()
            if rate is not None and (best.get(name) is None or rate.per_s > best[name].per_s):  # type: ignore[union-attr]
                best[name] = rate
            best.setdefault(name, rate)
    return best


def shards_for(data: str, split: str, limit: int) -> int:
    """The fewest leading shards of the split that hold at least `limit` samples."""
    total = 0
    for i, shard in enumerate(read_manifest(data).shards(split), 1):
        total += shard.samples
        if total >= limit:
            return i
    return i


def _rounded(rate: Rate | None) -> float | None:
    return round(rate.per_s, 1) if rate else None


def bench_loader(data: str, num_workers: int = 0, limit: int = 5000, split: str = "train", repeats: int = 3) -> dict:
    torch.set_num_threads(1)
    manifest = read_manifest(data)
    shards = shards_for(data, split, limit)
    samples = sum(s.samples for s in manifest.shards(split)[:shards])
    # The naive path is ~6x slower and steady: a fifth of the images measure it as well.
    naive_n = max(1, min(samples, 2000))
    next_pass = loader_passes(data, split, num_workers, shards)
    # The first pass pays for worker start-up and for hashing every local shard once.
    first = next_pass()
    rates = best_rates(
        repeats,
        {
            "images_per_s": next_pass,
            "decode_limit_images_per_s": lambda: decode_limit_rate(data, split, samples),
        },
    )
    # The baselines run after: their garbage would otherwise tax the loader's passes.
    rates |= best_rates(
        repeats,
        {
            "baseline_images_per_s": lambda: naive_rate(manifest.source.get("root", ""), manifest.image.size, naive_n),
            "webdataset_images_per_s": lambda: webdataset_rate(data, split, samples),
        },
    )
    return {
        **{name: _rounded(rate) for name, rate in rates.items()},
        "first_pass_images_per_s": _rounded(first),
        "samples": rates["images_per_s"].samples,  # type: ignore[union-attr]
        "num_workers": num_workers,
        "encoding": manifest.image.encoding,
        "size": manifest.image.size,
    }


def bench_pack(src: str, limit: int = 2000, options: PackOptions | None = None) -> dict:
    """Build one shard of `limit` images in this process: pack throughput per core."""
    options = options or PackOptions(samples_per_shard=limit, allow_missing=True)
    source = find_source(src)
    ann = load_annotations(source)
    with open_images(source) as images:
        present = images.names()
    shard = max(make_plan(source, ann, present, options).shards, key=lambda s: len(s.files))
    start = time.perf_counter()
    data, skipped = build_shard(source, shard, options.image, options.strict)
    seconds = time.perf_counter() - start
    samples = len(shard.files) - len(skipped)
    return {
        "images_per_s": round(samples / seconds, 1),
        "samples": samples,
        "bytes_per_image": round(len(data) / max(samples, 1)),
        "encoding": options.image.encoding,
        "size": options.image.size,
    }


def bench_train(data: str, steps: int = 30, batch_size: int = 64, layers: int = 3) -> dict:
    """The classifier loop's images/s in a plain process, under Ray Train with 1 worker, and with 2:
    the price of Ray Train, and what a second worker buys. The last epoch is measured (the first
    pays for warm-up); every run gets one CPU thread, as Ray gives each worker."""
    import tempfile

    from deeprecognition.classifier.loop import train_loop_per_worker
    from deeprecognition.config import apply_overrides, preset, to_dict
    from deeprecognition.launch import absolute_paths, run
    from deeprecognition.runs.report import read_history

    with tempfile.TemporaryDirectory() as runs:

        def cfg(name: str, workers: int):
            overrides = [
                f"data.data={data}",
                f"storage={runs}",
                f"name={name}",
                f"model.layers={layers}",
                f"data.batch_size={batch_size}",
                "optim.epochs=2",
                f"optim.steps_per_epoch={steps}",
                "data.loader_workers=1",
                f"scale.num_workers={workers}",
            ]
            return absolute_paths(apply_overrides(preset("paper-cnn"), overrides))

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train_loop_per_worker(to_dict(cfg("plain", 1)))
        finally:
            torch.set_num_threads(threads)
        plain = read_history(storage.join(runs, "plain"))[-1]["train/images_per_s"]
        one = run(cfg("ray1", 1)).metrics["train/images_per_s"]
        two = run(cfg("ray2", 2)).metrics["train/images_per_s"]
    return {
        "plain_images_per_s": round(plain, 1),
        "ray_1_worker_images_per_s": round(one, 1),
        "ray_overhead_ratio": round(one / plain, 3),
        "ray_2_workers_images_per_s": round(two, 1),
        "scaling_2_vs_1": round(two / one, 3),
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "model": f"cnn{layers}",
    }


def bench_gan(
    size: int = 64,
    batch_sizes: tuple[int, ...] = (16, 128),
    iterations: int = 3,
    presets: tuple[str, ...] = ("paper-gan", "dcgan"),
) -> dict:
    """Iterations/s and images/s of one GAN iteration (the D phase, then the G phase) for both
    architectures at each batch size, on random uint8 "real" batches: the models' cost without the
    loader. bf16 autocast on a GPU, as in training; three warm-up iterations are not timed."""
    from deeprecognition.config import GAN_PRESETS
    from deeprecognition.gan.loop import gan_step, make_nets

    unknown = set(presets) - set(GAN_PRESETS)
    if unknown:
        raise ValueError(f"unknown GAN preset(s) {', '.join(sorted(unknown))}; presets: {', '.join(GAN_PRESETS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for preset_name in presets:
        cfg = GAN_PRESETS[preset_name]()
        for batch in batch_sizes:
            nets = make_nets(cfg, size, device)
            real = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
            noise = torch.Generator(device).manual_seed(0)
            for i in range(3):  # warm-up: the first iterations pay for oneDNN/cuDNN kernel selection
                gan_step(cfg, nets, real, noise, i)
            start = time.perf_counter()
            for i in range(iterations):
                gan_step(cfg, nets, real, noise, i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            results.append(
                {
                    "arch": cfg.model.arch,
                    "batch_size": batch,
                    "iterations_per_s": round(iterations / seconds, 3),
                    "images_per_s": round(iterations * batch / seconds, 1),
                }
            )
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return {"device": name, "image_size": size, "iterations_measured": iterations, "results": results}


def bench_checkpoint(
    size_mb: float = 32, bandwidth_mb_per_s: float = 16, checkpoints: int = 3, compute_s: float | None = None
) -> dict:
    """Seconds every rank is blocked per checkpoint (the loops' Session.report, timed on the worker
    of a 1-worker Ray Train run), uploads synchronous against in the background, to a moto S3
    server on 127.0.0.1 behind a link of `bandwidth_mb_per_s` (netsim's proxy). Between checkpoints
    the worker computes for `compute_s` (default: 1.25 uploads' worth, so the background upload
    can end in time); one synchronous checkpoint first, not counted, pays for the first connection."""
    import pyarrow.fs
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from deeprecognition.bench.netsim import FaultProxy, s3_server
    from deeprecognition.runs.catalog import list_runs

    compute_s = 1.25 * size_mb / bandwidth_mb_per_s if compute_s is None else compute_s
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
            # The filesystem itself, not an s3:// path: Ray's controller would resolve a path with
            # its own process's endpoint, which on a Ray started before this bench is not the proxy.
            link = pyarrow.fs.S3FileSystem(endpoint_override=proxy.url, region=os.environ["AWS_DEFAULT_REGION"])
            trainer = TorchTrainer(
                _checkpointing_worker,
                train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=1),
                run_config=RunConfig(
                    name=name,
                    storage_path=f"{bucket}/runs",
                    storage_filesystem=link,
                    failure_config=FailureConfig(controller_failure_limit=1),
                ),
            )
            result = trainer.fit()
            if result.error is not None:
                raise result.error
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
        "end_wait_s": round(
            blocked["end_wait_s"], 3
        ),  # the final synchronous report, behind the last background upload
        "complete_checkpoints": len(run.checkpoints),
        "incomplete_checkpoints": len(run.incomplete),
        "uploaded_mb": round(proxy.bytes_to_server / 1e6, 1),
        "size_mb": size_mb,
        "bandwidth_mb_per_s": bandwidth_mb_per_s,
        "checkpoints_per_mode": checkpoints,
        "compute_s": round(compute_s, 2),
    }


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
