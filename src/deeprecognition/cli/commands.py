"""The bodies of the `deeprec` commands: each calls one library function and prints what it
returned. A --json command leaves its document in `args.document` (print_json), which main()
prints once the command's own output is done."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import TYPE_CHECKING

from deeprecognition.cli.flags import given_flags

if TYPE_CHECKING:
    from deeprecognition.sweep.tuner import SweepOptions


def synth(args: argparse.Namespace) -> int:
    from deeprecognition.celeba.synthetic import write_synthetic

    ann = write_synthetic(args.dest, n=args.n, seed=args.seed, progress=sys.stderr.isatty())
    print(f"wrote {len(ann)} synthetic CelebA images and annotations to {args.dest}")
    return 0


def pack(args: argparse.Namespace) -> int:
    from deeprecognition.shards.encode import ImageFormat
    from deeprecognition.shards.pack import pack as pack_shards
    from deeprecognition.shards.plan import PackOptions

    options = PackOptions(
        image=ImageFormat(size=args.size, resize=args.resize, encoding=args.format, quality=args.quality),
        split=args.split,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        allow_missing=args.allow_missing,
        strict=args.strict,
        num_workers=args.num_workers,
    )
    report = pack_shards(args.src, args.dest, options, progress=not args.quiet)
    m = report.manifest
    if report.up_to_date:
        print(f"{args.dest} is already packed from this source with these options: nothing to do")
    counts = ", ".join(f"{split} {info.samples} in {len(info.shards)} shards" for split, info in m.splits.items())
    print(f"packed {counts} into {args.dest} ({report.built} shards built, {report.kept} kept from an earlier run)")
    if m.skipped["missing"]:
        print(f"{m.skipped['missing']} listed images were absent and skipped (--allow-missing)")
    if m.skipped["undecodable"]:
        bad = ", ".join(m.skipped["undecodable_files"][:10])
        print(f"{m.skipped['undecodable']} images did not decode and were skipped: {bad}")
    if not report.up_to_date:
        print(f"{report.images_per_s:.0f} images/s over {report.seconds:.1f} s")
    if report.retries:
        print(
            f"{report.retries} storage operations were retried (connections reset or cut, throttling; each is logged)"
        )
    return 0


def verify(args: argparse.Namespace) -> int:
    from deeprecognition.shards.verify import verify as verify_shards

    report = verify_shards(args.data, num_workers=args.num_workers)
    for p in report.problems:
        print(f"BAD {p.shard}: {p.problem}")
    for name in report.unlisted:
        print(f"UNLISTED {name}: in the folder but not in manifest.json, so never read (a shard of another pack?)")
    status = "OK" if report.ok else f"{len(report.problems)} bad shard(s)"
    retried = f" ({report.retries} storage operations retried)" if report.retries else ""
    print(f"{status}: checked {report.shards} shards, {report.samples} samples in {args.data}{retried}")
    return 0 if report.ok else 1


def stats(args: argparse.Namespace) -> int:
    from deeprecognition.shards.stats import dataset_stats, format_table, stats_json

    stats = dataset_stats(args.data, plot=args.plot)
    if args.json:
        print_json(args, stats_json(stats), indent=1)
        return 0
    print(format_table(stats))
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def bench(args: argparse.Namespace) -> int:
    from deeprecognition.bench import BenchOptions, run_bench

    options = BenchOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchOptions)})
    result = run_bench(args.what, options)
    if args.json:
        print_json(args, result)
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0


def train(args: argparse.Namespace) -> int:
    """`deeprec train classifier|gan`: the config from preset, flags and --set; fit unless --dry-run."""
    from deeprecognition import launch
    from deeprecognition.config import apply_overrides, to_dict

    base = args.presets[args.preset]() if args.preset else args.start()
    cfg = apply_overrides(base, given_flags(args) + args.set).validate()
    if args.dry_run:
        print(json.dumps(to_dict(cfg), indent=1))
        return 0
    outcome = launch.train(cfg)
    if not outcome.ok:
        print(f"deeprec train {args.job}: {outcome.line}", file=sys.stderr)
        return 1
    print(outcome.line)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from deeprecognition.classifier.evaluate import evaluate_checkpoint
    from deeprecognition.classifier.metrics import format_report

    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split)
    if args.json:
        print_json(args, {k: v for k, v in result.items() if k != "metrics"})
        return 0
    title = f"{result['task']} on {args.split} ({result['samples']} images), {result['checkpoint']}"
    print(format_report(result["metrics"], title))
    return 0


def generate(args: argparse.Namespace) -> int:
    from deeprecognition.gan.generate import generate_grid

    ema = False if args.no_ema else None
    gan = generate_grid(
        args.checkpoint, args.out, args.n, args.seed, ema, args.latest, attrs=args.attrs, edit=args.edit
    )
    what = f"{args.n} rows of edits ({args.edit})" if args.edit else f"{args.n} faces"
    asked = f" with {args.attrs}" if args.attrs else ""
    print(f"{what}{asked} from {gan.checkpoint} (iteration {gan.iteration}) written to {args.out}")
    return 0


def fid(args: argparse.Namespace) -> int:
    from deeprecognition.gan.fid import fid_between

    if args.samples < 2:
        raise ValueError(f"--samples must be at least 2 (FID needs a covariance), got {args.samples}")
    result = fid_between(args.a, args.b, args.samples, args.split_a, args.split_b, args.inception_weights)
    if args.json:
        print_json(args, result)
        return 0
    print(f"A: {result['a']}, {result['samples_a']} faces\nB: {result['b']}, {result['samples_b']} faces")
    print(f"features: {result['feature_extractor']}")
    print(f"FID {result['fid']:.2f}   KID {result['kid']:.4f} ± {result['kid_std']:.4f}")
    return 0


def evaluate_gan(args: argparse.Namespace) -> int:
    from deeprecognition.gan.metrics import EVAL_SEED, evaluate_gan

    result = evaluate_gan(
        args.checkpoint,
        data=args.data or "",
        classifier=args.classifier or "",
        features=args.fid_features,
        inception_weights=args.inception_weights,
        samples=args.samples,
        seed=EVAL_SEED if args.seed is None else args.seed,
        ema=False if args.no_ema else None,
        latest=args.latest,
        control=args.control,
        contrast=args.contrast,
    )
    if args.json:
        print_json(args, result)
        return 0
    _print_evaluation(result)
    return 0


def _print_evaluation(result: dict) -> None:
    where = result["where"] or "all"
    print(
        f"{result['checkpoint']} (iteration {result['iteration']}): {result['samples']} generated vs "
        f"{result['real_samples']} real faces (where {where})"
    )
    print(f"features: {result['feature_extractor']}")
    print(f"FID {result['fid']:.2f}   KID {result['kid']:.4f} ± {result['kid_std']:.4f}")
    if result["attribute_rate"]:
        print(f"{'attribute':<22}{'generated':>10}{'real':>8}")
        for name, rate in result["attribute_rate"].items():
            print(f"{name:<22}{rate:>10.3f}{result['data_attribute_rate'][name]:>8.3f}")
    if "control" in result:
        print(f"control (the judge's accuracy and balanced accuracy on real {result['judge_split']} faces beside):")
        print(f"{'attribute':<22}{'rate at 1':>10}{'rate at 0':>10}{'control':>9}{'edits':>7}{'judge':>7}{'bal.':>7}")
        for name, c in result["control"].items():
            print(
                f"{name:<22}{c['rate_when_1']:>10.3f}{c['rate_when_0']:>10.3f}{c['accuracy']:>9.3f}"
                f"{c['edit_accuracy']:>7.3f}{c['judge_accuracy']:>7.3f}{c['judge_balanced_accuracy']:>7.3f}"
            )
        print(f"mean control accuracy {result['control_mean_accuracy']:.3f}, edits {result['edit_mean_accuracy']:.3f}")
    for asked, rows in result.get("contrast", {}).items():
        print(f"asking {asked}=1 instead of 0, all else fixed: judged rates (the data's beside)")
        for name, r in rows.items():
            real = (r["data_rate_when_1"], r["data_rate_when_0"])
            data = "   data " + " vs ".join("-" if x is None else f"{x:.3f}" for x in real)
            print(f"{name:<22}{r['rate_when_1']:>7.3f} vs {r['rate_when_0']:.3f}{data}")


def curves(args: argparse.Namespace) -> int:
    from deeprecognition.classifier.report import write_curves

    runs = write_curves(args.runs, args.out)
    print(f"learning curves of {runs} run(s) written to {args.out}")
    return 0


def checkpoints_list(args: argparse.Namespace) -> int:
    from deeprecognition.runs.catalog import format_runs, list_runs, runs_json

    runs = list_runs(args.uri)
    if args.json:
        print_json(args, runs_json(runs), indent=1)
    else:
        print(format_runs(runs))
    return 0


def checkpoints_pull(args: argparse.Namespace) -> int:
    from deeprecognition.runs.catalog import human_bytes
    from deeprecognition.runs.pull import pull

    progress = sys.stderr.isatty()
    r = pull(args.uri, args.dest, best=args.best, checkpoint=args.checkpoint, workers=args.workers, progress=progress)
    checks = ", ".join(f"{n} by {how}" for how, n in sorted(r.checks.items()))
    if r.up_to_date:
        print(f"{r.dest} already holds {r.source}: {r.files} files verified ({checks})")
    else:
        print(
            f"pulled {r.source} into {r.dest}: {r.files} files, {human_bytes(r.bytes)} ({r.fetched} fetched, "
            f"{r.kept} kept from an interrupted pull; verified {checks}) in {r.seconds:.1f} s"
        )
    if r.retries:
        print(f"{r.retries} storage operations were retried (connections reset or cut, throttling; each is logged)")
    return 0


def tune(args: argparse.Namespace) -> int:
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
    if args.replay:
        return _replay(args, options)
    result = run_sweep(options)  # with --json, main() sends Tune's progress (on stdout) to stderr
    if args.json:
        print_json(args, result.to_json())
    else:
        print(format_table(result))
        print(f"results.csv, results.png and each trial's run (trials/<trial id>/) are in {result.path}")
    if result.incomplete:
        states = ", ".join(f"{t.trial_id} {t.status}" for t in result.incomplete)
        print(
            f"deeprec tune: {len(result.incomplete)} trial(s) did not finish ({states}): "
            "run the same command with --resume to continue",
            file=sys.stderr,
        )
        return 1
    return 0


def _replay(args: argparse.Namespace, options: SweepOptions) -> int:
    """`deeprec tune FILE --replay`: the pbt sweep's best schedule trained again as one run."""
    from deeprecognition.sweep.replay import replay_best

    result = replay_best(options)
    if args.json:
        print_json(args, dataclasses.asdict(result))
    else:
        changes = ", ".join(f"{e['iteration']}: {e['config']}" for e in result.schedule)
        print(f"replayed the best schedule ({changes}) in {result.run}: latest checkpoint {result.checkpoint}")
    return 0


def print_json(args: argparse.Namespace, document: object, indent: int | None = None) -> None:
    """A --json command's document, kept for main() to print once stdout is stdout again."""
    args.document = json.dumps(document, indent=indent)
