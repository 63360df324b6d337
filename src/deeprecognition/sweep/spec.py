"""A sweep file (tune_configs/*.yaml) read into a typed, checked `SweepSpec`.

Everything that can be wrong in a sweep file is refused here, on the driver, before any trial
starts: unknown keys and config fields, distributions Tune cannot sample, values the config itself
refuses, short names that collide, metrics the loop never reports, resources no trial could use.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import yaml

from deeprecognition import storage
from deeprecognition.config import (
    GAN_PRESETS,
    PRESETS,
    ClassifierConfig,
    GanConfig,
    apply_overrides,
    from_dict,
    to_dict,
)
from deeprecognition.sweep import pbt

KEYS = (
    "preset",
    "set",
    "search",
    "metric",
    "mode",
    "scheduler",
    "searcher",
    "num_samples",
    "trial",
    "max_concurrent",
    "seed",
    "smoke",
)
SMOKE_KEYS = ("set", "search", "scheduler", "searcher", "num_samples", "trial", "max_concurrent")
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
# Fields the sweep sets itself (from --data/--storage, the trial id, `trial:` and PBT), never the file.
RESERVED = ("storage", "name", "resume_from", "data.data", "scale.num_workers", "scale.gpu")
# How trials' values are drawn: random (Tune's variant generator: grids crossed, the rest drawn) or
# optuna (Tune's OptunaSearch: each trial's values from what the earlier trials scored).
SEARCHERS = ("random", "optuna")
# What each loop reports to Ray Train, hence what a sweep can rank and stop trials by.
METRICS = {
    "classifier": ("val/mean_accuracy", "val/exact_match", "train/loss", "train/mean_accuracy"),
    "gan": ("fid", "kid", "loss/d", "loss/g", "score/conditional", "control_mean_accuracy"),
}
# A conditional GAN's, reported only when its config asks for control (eval.control).
CONTROL_METRICS = ("score/conditional", "control_mean_accuracy")


def kind_of(cfg: ClassifierConfig | GanConfig) -> str:
    return "gan" if isinstance(cfg, GanConfig) else "classifier"


@dataclass(frozen=True)
class Distribution:
    kind: str  # grid (every value, crossed with the other grids) | choice | uniform | loguniform
    values: tuple[Any, ...]  # grid, choice: the values; uniform, loguniform: (low, high)


@dataclass(frozen=True)
class SearchField:
    field: str  # dotted config field, e.g. model.layers
    dist: Distribution

    @property
    def short(self) -> str:
        """The name trials, tables and --json use: the field's last component (`layers`)."""
        return self.field.rsplit(".", 1)[-1]


@dataclass(kw_only=True, frozen=True)
class SchedulerSpec:
    name: str = "fifo"  # fifo (every trial to the end) | asha (stops weak trials early) | pbt (sweep/pbt.py)
    # One per report that carries the metric (an epoch, an FID evaluation), the seconds trained, or the GAN's iteration.
    time_attr: str = "training_iteration"
    max_t: int = 100  # asha: no trial runs longer than this
    grace_period: int = 1  # asha: no trial is stopped before this
    reduction_factor: float = 2.0  # asha: each rung keeps the best 1/reduction_factor
    perturbation_interval: float = 2.0  # pbt: time_attr units between two perturbations of a trial
    quantile_fraction: float = 0.25  # pbt: the worst fraction takes a checkpoint of the best fraction
    resample_probability: float = 0.25  # pbt: a mutated value is drawn afresh, else x0.8/x1.2 (a choice: a neighbour)
    mutate: tuple[str, ...] = ()  # pbt: the searched fields it changes mid-run; the parser fills in every one
    # pbt: every trial waits at each perturbation for the others, then the worst quantile_fraction
    # exploit: as many exploits each time, at the price of every trial pausing (a new Train fit each).
    synch: bool = False


@dataclass(kw_only=True, frozen=True)
class TrialResources:
    workers: int = 1  # Ray Train workers (DDP ranks) per trial
    gpu: bool = False  # one GPU per worker
    max_failures: int = 2  # times a trial whose driver died (a lost node, no room in time) runs again


@dataclass(frozen=True)
class SweepSpec:
    file: str
    preset: str
    base: ClassifierConfig | GanConfig  # the preset with `set` and --set applied, checked
    search: tuple[SearchField, ...]
    metric: str
    mode: str  # max | min
    scheduler: SchedulerSpec
    num_samples: int
    trial: TrialResources
    max_concurrent: int
    seed: int  # of the random draws of choice, uniform and loguniform
    searcher: str = "random"  # random | optuna

    @property
    def kind(self) -> str:
        return kind_of(self.base)

    @property
    def stem(self) -> str:
        """The sweep's default name: the file's name without .yaml."""
        return os.path.splitext(os.path.basename(self.file))[0]


