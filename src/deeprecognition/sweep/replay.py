"""`deeprec tune FILE --replay`: train a pbt sweep's best schedule again, as one run.

The sweep's best_schedule.json says which searched values trained the best model from which
iteration on (its donors' values before each exploit, sweep/pbt.py `lineage`). The replay is one
Train run, SWEEP/replay, fitted once per segment of that schedule: each fit trains to the next
change's iteration (its last iteration, so it checkpoints there) and the next fit, the same run with
the next values, continues from that checkpoint with the new learning rates applied after the
optimiser state loads (runs/resume.py), exactly as the exploited trial continued from its donor's.
So it is the same training as the best trial's lineage, in one run's checkpoints and metrics, not a
new search. Running it again continues an interrupted replay: segments already trained do nothing.
Ray's PopulationBasedTrainingReplay does the same from a pbt_policy_*.txt, as a Tune trial paused and
restored at each change; that log is written on the Tune driver's disk and names trials by tag,
while ours is in the sweep's storage beside results.csv.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from deeprecognition import storage
from deeprecognition.config import apply_overrides
from deeprecognition.launch import fit
from deeprecognition.sweep.trial import checkpoint_uri, trial_config
from deeprecognition.sweep.tuner import BEST_SCHEDULE, SweepOptions, prepare

RUN = "replay"  # SWEEP/replay


@dataclass(frozen=True)
class ReplayResult:
    run: str  # the replay's Train run
    schedule: list[dict[str, Any]]  # [{iteration, config}], as trained
    metrics: dict[str, Any]  # its last checkpoint's report
    checkpoint: str | None


def segments(schedule: list[dict[str, Any]], iterations: int) -> list[tuple[int, dict[str, Any]]]:
    """(last iteration, values) of each fit: a change's values train up to the next change."""
    ends = [entry["iteration"] for entry in schedule[1:]] + [iterations]
    return [(end, entry["config"]) for entry, end in zip(schedule, ends) if end > entry["iteration"]]


def replay_best(options: SweepOptions) -> ReplayResult:
    """Train the best schedule of the pbt sweep at options.storage/name (see the module)."""
    prepared = prepare(options)
    if prepared.spec.scheduler.name != "pbt":
        raise ValueError(f"{options.file}: --replay replays a pbt sweep's best schedule; this sweep is not pbt")
    where = storage.join(prepared.path, BEST_SCHEDULE)
    schedule = json.loads(storage.read_required(where, "the best schedule a pbt sweep writes when it ends"))
    if not schedule:
        raise ValueError(f"{where}: no trial of the sweep reached the metric, so there is no schedule to replay")
    plan = dataclasses.replace(prepared.plan, runs=prepared.path)
    for end, values in segments(schedule, prepared.spec.base.optim.iterations):
        result = fit(apply_overrides(trial_config(plan, values, RUN), [f"optim.iterations={end}"]))
    latest = checkpoint_uri(result.checkpoint) if result.checkpoint else None
    return ReplayResult(storage.join(prepared.path, RUN), schedule, dict(result.metrics or {}), latest)
