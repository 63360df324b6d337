"""`deeprec`: argument parsing and printing only; each command calls one library function."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator

from deeprecognition.errors import DeepRecError
from deeprecognition.raycluster import ray_console

log = logging.getLogger("deeprecognition")


def _synth(args: argparse.Namespace) -> int:
    from deeprecognition.celeba.synthetic import write_synthetic

    ann = write_synthetic(args.dest, n=args.n, seed=args.seed, progress=sys.stderr.isatty())
    print(f"wrote {len(ann)} synthetic CelebA images and annotations to {args.dest}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    from deeprecognition.shards.encode import ImageFormat
    from deeprecognition.shards.pack import PackOptions, pack

    options = PackOptions(
        image=ImageFormat(size=args.size, resize=args.resize, encoding=args.format, quality=args.quality),
        split=args.split,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        allow_missing=args.allow_missing,
        strict=args.strict,
        num_workers=args.num_workers,
    )
    report = pack(args.src, args.dest, options, progress=not args.quiet)
    m = report.manifest
    if report.up_to_date:
        print(f"{args.dest} is already packed from this source with these options: nothing to do")
    counts = ", ".join(f"{split} {info.samples} in {len(info.shards)} shards" for split, info in m.splits.items())
    print(f"packed {counts} into {args.dest} ({report.built} shards built, {report.kept} kept from an earlier run)")
    if m.skipped["missing"]:
        print(f"{m.skipped['missing']} listed images were absent and skipped (--allow-missing)")
    if m.skipped["undecodable"]:
        print(
            f"{m.skipped['undecodable']} images did not decode and were skipped: {', '.join(m.skipped['undecodable_files'][:10])}"
        )
    if not report.up_to_date:
        print(f"{report.images_per_s:.0f} images/s over {report.seconds:.1f} s")
    if report.retries:
        print(
            f"{report.retries} storage operations were retried (connections reset or cut, throttling; each is logged)"
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from deeprecognition.shards.verify import verify

    report = verify(args.data, num_workers=args.num_workers)
    for p in report.problems:
        print(f"BAD {p.shard}: {p.problem}")
    for name in report.unlisted:
        print(f"UNLISTED {name}: in the folder but not in manifest.json, so never read (a shard of another pack?)")
    status = "OK" if report.ok else f"{len(report.problems)} bad shard(s)"
    retried = f" ({report.retries} storage operations retried)" if report.retries else ""
    print(f"{status}: checked {report.shards} shards, {report.samples} samples in {args.data}{retried}")
    return 0 if report.ok else 1


def _stats(args: argparse.Namespace) -> int:
    from deeprecognition.shards.stats import dataset_stats, format_table, stats_json

    stats = dataset_stats(args.data, plot=args.plot)
    if args.json:
        _print_json(args, stats_json(stats), indent=1)
        return 0
    print(format_table(stats))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from deeprecognition.bench import bench_checkpoint, bench_gan, bench_loader, bench_pack, bench_train

    if args.what == "gan":
        result = bench_gan(
            size=args.size,
            batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")),
            iterations=args.steps or 3,
            presets=tuple(args.gan_presets.split(",")),
        )
    elif args.what == "checkpoint":
        result = bench_checkpoint(
            size_mb=args.size_mb,
            bandwidth_mb_per_s=args.bandwidth_mbps,
            checkpoints=args.steps or 3,
            compute_s=args.compute_s,
        )
    elif args.data is None:
        raise ValueError(f"bench {args.what} needs DATA: a packed dataset (loader, train) or a CelebA source (pack)")
    elif args.what == "loader":
        result = bench_loader(args.data, num_workers=args.num_workers, limit=args.limit)
    elif args.what == "train":
        result = bench_train(args.data, steps=args.steps or 30)
    else:
        result = bench_pack(args.data, limit=args.limit)
    if args.json:
        _print_json(args, result)
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0


# Flag -> config field: each flag given on the command line becomes one checked override.
CLASSIFIER_FLAGS = {
    "data": "data.data",
    "task": "data.task",
    "batch_size": "data.batch_size",
    "model": "model.name",
    "layers": "model.layers",
    "freeze": "model.freeze",
    "weights": "model.weights",
    "epochs": "optim.epochs",
    "lr": "optim.lr",
    "steps_per_epoch": "optim.steps_per_epoch",
    "num_workers": "scale.num_workers",
    "gpu": "scale.gpu",
    "max_failures": "scale.max_failures",
    "elastic": "scale.elastic_min",
    "storage": "storage",
    "name": "name",
    "checkpoint_every": "optim.checkpoint_every",
}


# Where and how long a run (either kind) waits for its workers: placement.py.
PLACEMENT_FLAGS = {"start_timeout": "scale.start_timeout_s", "gpu_type": "scale.gpu_type", "spread": "scale.spread"}


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--start-timeout",
        type=int,
        metavar="SECONDS",
        help="wait this long for the cluster to make room for the workers "
        "(an autoscaler boots GPU nodes in minutes) [1800]",
    )
    p.add_argument(
        "--gpu-type", metavar="NAME", help="only GPUs of this type (Ray's accelerator_type: H100, A100, L40S, ...)"
    )
    p.add_argument(
        "--spread",
        action="store_true",
        help="workers on different nodes where possible (default: a run that fits on one node packs onto it)",
    )


def classifier_config(args: argparse.Namespace):
    from deeprecognition.config import ClassifierConfig, apply_overrides, preset

    cfg = preset(args.preset) if args.preset else ClassifierConfig()
    return apply_overrides(cfg, given_flags(args, CLASSIFIER_FLAGS | PLACEMENT_FLAGS) + list(args.set)).validate()


def given_flags(args: argparse.Namespace, fields: dict[str, str]) -> list[str]:
    """FIELD=VALUE for each flag on the command line. An absent option is None and an absent switch
    False; 0 is a value (`0 in (None, False)` is true, so a membership test would drop it), and
    whether the config accepts it is for its validate() to say."""
    return [
        f"{field}={value}"
        for flag, field in fields.items()
        if (value := getattr(args, flag)) is not None and value is not False
    ]


def _train(args: argparse.Namespace) -> int:
    """`deeprec train classifier|gan`: build the config from preset, flags and --set, then fit."""
    from ray.train import TrainingFailedError

    from deeprecognition.config import to_dict
    from deeprecognition.launch import run

    cfg = classifier_config(args) if args.job == "classifier" else gan_config(args)
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    try:
        result = run(cfg)
    except TrainingFailedError as err:
        print(f"deeprec train {args.job}: the run failed: {failure_summary(err)}", file=sys.stderr)
        return 1
    shown = {
        k: v
        for k, v in (result.metrics or {}).items()
        if k in ("epoch", "iteration", "val/mean_accuracy", "fid", "kid")
    }
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
    print(
        f"run {cfg.name} finished ({summary}): latest checkpoint {result.checkpoint.path if result.checkpoint else None}"
    )
    return 0


def failure_summary(err: Exception) -> str:
    """The workers' own errors, one line each, instead of Ray's wrapped tracebacks."""
    failures = getattr(err, "worker_failures", None) or {}
    lines = [f"rank {rank}: {str(exc).strip().splitlines()[-1]}" for rank, exc in sorted(failures.items())]
    return "; ".join(lines) or str(err).strip().splitlines()[-1]


GAN_FLAGS = {
    "data": "data.data",
    "where": "data.where",
    "arch": "model.arch",
    "loss": "model.loss",
    "latent": "model.latent",
    "iterations": "optim.iterations",
    "batch_size": "data.batch_size",
    "mosaic_every": "schedule.mosaic_every",
    "checkpoint_every": "schedule.checkpoint_every",
    "num_workers": "scale.num_workers",
    "gpu": "scale.gpu",
    "max_failures": "scale.max_failures",
    "storage": "storage",
    "name": "name",
    "where_classifier": "data.where_classifier",
    "threshold": "data.threshold",
    "eval_every": "schedule.eval_every",
    "classifier": "eval.classifier",
    "inception_weights": "eval.inception_weights",
    "eval_samples": "eval.samples",
}


def gan_config(args: argparse.Namespace):
    from deeprecognition.config import GAN_PRESETS, apply_overrides

    if args.preset not in GAN_PRESETS:
        raise ValueError(f"unknown GAN preset {args.preset!r}; presets: {', '.join(GAN_PRESETS)}")
    return apply_overrides(
        GAN_PRESETS[args.preset](), given_flags(args, GAN_FLAGS | PLACEMENT_FLAGS) + list(args.set)
    ).validate()


def _add_train_gan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gan", help="train the face GAN on Ray Train (DDP), iteration-based")
    p.add_argument("--preset", default="paper-gan", help="paper-gan (the study's model) | dcgan [paper-gan]")
    p.add_argument("--data", help="packed dataset (local or s3://)")
    p.add_argument(
        "--where", help='attribute conditions, e.g. "Attractive=1" (the preset\'s default) or "" for all faces'
    )
    p.add_argument("--arch", choices=["paper", "dcgan"])
    p.add_argument("--loss", choices=["bce", "hinge"])
    p.add_argument("--latent", type=int)
    p.add_argument("--iterations", type=int, help="total; a larger value continues a finished run")
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument(
        "--where-classifier", metavar="CKPT", help="keep the real faces this trained classifier scores >= --threshold"
    )
    p.add_argument("--threshold", type=float, help="for --where-classifier [0.5]")
    p.add_argument("--mosaic-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument(
        "--eval-every",
        type=int,
        help="FID/KID and attribute rates every N iterations (needs --classifier or --inception-weights)",
    )
    p.add_argument(
        "--classifier", metavar="CKPT", help="trained classifier: attribute rates, and FID features without Inception"
    )
    p.add_argument("--inception-weights", metavar="PATH", help="FID Inception weights file (local or s3://)")
    p.add_argument("--eval-samples", type=int, help="faces per evaluation [1000]")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--max-failures", type=int)
    _add_placement_args(p)
    p.add_argument("--storage")
    p.add_argument("--name")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--dry-run", action="store_true")
    _add_storage_args(p)
    p.set_defaults(run=_train)


def _add_train_classifier(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classifier", help="train a CelebA attribute classifier on Ray Train (DDP)")
    p.add_argument("--preset", help="paper-cnn | paper-multilabel | paper-transfer")
    p.add_argument("--data", help="packed dataset (local or s3://)")
    p.add_argument("--task", help="attractive | paper4 | all40 | comma list of attributes")
    p.add_argument("--model", choices=["cnn", "resnet50"])
    p.add_argument("--layers", type=int, help="cnn conv blocks, 1..4")
    p.add_argument("--freeze", choices=["all", "none", "paper"])
    p.add_argument("--weights", help="resnet50: imagenet (torch hub cache) | PATH | s3://... | none")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per worker")
    p.add_argument("--lr", type=float)
    p.add_argument("--steps-per-epoch", type=int, help="cap steps per epoch (smoke runs)")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="N",
        help="a checkpoint every N epochs; the last epoch always has one [1]",
    )
    p.add_argument("--num-workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--max-failures", type=int)
    p.add_argument("--elastic", type=int, help="keep training on as few as MIN workers")
    _add_placement_args(p)
    p.add_argument("--storage", help="run storage: local folder or s3://bucket/prefix")
    p.add_argument("--name", help="run name; the same storage and name resume the run")
    p.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="any config field, e.g. model.dense=256"
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    _add_storage_args(p)
    p.set_defaults(run=_train)


def _evaluate(args: argparse.Namespace) -> int:
    from deeprecognition.classifier.evaluate import evaluate_checkpoint
    from deeprecognition.classifier.metrics import format_report

    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split)
    if args.json:
        _print_json(args, {k: v for k, v in result.items() if k != "metrics"})
    else:
        print(
            format_report(
                result["metrics"],
                f"{result['task']} on {args.split} ({result['samples']} images), {result['checkpoint']}",
            )
        )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from deeprecognition.gan.generate import generate_grid

    gan = generate_grid(
        args.checkpoint, args.out, n=args.n, seed=args.seed, ema=False if args.no_ema else None, latest=args.latest
    )
    print(f"{args.n} faces from {gan.checkpoint} (iteration {gan.iteration}) written to {args.out}")
    return 0


def _evaluate_gan(args: argparse.Namespace) -> int:
    from deeprecognition.gan.metrics import EVAL_SEED, evaluate_gan

    result = evaluate_gan(
        args.checkpoint,
        data=args.data or "",
        classifier=args.classifier or "",
        inception_weights=args.inception_weights or "",
        samples=args.samples,
        seed=EVAL_SEED if args.seed is None else args.seed,
        ema=False if args.no_ema else None,
        latest=args.latest,
    )
    if args.json:
        _print_json(args, result)
        return 0
    print(
        f"{result['checkpoint']} (iteration {result['iteration']}): {result['samples']} generated vs {result['real_samples']} real faces (where {result['where'] or 'all'})"
    )
    print(f"features: {result['feature_extractor']}")
    print(f"FID {result['fid']:.2f}   KID {result['kid']:.4f} ± {result['kid_std']:.4f}")
    if result["attribute_rate"]:
        print(f"{'attribute':<22}{'generated':>10}{'real':>8}")
        for name, rate in result["attribute_rate"].items():
            print(f"{name:<22}{rate:>10.3f}{result['data_attribute_rate'][name]:>8.3f}")
    return 0


def _add_gan_checkpoint(p: argparse.ArgumentParser) -> None:
    """What `generate` and `evaluate-gan` load: a checkpoint, or a run's best unless --latest."""
    p.add_argument(
        "checkpoint",
        help="a GAN checkpoint folder, or a run folder: its best checkpoint (the lowest FID once measured, "
        "else the latest), local or s3://",
    )
    p.add_argument("--latest", action="store_true", help="a run folder's latest checkpoint instead of its best")


