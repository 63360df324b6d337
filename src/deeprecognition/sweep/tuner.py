"""`deeprec tune`: a Ray Tune sweep whose trials are distributed Ray Train runs, from a sweep file.

Everything is checked before the first trial starts (the file, the dataset, what one trial needs
against what the cluster can hold). The sweep lives at STORAGE/NAME (local or s3://): Tune's state,
`sweep.json` (the resolved sweep), `trials/<trial id>/` (each trial's Train run: checkpoints,
metrics.jsonl, report; under pbt also its exploits.jsonl, and `trials/<trial id>-g<N>/`, the run
it trains in after its Nth exploit), `trials.jsonl` (trials as they end), and at the end
`results.csv`, `results.png` and, for pbt, `best_schedule.json` (what `--replay` trains again:
sweep/replay.py). `--resume` continues an interrupted sweep from there; ended trials are not re-run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ray import tune

from deeprecognition import storage
from deeprecognition.config import apply_overrides, to_dict
from deeprecognition.launch import absolute_paths, check_before_workers, ray_storage_path
from deeprecognition.raycluster import cluster_capacity, ensure_ray
from deeprecognition.runs import placement
from deeprecognition.sweep.plot import sweep_png
from deeprecognition.sweep.results import SweepResult, TrialLog, csv_bytes, ranked, trial_rows
from deeprecognition.sweep.spec import SweepSpec, load_spec
from deeprecognition.sweep.trial import TrialPlan, run_trial

RECORD = "sweep.json"
BEST_SCHEDULE = "best_schedule.json"  # a pbt sweep's best trial's schedule, [{iteration, config}]


@dataclass(frozen=True)
class SweepOptions:
    file: str  # a sweep file, e.g. tune_configs/cnn_layers.yaml
    data: str  # a packed dataset, local or s3://
    storage: str  # where sweeps live, local or s3://
    name: str | None = None  # default: the file's name, with -smoke under --smoke
    num_samples: int | None = None  # instead of the file's
    resume: bool = False
    replay: bool = False  # train the pbt sweep's best schedule again (sweep/replay.py) instead
    smoke: bool = False  # the file's smoke: section (few steps, small batches, one CPU worker)
    overrides: tuple[str, ...] = ()  # FIELD=VALUE on top of the file's set:


def check_capacity(spec: SweepSpec) -> None:
    """Refuse a trial that this cluster can never place (Tune would wait for it forever)."""
    trial = spec.trial
    placement.check_gpu_type(spec.base.scale.gpu_type)
    need = {
        k: v * trial.workers for k, v in placement.worker_resources(spec.base).items()
    }  # the trial's driver holds none
    capacity = cluster_capacity()
    short = {k: v for k, v in need.items() if v > capacity.get(k, 0)}
    if short:
        wants = ", ".join(f"{v:g} {k}" for k, v in need.items())
        has = ", ".join(f"{capacity.get(k, 0):g} {k}" for k in short)
        raise ValueError(
            f"{spec.file}: one trial needs {wants} for its {trial.workers} worker(s), but this Ray cluster can hold at "
            f"most {has}: "
            "lower trial.workers, set trial.gpu: false, lower data.loader_workers, or use a bigger cluster"
        )


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The searched fields by short name, as Tune's search space."""
    make = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda v: tune.uniform(*v),
        "loguniform": lambda v: tune.loguniform(*v),
    }
    return {f.short: make[f.dist.kind](list(f.dist.values)) for f in spec.search}


def population_based_training(spec: SweepSpec, domains: dict[str, Any]):
    """Ray's PBT over `domains` (param_space: the searched fields by short name) for the `mutate` ones."""
    from ray.tune.schedulers import PopulationBasedTraining

    s = spec.scheduler
    short = {f.field: f.short for f in spec.search}
    mutations = {}
    for field in s.mutate:
        domain = domains[short[field]]
        # A choice mutates to a neighbour in its list (or is redrawn): PBT wants the list itself.
        mutations[short[field]] = list(domain.categories) if hasattr(domain, "categories") else domain
    return PopulationBasedTraining(
        time_attr=s.time_attr,
        perturbation_interval=s.perturbation_interval,
        quantile_fraction=s.quantile_fraction,
        resample_probability=s.resample_probability,
        hyperparam_mutations=mutations,
        synch=s.synch,
    )


def _scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = spec.scheduler
    if s.name == "fifo":
        return FIFOScheduler()
    if s.name == "pbt":
        return population_based_training(spec, param_space(spec))
    return ASHAScheduler(
        time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period, reduction_factor=s.reduction_factor
    )


