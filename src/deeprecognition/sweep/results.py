"""What a sweep leaves: one row per trial (its searched values, its last metrics, its checkpoint,
how far it ran), ranked by the sweep's metric, as a terminal table, results.csv and --json."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from deeprecognition import storage
from deeprecognition.config import GanConfig
from deeprecognition.sweep.pbt import Exploit, lineage, own_schedule, read_exploits
from deeprecognition.sweep.trial import TrialPlan, trial_config

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

# Tune's bookkeeping in every result; a row keeps the loop's own metrics and how far Tune counted.
_TUNE_KEYS = {
    "done",
    "trial_id",
    "checkpoint_path",
    "config",
    "timestamp",
    "date",
    "pid",
    "hostname",
    "node_ip",
    "time_this_iter_s",
    "time_since_restore",
    "iterations_since_restore",
    "timesteps_total",
    "episodes_total",
    "timesteps_since_restore",
    "experiment_tag",
    "checkpoint_dir_name",
    "should_checkpoint",
}
# The floor a metric is shown with, when the loop reports one (README: every number with its floor).
FLOORS = {"val/mean_accuracy": "val/mean_majority_baseline"}


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    config: dict[str, Any]  # the searched values, by short name
    metrics: dict[str, Any]  # the trial's last report that carried the sweep's metric
    checkpoint: str | None  # the run's latest checkpoint at that report
    status: str  # finished | stopped (early, by the scheduler) | error | unfinished (resume the sweep)
    progress: str  # how far it trained: "2/4 epochs", "1500/2000 iterations"
    # PBT's exploits of the trial, in order: {iteration, from_trial, config, checkpoint, run} (sweep/pbt.py).
    exploits: list[dict[str, Any]] = field(default_factory=list)
    # Its searched values over its iterations, [{iteration, config}]: its first, then each exploit's.
    schedule: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class SweepResult:
    name: str
    path: str  # the sweep's folder: Tune's state, trials/<trial id>/ (the Train runs), results.csv, results.png
    metric: str
    mode: str
    trials: tuple[TrialRow, ...]  # best first; trials without the metric last

    @property
    def best(self) -> TrialRow | None:
        scored = [t for t in self.trials if self.metric in t.metrics and t.status in ("finished", "stopped")]
        return scored[0] if scored else None

    @property
    def incomplete(self) -> list[TrialRow]:
        return [t for t in self.trials if t.status in ("error", "unfinished")]

    @property
    def best_schedule(self) -> list[dict[str, Any]]:
        """The schedule that trained the best trial's model from iteration 0, [{iteration, config}]:
        after an exploit its donor's schedule up to the exploit, then its own. Empty without a best."""
        best = self.best
        if best is None:
            return []
        histories = {t.trial_id: [Exploit(**e) for e in t.exploits] for t in self.trials}
        initial = {t.trial_id: t.schedule[0]["config"] for t in self.trials}
        return lineage(best.trial_id, len(best.exploits), histories, initial)

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "name": self.name,
            "path": self.path,
            "metric": self.metric,
            "mode": self.mode,
            "trials": [asdict(t) for t in self.trials],
            "best": asdict(best) if best else None,
            "best_schedule": self.best_schedule,
        }


def trial_row(plan: TrialPlan, trial: Trial, state: str) -> TrialRow:
    """A Tune trial's row. `state`: ended (finished, or stopped early by the scheduler: told apart by
    how far it trained), error, or unfinished (interrupted or never started: --resume runs it)."""
    result = trial.last_result
    cfg = trial_config(plan, trial.config, trial.trial_id)  # for its length: optim.iterations, optim.epochs
    if isinstance(cfg, GanConfig):
        ran, target, unit = result.get("iteration", 0), cfg.optim.iterations, "iterations"
    else:
        ran, target, unit = result.get("epoch", -1) + 1, cfg.optim.epochs, "epochs"
    status = state if state != "ended" else "finished" if ran >= target else "stopped"
    metrics = {k: v for k, v in result.items() if k not in _TUNE_KEYS}
    exploits = read_exploits(plan.runs, trial.trial_id)
    # Tune keeps the values a trial was drawn with apart from those PBT gave it later.
    initial = {k: trial.evaluated_params.get(k, v) for k, v in trial.config.items()}
    return TrialRow(
        trial.trial_id,
        dict(trial.config),
        metrics,
        result.get("checkpoint_path"),
        status,
        f"{ran}/{target} {unit}",
        [asdict(e) for e in exploits],
        own_schedule(initial, exploits),
    )


def trial_rows(plan: TrialPlan, path: str) -> list[TrialRow]:
    """Every trial of the sweep at `path`, as Tune recorded it there."""
    from ray.tune import ExperimentAnalysis

    states = {"TERMINATED": "ended", "ERROR": "error"}
    return [trial_row(plan, t, states.get(t.status, "unfinished")) for t in ExperimentAnalysis(path).trials]


def ranked(rows: list[TrialRow], metric: str, mode: str) -> tuple[TrialRow, ...]:
    def key(row: TrialRow) -> tuple[bool, float]:
        value = row.metrics.get(metric)
        missing = not isinstance(value, (int, float)) or math.isnan(value)
        return missing, 0.0 if missing else (-value if mode == "max" else value)

    return tuple(sorted(rows, key=key))


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


def format_table(result: SweepResult) -> str:
    """The trials best first, the searched values, the metric (and its floor), how far each ran."""
    shorts = list(result.trials[0].config) if result.trials else []
    floor = FLOORS.get(result.metric)
    head = ["trial", *shorts, result.metric, *([floor] if floor else []), "progress", "status"]
    body = [
        [
            t.trial_id,
            *(_cell(t.config.get(s)) for s in shorts),
            _cell(t.metrics.get(result.metric)),
            *([_cell(t.metrics.get(floor))] if floor else []),
            t.progress,
            t.status,
        ]
        for t in result.trials
    ]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *body]]
    best = result.best
    if best is not None:
        values = " ".join(f"{k}={_cell(v)}" for k, v in best.config.items())
        lines += [
            "",
            f"best ({result.mode} {result.metric}): trial {best.trial_id}  {values}  "
            f"{result.metric}={_cell(best.metrics[result.metric])}",
            f"checkpoint: {best.checkpoint}",
        ]
    return "\n".join(lines)


def csv_bytes(result: SweepResult) -> bytes:
    """One line per trial, best first: the searched values, status, progress, every metric, checkpoint."""
    shorts = list(result.trials[0].config) if result.trials else []
    metrics = sorted({k for t in result.trials for k in t.metrics} - {result.metric})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial_id", *shorts, result.metric, "status", "progress", *metrics, "checkpoint"])
    for t in result.trials:
        writer.writerow(
            [
                t.trial_id,
                *(t.config.get(s) for s in shorts),
                t.metrics.get(result.metric),
                t.status,
                t.progress,
                *(t.metrics.get(m) for m in metrics),
                t.checkpoint,
            ]
        )
    return out.getvalue().encode()


class TrialLog(Callback):
    """Appends each trial's row to SWEEP/trials.jsonl the moment Tune records it as ended (finished
    or stopped early), so a long sweep can be followed from its storage, local or S3."""

    def __init__(self, plan: TrialPlan, path: str) -> None:
        self.plan = plan
        self.uri = storage.join(path, "trials.jsonl")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        row = trial_row(self.plan, trial, "ended")
        before = storage.read_bytes(self.uri) if storage.exists(self.uri) else b""
        storage.write_bytes_atomic(self.uri, before + (json.dumps(asdict(row)) + "\n").encode())