def _curves(args: argparse.Namespace) -> int:
    from deeprecognition import storage
    from deeprecognition.runs.report import curves_png, read_history

    runs = {run.rstrip("/").rsplit("/", 1)[-1]: read_history(run) for run in args.runs}
    empty = [name for name, history in runs.items() if not history]
    if empty:
        raise ValueError(f"no metrics.jsonl with epochs in run(s): {', '.join(empty)}")
    storage.write_bytes_atomic(args.out, curves_png(runs))
    print(f"learning curves of {len(runs)} run(s) written to {args.out}")
    return 0


def _checkpoints_list(args: argparse.Namespace) -> int:
    from deeprecognition.runs.catalog import format_runs, list_runs, runs_json

    runs = list_runs(args.uri)
    if args.json:
        _print_json(args, runs_json(runs), indent=1)
    else:
        print(format_runs(runs))
    return 0


def _checkpoints_pull(args: argparse.Namespace) -> int:
    from deeprecognition.runs.catalog import human_bytes
    from deeprecognition.runs.pull import pull

    r = pull(
        args.uri,
        args.dest,
        best=args.best,
        checkpoint=args.checkpoint,
        workers=args.workers,
        progress=sys.stderr.isatty(),
    )
    checks = ", ".join(f"{n} by {how}" for how, n in sorted(r.checks.items()))
    if r.up_to_date:
        print(f"{r.dest} already holds {r.source}: {r.files} files verified ({checks})")
    else:
        print(
            f"pulled {r.source} into {r.dest}: {r.files} files, {human_bytes(r.bytes)} ({r.fetched} fetched, {r.kept} kept from an interrupted pull; verified {checks}) in {r.seconds:.1f} s"
        )
    if r.retries:
        print(f"{r.retries} storage operations were retried (connections reset or cut, throttling; each is logged)")
    return 0


