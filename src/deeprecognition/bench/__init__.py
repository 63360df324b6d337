"""`deeprec bench pack|loader|train|gan|checkpoint`: throughput with its baselines measured in the
same run, on one core unless --num-workers says otherwise; checkpoint: how long a checkpoint blocks
training, uploaded synchronously or in the background. Targets live here and in the README's
table, never in tests.

Each benchmark has its module, imported when it runs; BenchOptions declares the command's flags."""

from __future__ import annotations

from dataclasses import dataclass

from deeprecognition.config import option

BENCHMARKS = ("pack", "loader", "train", "gan", "checkpoint")
# --steps counts each benchmark's own unit.
DEFAULT_STEPS = {"train": 30, "gan": 3, "checkpoint": 3}
# checkpoint: training between checkpoints, in uploads' worth at the link's bandwidth; above 1 so
# that a background upload can end before the next checkpoint.
COMPUTE_PER_UPLOAD = 1.25


@dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What `deeprec bench` can be told, each field a flag but `data`; a benchmark reads the fields
    it names."""

    data: str | None = None  # loader, train: a packed dataset; pack: a CelebA source
    steps: int | None = option(
        None,
        "train: steps per measured epoch; gan: measured iterations; checkpoint: checkpoints per mode "
        f"[default: {', '.join(f'{what} {n}' for what, n in DEFAULT_STEPS.items())}]",
        flag=True,
    )
    limit: int = option(5000, "pack, loader: images to measure", flag=True)
    num_workers: int = option(0, "loader: DataLoader workers; 0: this process, one core", flag=True)
    size: int = option(64, "gan: image side", flag=True)
    batch_sizes: tuple[int, ...] = option((16, 128), "gan: comma list", flag=True)
    gan_presets: tuple[str, ...] = option(("paper-gan", "dcgan"), "gan: comma list", flag=True)
    size_mb: float = option(32.0, "checkpoint: MB per checkpoint", flag=True)
    bandwidth_mb_per_s: float = option(
        16.0, "checkpoint: the link to S3, in megabytes (not bits) per second", flag="--bandwidth-mbps"
    )
    compute_s: float | None = option(
        None,
        f"checkpoint: training between checkpoints, seconds [default: {COMPUTE_PER_UPLOAD}x one upload's time]",
        flag=True,
    )


def run_bench(what: str, options: BenchOptions) -> dict:
    """The benchmark `what`'s result, a flat JSON-able dict."""
    steps = options.steps or DEFAULT_STEPS.get(what, 0)  # 0, as unset: the benchmark's default
    if what == "gan":
        from deeprecognition.bench.gan import bench_gan

        return bench_gan(options.size, options.batch_sizes, steps, options.gan_presets)
    if what == "checkpoint":
        from deeprecognition.bench.checkpoint import bench_checkpoint

        compute_s = options.compute_s
        if compute_s is None:
            compute_s = COMPUTE_PER_UPLOAD * options.size_mb / options.bandwidth_mb_per_s
        return bench_checkpoint(options.size_mb, options.bandwidth_mb_per_s, steps, compute_s)
    if what not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {what!r}; benchmarks: {', '.join(BENCHMARKS)}")
    if options.data is None:
        raise ValueError(f"bench {what} needs DATA: a packed dataset (loader, train) or a CelebA source (pack)")
    if what == "loader":
        from deeprecognition.bench.loader import bench_loader

        return bench_loader(options.data, options.num_workers, options.limit)
    if what == "train":
        from deeprecognition.bench.train import bench_train

        return bench_train(options.data, steps)
    from deeprecognition.bench.pack import bench_pack

    return bench_pack(options.data, options.limit)
