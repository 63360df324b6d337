"""One trial of a sweep: a distributed Ray Train run of the sweep's config with the trial's values.

`run_trial` is the Tune trainable and the driver of the inner run (Ray's Tune-over-Train pattern): it
runs in Tune's trial actor and fits the TorchTrainer in a thread of its own, while `MetricReports`
hands the workers' reports back to it, and it gives each to Tune with a checkpoint (`Handed`): a
few bytes that name the run's Train checkpoint at that report. Tune's schedulers then have a
checkpoint for every report (PBT clones them), nothing is stored twice (Ray's TuneReportCallback
cannot pass a checkpoint, and `tune.report(checkpoint=...)` would copy the 346 MB Train checkpoint
into Tune's folder), and the driver of a restarted trial reads from `tune.get_checkpoint()` whether
it continues its own run (--resume, a lost node, a pause) or starts from another trial's (an
exploit: sweep/pbt.py). The training code is the same loop as `deeprec train`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ray.train import UserCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from deeprecognition.config import ClassifierConfig, GanConfig, apply_overrides, from_dict
from deeprecognition.sweep.pbt import Exploit, append_exploit, read_exploits

if TYPE_CHECKING:
    from ray.train import Checkpoint

CONFIG_TYPES = {"classifier": ClassifierConfig, "gan": GanConfig}
POINTER = "train_checkpoint.json"  # the one file of a Tune checkpoint of this sweep


@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares; Tune hands each trial only its searched values, by short name."""

    kind: str  # classifier | gan
    base: dict[str, Any]  # the sweep's checked config (to_dict), absolute paths
    fields: dict[str, str]  # short name -> dotted config field
    metric: str
    runs: str  # where the trials' Train runs live: SWEEP/trials/<trial id>[-g<N>]


@dataclass(frozen=True)
class Handed:
    """What one of this sweep's Tune checkpoints says: whose report it was and its Train checkpoint."""

    trial: str
    run: str  # the trial's Train run at that report: <trial id>, or <trial id>-g<N> after N exploits
    checkpoint: str  # that run's latest Train checkpoint, local path or URI
    iteration: int | None  # the checkpoint's GAN iteration (None for a classifier)


@dataclass(frozen=True)
class Start:
    run: str  # the Train run this driver fits: continued when it has checkpoints
    resume_from: str = ""  # a donor's Train checkpoint, loaded when the run has none of its own


def trial_config(
    plan: TrialPlan, values: dict[str, Any], run: str, resume_from: str = ""
) -> ClassifierConfig | GanConfig:
    """The trial's config; its run is named by the trial id (never a timestamp), so a trial that
    Tune restarts (--resume, a lost node) finds and continues its own Train run."""
    cfg = apply_overrides(
        from_dict(CONFIG_TYPES[plan.kind], plan.base), [f"{plan.fields[k]}={v}" for k, v in values.items()]
    )
    return dataclasses.replace(cfg, storage=plan.runs, name=run, resume_from=resume_from)


def trial_start(plan: TrialPlan, trial_id: str, values: dict[str, Any], handed: Handed | None) -> Start:
    """Which Train run to fit: the trial's first (nothing handed), the one its own checkpoint names,
    or after an exploit a new one from the donor's checkpoint, recorded in its exploits.jsonl. A
    driver restarted before the new run reported to Tune is handed the same donor checkpoint again:
    it continues the run its record names."""
    if handed is None:
        return Start(trial_id)
    if handed.trial == trial_id:
        return Start(handed.run)
    exploits = read_exploits(plan.runs, trial_id)
    if exploits and exploits[-1].checkpoint == handed.checkpoint:
        return Start(exploits[-1].run, handed.checkpoint)
    exploit = Exploit(
        iteration=handed.iteration or 0,
        from_trial=handed.trial,
        config={k: values[k] for k in plan.fields},
        checkpoint=handed.checkpoint,
        run=f"{trial_id}-g{len(exploits) + 1}",
    )
    append_exploit(plan.runs, trial_id, exploit)
    return Start(exploit.run, exploit.checkpoint)


def checkpoint_uri(checkpoint: Checkpoint) -> str:
    """A Ray checkpoint's place as this project writes it: a local path or s3://..."""
    fs = checkpoint.filesystem.type_name
    return checkpoint.path if fs == "local" else f"{fs}://{checkpoint.path}"


class MetricReports(UserCallback):
    """Hands the driver the reports that carry the sweep's metric, each with the run's latest
    checkpoint and its iteration. The GAN checkpoints more often than it measures FID: a report
    without the metric would fail Tune's metric check, and ASHA's training_iteration then counts
    evaluations. Runs in Ray Train's controller; `reports` is a Ray queue of one item, so the run
    waits for the driver (and the driver for Tune) as Ray's TuneReportCallback makes it wait."""

    def __init__(self, metric: str, reports: Any) -> None:
        self.metric = metric
        self.reports = reports
        self.latest: str | None = None
        self.latest_iteration: int | None = None

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:
        if checkpoint is not None:
            self.latest = checkpoint_uri(checkpoint)
            self.latest_iteration = metrics[0].get("iteration")
        if self.metric in metrics[0]:
            self.reports.put(({**metrics[0], CHECKPOINT_PATH_KEY: self.latest}, self.latest_iteration))


def _reports(cfg: ClassifierConfig | GanConfig, metric: str) -> Iterator[tuple[dict[str, Any], int | None]]:
    """The run's reports that carry `metric`, as it makes them; fit's error once it ends."""
    from ray.util.queue import Queue

    from deeprecognition.launch import fit

    reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failed: list[BaseException] = []

    def fitting() -> None:
        try:
            fit(cfg, callbacks=[MetricReports(metric, reports)])
        except BaseException as err:  # noqa: BLE001 - raised again in the driver's thread
            failed.append(err)
        finally:
            reports.put(None)

    # A daemon thread: when Tune stops the trial, the driver's report raises and the actor ends,
    # taking the Train run's controller with it, as when the driver waited in fit() itself.
    threading.Thread(target=fitting, name="train-run", daemon=True).start()
    while (item := reports.get()) is not None:
        yield item
    if failed:
        raise failed[0]


def _report(metrics: dict[str, Any], handed: Handed | None) -> None:
    from ray import tune

    if handed is None:  # no Train checkpoint yet: nothing to continue from
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:  # Tune copies it into the trial's folder
        with open(os.path.join(folder, POINTER), "w") as f:
            json.dump(asdict(handed), f)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _handed(checkpoint: Any) -> Handed | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder, open(os.path.join(folder, POINTER)) as f:
        return Handed(**json.load(f))


def run_trial(values: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune trainable (bound to `plan` with tune.with_parameters)."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    start = trial_start(plan, trial_id, values, _handed(tune.get_checkpoint()))
    cfg = trial_config(plan, values, start.run, start.resume_from)
    for metrics, iteration in _reports(cfg, plan.metric):
        latest = metrics[CHECKPOINT_PATH_KEY]
        _report(metrics, Handed(trial_id, start.run, latest, iteration) if latest else None)