def _add_checkpoints(sub: argparse._SubParsersAction) -> None:
    commands = sub.add_parser("checkpoints", help="list and pull runs and checkpoints from run storage").add_subparsers(
        dest="action", required=True
    )
    p = commands.add_parser(
        "list", help="runs and checkpoints under a storage URI, with positions, metrics and sizes, best first"
    )
    p.add_argument("uri", help="run storage, a run or a checkpoint (local or s3://)")
    p.add_argument("--json", action="store_true")
    _add_storage_args(p)
    p.set_defaults(run=_checkpoints_list)
    p = commands.add_parser("pull", help="download a run, a checkpoint or the best one, verified, into DEST/NAME")
    p.add_argument("uri", help="a run or a checkpoint (local or s3://); with --best or --checkpoint also run storage")
    p.add_argument("dest", help="local folder: the pull lands in DEST/NAME, complete or not at all")
    p.add_argument(
        "--best", action="store_true", help="only the best checkpoint (FID, else val/mean_accuracy, else the latest)"
    )
    p.add_argument("--checkpoint", metavar="NAME", help="only this checkpoint (checkpoint_... or RUN/checkpoint_...)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads [8]")
    _add_storage_args(p)
    p.set_defaults(run=_checkpoints_pull)


def _tune(args: argparse.Namespace) -> int:
    """`deeprec tune FILE`: a sweep of distributed trials, then its trials ranked by the metric."""
    from deeprecognition.sweep.results import format_table
    from deeprecognition.sweep.tuner import SweepOptions, run_sweep

    options = SweepOptions(
        file=args.file,
        data=args.data,
        storage=args.storage,
        name=args.name,
        num_samples=args.num_samples,
        resume=args.resume,
        smoke=args.smoke,
        overrides=tuple(args.set),
    )
    result = run_sweep(options)  # with --json, main() sends Tune's progress (on stdout) to stderr
    if args.json:
        _print_json(args, result.to_json())
    else:
        print(format_table(result))
        print(f"results.csv, results.png and each trial's run (trials/<trial id>/) are in {result.path}")
    if result.incomplete:
        states = ", ".join(f"{t.trial_id} {t.status}" for t in result.incomplete)
        print(
            f"deeprec tune: {len(result.incomplete)} trial(s) did not finish ({states}): run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 1
    return 0


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL); credentials come from the standard AWS chain",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeprec", description="DeepRecognition: CelebA face attributes and face GANs on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic CelebA in torchvision's layout")
    p.add_argument("dest")
    p.add_argument("--n", type=int, default=2000, help="number of images [2000]")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_synth)

    p = sub.add_parser("pack", help="pack CelebA (any layout) into WebDataset shards + manifest.json")
    p.add_argument("src", help="CelebA root: torchvision, Google-Drive or Kaggle layout, local or s3://")
    p.add_argument("dest", help="dataset folder: local path or s3://bucket/prefix")
    p.add_argument("--size", type=int, default=128, help="stored image side in pixels [128]")
    p.add_argument("--resize", choices=["squash", "center-crop"], default="squash")
    p.add_argument("--format", choices=["jpg", "png", "npy"], default="jpg")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality [95]")
    p.add_argument(
        "--split",
        choices=["official", "random"],
        default="official",
        help="random: seeded 60/20/20, each identity in one split when the copy has identity_CelebA.txt",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples-per-shard", type=int, default=5000)
    p.add_argument("--allow-missing", action="store_true", help="pack the listed images that exist, count the rest")
    p.add_argument("--strict", action="store_true", help="fail on an image that does not decode instead of skipping it")
    p.add_argument("--num-workers", type=int, default=None, help="concurrent shard tasks [all cores]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_storage_args(p)
    p.set_defaults(run=_pack)

    p = sub.add_parser("verify", help="re-read every shard and check it against the manifest")
    p.add_argument("data")
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1)
    _add_storage_args(p)
    p.set_defaults(run=_verify)

    p = sub.add_parser("stats", help="per-split attribute distribution")
    p.add_argument("data")
    p.add_argument("--plot", help="write a bar chart PNG here (local path or s3://)")
    p.add_argument("--json", action="store_true")
    _add_storage_args(p)
    p.set_defaults(run=_stats)

    p = sub.add_parser("bench", help="throughput benchmarks with their baselines")
    p.add_argument("what", choices=["pack", "loader", "train", "gan", "checkpoint"])
    p.add_argument(
        "data", nargs="?", help="loader, train: a packed dataset; pack: a CelebA source; gan, checkpoint: none"
    )
    p.add_argument(
        "--steps",
        type=int,
        help="train: steps per measured epoch [30]; gan: measured iterations [3]; checkpoint: checkpoints per mode [3]",
    )
    p.add_argument("--size-mb", type=float, default=32, help="checkpoint: MB per checkpoint [32]")
    p.add_argument(
        "--bandwidth-mbps",
        type=float,
        default=16,
        help="checkpoint: the link to S3, in megabytes (not bits) per second [16]",
    )
    p.add_argument(
        "--compute-s",
        type=float,
        help="checkpoint: training between checkpoints, seconds [1.25x one upload at that bandwidth]",
    )
    p.add_argument("--size", type=int, default=64, help="gan: image side [64]")
    p.add_argument("--batch-sizes", default="16,128", help="gan: comma list [16,128]")
    p.add_argument("--gan-presets", default="paper-gan,dcgan", help="gan: comma list [paper-gan,dcgan]")
    p.add_argument("--num-workers", type=int, default=0, help="loader: DataLoader workers [0 = this process, one core]")
    p.add_argument("--limit", type=int, default=5000, help="images to measure [5000]")
    p.add_argument("--json", action="store_true")
    _add_storage_args(p)
    p.set_defaults(run=_bench)

    p = sub.add_parser("evaluate", help="a trained classifier's metrics on one split, with their floors")
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (its best checkpoint), local or s3://")
    p.add_argument("--data", required=True, help="packed dataset")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--json", action="store_true")
    _add_storage_args(p)
    p.set_defaults(run=_evaluate)

    p = sub.add_parser("curves", help="train/val accuracy per epoch of one or more runs on one plot")
    p.add_argument("runs", nargs="+", help="run folders (local or s3://), e.g. a scratch and a transfer run")
    p.add_argument("--out", required=True, help="PNG to write (local or s3://)")
    _add_storage_args(p)
    p.set_defaults(run=_curves)

    p = sub.add_parser("generate", help="faces from a trained GAN as a grid PNG")
    _add_gan_checkpoint(p)
    p.add_argument("--n", type=int, default=36, help="faces [36: a 6x6 grid]")
    p.add_argument("--out", required=True, help="PNG to write (local or s3://)")
    p.add_argument("--seed", type=int, default=0, help="latent seed: the same seed gives the same faces")
    p.add_argument(
        "--no-ema", action="store_true", help="draw with G instead of its EMA copy (dcgan's default painter)"
    )
    _add_storage_args(p)
    p.set_defaults(run=_generate)

    p = sub.add_parser("evaluate-gan", help="FID/KID of a GAN checkpoint and the attribute rates of its faces")
    _add_gan_checkpoint(p)
    p.add_argument("--data", help="packed dataset of the real faces [the run's own]")
    p.add_argument(
        "--classifier", metavar="CKPT", help="trained classifier: attribute rates, and FID features without Inception"
    )
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="FID Inception weights (else the torch hub cache, else the classifier)",
    )
    p.add_argument("--samples", type=int, default=1000, help="generated and real faces [1000]")
    p.add_argument("--seed", type=int, help="latent seed [the one the run evaluated with: its logged FID again]")
    p.add_argument("--no-ema", action="store_true", help="evaluate G instead of its EMA copy")
    p.add_argument("--json", action="store_true")
    _add_storage_args(p)
    p.set_defaults(run=_evaluate_gan)

    _add_checkpoints(sub)

    p = sub.add_parser("tune", help="a Ray Tune sweep whose trials are distributed training runs (tune_configs/*.yaml)")
    p.add_argument("file", help="a sweep file, e.g. tune_configs/cnn_layers.yaml")
    p.add_argument("--data", required=True, help="packed dataset (local or s3://)")
    p.add_argument("--storage", required=True, help="where sweeps live: local folder or s3://bucket/prefix")
    p.add_argument("--name", help="sweep name [the file's name; with --smoke, NAME-smoke]")
    p.add_argument("--num-samples", type=int, help="instead of the file's num_samples")
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep; ended trials are not run again"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="every trial shrunk (the file's smoke: section): a laptop runs the sweep in minutes",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a config field of every trial, e.g. eval.classifier=RUN",
    )
    p.add_argument(
        "--json", action="store_true", help='print {"metric", "mode", "trials", "best", ...} instead of the table'
    )
    _add_storage_args(p)
    p.set_defaults(run=_tune)

    train = sub.add_parser("train", help="distributed training jobs").add_subparsers(dest="job", required=True)
    _add_train_classifier(train)
    _add_train_gan(train)
    return parser