def _record(spec: SweepSpec) -> dict[str, Any]:
    """The resolved sweep, as JSON: what a resume must match (the file's path may differ)."""
    record = dataclasses.asdict(spec)
    del record["file"]
    return json.loads(json.dumps(record))


def _searcher(spec: SweepSpec):
    """Tune's variant generator (grids crossed, the rest drawn from `seed`), or OptunaSearch (TPE,
    seeded) held to max_concurrent trials at once."""
    if spec.searcher == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=spec.max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=spec.max_concurrent, random_state=spec.seed)


def _fresh(spec: SweepSpec, root: str, name: str, trainable, plan: TrialPlan) -> tune.Tuner:
    path = storage.join(root, name)
    if tune.Tuner.can_restore(path):
        raise ValueError(f"a sweep already exists at {path}: add --resume to continue it, or --name for a new one")
    storage.write_bytes_atomic(storage.join(path, RECORD), json.dumps(_record(spec), indent=1).encode())
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            scheduler=_scheduler(spec),
            num_samples=spec.num_samples,
            search_alg=_searcher(spec),
        ),
        # A trial whose driver dies (its node lost, no room for its workers within
        # scale.start_timeout_s) runs again, resuming its own Train run from its checkpoint.
        run_config=tune.RunConfig(
            name=name,
            storage_path=root,
            callbacks=[TrialLog(plan, path)],
            failure_config=tune.FailureConfig(max_failures=spec.trial.max_failures),
        ),
    )


def _resumed(spec: SweepSpec, path: str, trainable) -> tune.Tuner:
    if not tune.Tuner.can_restore(path):
        raise ValueError(
            f"no sweep to resume at {path}: check --storage and --name (without --resume a new sweep starts)"
        )
    saved = json.loads(storage.read_required(storage.join(path, RECORD), "the record of the sweep"))
    changed = sorted(k for k, v in _record(spec).items() if saved.get(k) != v)
    if changed:
        raise ValueError(
            f"the sweep at {path} was started with other {', '.join(changed)}: resume it with the same file and "
            "options, or start a new one with --name"
        )
    # Errored trials are resumed from their Train run's latest checkpoint, like interrupted ones.
    return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)


@dataclass(frozen=True)
class Prepared:
    """A checked sweep on a connected cluster: its spec (with --data), name, folder and trials' plan."""

    spec: SweepSpec
    root: str  # --storage, as Ray wants it
    name: str
    path: str  # root/name
    plan: TrialPlan


def prepare(options: SweepOptions) -> Prepared:
    """Check the file, the dataset and what one trial needs against the cluster (started or joined)."""
    spec = load_spec(options.file, smoke=options.smoke, overrides=options.overrides, num_samples=options.num_samples)
    base = absolute_paths(apply_overrides(spec.base, [f"data.data={options.data}"]))
    spec = dataclasses.replace(spec, base=base)
    check_before_workers(base)
    ensure_ray()
    check_capacity(spec)
    name = options.name or spec.stem + ("-smoke" if options.smoke else "")
    root = ray_storage_path(options.storage)
    path = storage.join(root, name)
    plan = TrialPlan(
        kind=spec.kind,
        base=to_dict(base),
        fields={f.short: f.field for f in spec.search},
        metric=spec.metric,
        runs=storage.join(path, "trials"),
    )
    return Prepared(spec, root, name, path, plan)


def run_sweep(options: SweepOptions) -> SweepResult:
    """Check everything, run (or resume) the sweep to its end or an interruption, write results.csv
    and results.png beside it (and a pbt sweep's best_schedule.json), and return its trials, best first."""
    prepared = prepare(options)
    spec, name, path, plan = prepared.spec, prepared.name, prepared.path, prepared.plan
    # The trial's driver only waits on its Train run: it holds no CPU (Tune's default is one), so a
    # trial takes what its workers take and max_concurrent alone decides how many run. Tune wants a
    # non-empty request: one byte of memory.
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"cpu": 0, "memory": 1})
    tuner = _resumed(spec, path, trainable) if options.resume else _fresh(spec, prepared.root, name, trainable, plan)
    tuner.fit()  # returns early, state saved, on Ctrl+C (SIGINT) or SIGUSR1: --resume continues
    result = SweepResult(name, path, spec.metric, spec.mode, ranked(trial_rows(plan, path), spec.metric, spec.mode))
    storage.write_bytes_atomic(storage.join(path, "results.csv"), csv_bytes(result))
    storage.write_bytes_atomic(storage.join(path, "results.png"), sweep_png(result, spec))
    if spec.scheduler.name == "pbt":  # what `--replay` trains
        storage.write_bytes_atomic(storage.join(path, BEST_SCHEDULE), json.dumps(result.best_schedule).encode())
    return result
