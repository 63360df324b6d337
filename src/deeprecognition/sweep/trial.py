"""One trial of a sweep: a distributed Ray Train run of the sweep's config with the trial's values.

`run_trial` is the Tune trainable and the driver of the inner run (Ray's Tune-over-Train pattern): it
runs in Tune's trial actor, builds the TorchTrainer and fits it, while `MetricReports` carries the
workers' reports to Tune's scheduler. The training code is the same loop as `deeprec train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from deeprecognition.config import ClassifierConfig, GanConfig, apply_overrides, from_dict

if TYPE_CHECKING:
    from ray.train import Checkpoint

CONFIG_TYPES = {"classifier": ClassifierConfig, "gan": GanConfig}


@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares; Tune hands each trial only its searched values, by short name."""

    kind: str  # classifier | gan
    base: dict[str, Any]  # the sweep's checked config (to_dict), absolute paths
    fields: dict[str, str]  # short name -> dotted config field
    metric: str
    runs: str  # where the trials' Train runs live: SWEEP/trials/<trial id>


def trial_config(plan: TrialPlan, values: dict[str, Any], trial_id: str) -> ClassifierConfig | GanConfig:
    """The trial's config; its run is named by the trial id (never a timestamp), so a trial that
    Tune restarts (--resume, a lost node) finds and continues its own Train run."""
    cfg = apply_overrides(
        from_dict(CONFIG_TYPES[plan.kind], plan.base), [f"{plan.fields[k]}={v}" for k, v in values.items()]
    )
    return dataclasses.replace(cfg, storage=plan.runs, name=trial_id)


class MetricReports(TuneReportCallback):
    """Passes Tune only the reports that carry the sweep's metric, each with the run's latest
    checkpoint. The GAN checkpoints more often than it measures FID: a report without the metric
    would fail Tune's metric check, and ASHA's training_iteration then counts evaluations."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric
        self.latest: str | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        if checkpoint is not None:
            fs = checkpoint.filesystem.type_name
            self.latest = checkpoint.path if fs == "local" else f"{fs}://{checkpoint.path}"
        if self.metric in metrics[0]:
            super().after_report(run_context, [{**metrics[0], CHECKPOINT_PATH_KEY: self.latest}], None)


def run_trial(values: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune trainable (bound to `plan` with tune.with_parameters)."""
    from ray import tune

    from deeprecognition.launch import fit

    cfg = trial_config(plan, values, tune.get_context().get_trial_id())
    fit(cfg, callbacks=[MetricReports(plan.metric)])