def _print_json(args: argparse.Namespace, document: object, indent: int | None = None) -> None:
    """A --json command's document, kept for main() to print once stdout is stdout again."""
    args.document = json.dumps(document, indent=indent)


def _run_for_json(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a --json command so that its stdout is its document alone: while it runs, whatever is
    bound for stdout (Tune's progress, the worker lines Ray forwards) goes to stderr; the Ray it
    started is shut down, which prints the lines Ray was holding back as `[repeated Nx across
    cluster]`; only then is the document printed."""
    from deeprecognition.raycluster import shutdown_ray_started_inside

    args.document = None
    with _stdout_to_stderr(), shutdown_ray_started_inside():
        code = run(args)
    if args.document is not None:
        print(args.document)
    return code


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """sys.stdout, and file descriptor 1 under it (what C and C++ code write to, and what the
    processes Ray starts inherit under RAY_LOG_TO_STDERR=1), both lead to stderr until the block
    ends. Whatever sys.stdout is on entry (pytest's capsys replaces it) is sys.stdout again after."""
    sys.stdout.flush()
    real_stdout_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.__stdout__.flush()  # what was written to the process's own stdout object in the block goes to stderr too
        os.dup2(real_stdout_fd, 1)
        os.close(real_stdout_fd)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # -v: this package's debug messages, others' from INFO up, Ray's internals on the console (raycluster.ray_console). Debug logs of botocore and urllib3
    # print request headers, whose signature names the access key: credentials never reach a log.
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.verbose:
        log.setLevel(logging.DEBUG)
    if getattr(args, "endpoint_url", None):
        from deeprecognition.storage import set_endpoint_url

        set_endpoint_url(args.endpoint_url)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        with ray_console(args.verbose):
            return _run_for_json(run, args) if getattr(args, "json", False) else run(args)
    except (DeepRecError, ValueError) as err:
        print(f"deeprec {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