def load_spec(
    path: str, smoke: bool = False, overrides: tuple[str, ...] = (), num_samples: int | None = None
) -> SweepSpec:
    """Read and check a sweep file; `smoke` applies its `smoke:` section, `overrides` (FIELD=VALUE)
    go on top of its `set:`, `num_samples` replaces its own."""
    try:  # safe_load: a tag that would build a Python object is an error, never a call
        raw = yaml.safe_load(storage.read_required(path, "a sweep file (tune_configs/*.yaml)"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not plain YAML data ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep file is a mapping of {', '.join(KEYS)}")
    try:
        return _parse(path, _with_smoke(raw) if smoke else _without_smoke(raw), overrides, num_samples)
    except ValueError as err:
        raise ValueError(f"{path}{' (--smoke)' if smoke else ''}: {err}") from None


def _known_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> dict:
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(unknown)} in {where}; known: {', '.join(allowed)}")
    return mapping


def _mapping(raw: dict, key: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a mapping")
    return value


def _without_smoke(raw: dict) -> dict:
    _known_keys(_mapping(raw, "smoke"), SMOKE_KEYS, "smoke")  # a bad smoke section fails either way
    return {k: v for k, v in raw.items() if k != "smoke"}


def _with_smoke(raw: dict) -> dict:
    """The file with its `smoke:` section on top: `set` and `trial` merge key by key, the rest replace."""
    smoke = _known_keys(_mapping(raw, "smoke"), SMOKE_KEYS, "smoke")
    merged = _without_smoke(raw)
    for key, value in smoke.items():
        merged[key] = {**_mapping(raw, key), **value} if key in ("set", "trial") else value
    return merged


def _preset(name: Any) -> ClassifierConfig | GanConfig:
    presets = {**PRESETS, **GAN_PRESETS}
    if not isinstance(name, str) or name not in presets:
        raise ValueError(f"preset must be one of {', '.join(presets)}, got {name!r}")
    return presets[name]()


def _field_value(cfg: Any, dotted: str) -> Any:
    node = to_dict(cfg)
    for part in dotted.split("."):
        node = node[part]
    return node


def _checked(base: Any, dotted: str, value: Any, where: str) -> Any:
    """`value` as the field's type, once the whole config accepts it (e.g. model.layers 7 does not)."""
    try:
        return _field_value(apply_overrides(base, [f"{dotted}={value}"]).validate(), dotted)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _reserved(fields: list[str], where: str) -> None:
    taken = [f for f in fields if f in RESERVED]
    if taken:
        raise ValueError(
            f"{where} cannot set {', '.join(taken)}: the sweep sets them from --data, --storage, the trial id and "
            "trial.workers/gpu"
        )


def _distribution(base: Any, dotted: str, spec: Any) -> Distribution:
    where = f"search.{dotted}"
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ValueError(
            f"{where} must be one distribution, e.g. {{grid: [1, 2]}}; distributions: {', '.join(DISTRIBUTIONS)}"
        )
    ((kind, values),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"{where}: unknown distribution {kind!r}; distributions: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: {kind} takes a non-empty list, e.g. {kind}: [1, 2]")
    if kind in ("grid", "choice"):
        return Distribution(kind, tuple(_checked(base, dotted, v, where) for v in values))
    not_a_range = ValueError(f"{where}: {kind} takes [low, high] of a float field; use grid or choice for other fields")
    # The range's own rule first: it names the problem better than the field's (0 is no learning rate).
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise not_a_range
    low, high = values
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ValueError(
            f"{where}: {kind} needs {'0 < ' if kind == 'loguniform' else ''}low < high, got [{low}, {high}]"
        )
    checked = tuple(_checked(base, dotted, v, where) for v in values)
    if not all(isinstance(v, float) for v in checked):
        raise not_a_range
    return Distribution(kind, checked)


def _search(base: Any, raw: Any) -> tuple[SearchField, ...]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError("search must map at least one dotted config field to a distribution")
    _reserved(list(raw), "search")
    fields = tuple(SearchField(dotted, _distribution(base, dotted, spec)) for dotted, spec in raw.items())
    by_short: dict[str, str] = {}
    for f in fields:
        if f.short in by_short:
            raise ValueError(
                f"search fields {by_short[f.short]} and {f.field} share the short name {f.short!r}: search one of them"
            )
        by_short[f.short] = f.field
    return fields


def _metric(base: Any, metric: Any, mode: Any) -> None:
    kind = kind_of(base)
    known = METRICS[kind] + (tuple(f"val/acc/{a}" for a in base.attributes()) if kind == "classifier" else ())
    if metric not in known:
        raise ValueError(f"metric must be one the {kind} loop reports: {', '.join(known)}; got {metric!r}")
    if metric in CONTROL_METRICS and not (base.eval.control and base.schedule.eval_every):
        raise ValueError(
            f"metric {metric} is reported by a conditional GAN with eval.control and schedule.eval_every set"
        )
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min, got {mode!r}")


def _scheduler(raw: Any, kind: str) -> SchedulerSpec:
    if not isinstance(raw, (str, dict)):
        raise ValueError(f"scheduler must be fifo, asha, pbt, or a mapping with name: and its settings, got {raw!r}")
    fields = dict({"name": raw} if isinstance(raw, str) else raw)
    mutate = fields.pop("mutate", [])  # a list: from_dict takes scalars only
    if not (isinstance(mutate, list) and all(isinstance(m, str) for m in mutate)):
        raise ValueError(f"scheduler.mutate must be a list of searched fields, e.g. [optim.lr_g], got {mutate!r}")
    sched = from_dict(SchedulerSpec, fields, prefix="scheduler.")
    if sched.name not in ("fifo", "asha", "pbt"):
        raise ValueError(f"scheduler.name must be fifo, asha or pbt, got {sched.name!r}")
    clocks = ("training_iteration", "time_total_s", *(("iteration",) if kind == "gan" else ()))
    if sched.time_attr not in clocks:
        raise ValueError(f"scheduler.time_attr must be {' or '.join(clocks)}, got {sched.time_attr!r}")
    if not 1 <= sched.grace_period <= sched.max_t or sched.reduction_factor <= 1:
        raise ValueError(
            f"scheduler needs 1 <= grace_period <= max_t and reduction_factor > 1, got {sched.grace_period}, "
            f"{sched.max_t}, {sched.reduction_factor}"
        )
    if mutate and sched.name != "pbt":
        raise ValueError("scheduler.mutate is pbt's: the fields it changes mid-run")
    return dataclasses.replace(sched, mutate=tuple(mutate))


def _pbt(sched: SchedulerSpec, base: Any, search: tuple[SearchField, ...], metric: str) -> SchedulerSpec:
    """The pbt scheduler with `mutate` filled in, once all it needs holds (sweep/pbt.py)."""
    pbt.check_checkpoints(base, metric)
    pbt.check_settings(sched.perturbation_interval, sched.quantile_fraction, sched.resample_probability)
    mutate = pbt.checked_mutate(sched.mutate, {f.field: f.dist.kind for f in search})
    return dataclasses.replace(sched, mutate=mutate)


def _searcher(raw: Any, search: tuple[SearchField, ...], scheduler: SchedulerSpec) -> str:
    if raw not in SEARCHERS:
        raise ValueError(f"searcher must be one of {', '.join(SEARCHERS)}, got {raw!r}")
    if raw == "optuna":
        if importlib.util.find_spec("optuna") is None:
            raise ValueError("searcher optuna needs the optuna package: pip install optuna")
        grids = [f.field for f in search if f.dist.kind == "grid"]
        if grids:
            raise ValueError(f"searcher optuna draws every value: search {', '.join(grids)} with choice, not grid")
        if scheduler.name == "pbt":
            raise ValueError("searcher optuna cannot drive scheduler pbt: PBT changes the trials' values itself")
    return raw


def _whole(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be a whole number of at least {minimum}, got {value!r}")
    return value


def _parse(path: str, raw: dict, overrides: tuple[str, ...], num_samples: int | None) -> SweepSpec:
    _known_keys(raw, KEYS, "the sweep file")
    settings = [f"{k}={v}" for k, v in _mapping(raw, "set").items()] + list(overrides)
    set_fields = [s.partition("=")[0].strip() for s in settings]
    _reserved(set_fields, "set and --set")
    trial = from_dict(TrialResources, _mapping(raw, "trial"), prefix="trial.")
    if trial.workers < 1:
        raise ValueError(f"trial.workers must be at least 1, got {trial.workers}")
    if trial.max_failures < 0:
        raise ValueError(
            f"trial.max_failures must be 0 (a failed trial stays failed) or more, got {trial.max_failures}"
        )
    base = apply_overrides(
        _preset(raw.get("preset")), settings + [f"scale.num_workers={trial.workers}", f"scale.gpu={trial.gpu}"]
    ).validate()
    search = _search(base, raw.get("search"))
    clash = sorted({f.field for f in search} & set(set_fields))  # the search would silently win
    if clash:
        raise ValueError(f"{', '.join(clash)} both set and searched: keep one")
    _metric(base, raw.get("metric"), raw.get("mode"))
    scheduler = _scheduler(raw.get("scheduler", "fifo"), kind_of(base))
    if scheduler.name == "pbt":
        scheduler = _pbt(scheduler, base, search, raw["metric"])
    return SweepSpec(
        file=path,
        preset=raw["preset"],
        base=base,
        search=search,
        metric=raw["metric"],
        mode=raw["mode"],
        scheduler=scheduler,
        num_samples=_whole(raw.get("num_samples", 1) if num_samples is None else num_samples, "num_samples"),
        trial=trial,
        max_concurrent=_whole(raw.get("max_concurrent", 1), "max_concurrent"),
        seed=_whole(raw.get("seed", 0), "seed", minimum=0),
        searcher=_searcher(raw.get("searcher", "random"), search, scheduler),
    )
