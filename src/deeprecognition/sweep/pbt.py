"""Population-based training (`scheduler: pbt`): Ray's PopulationBasedTraining over the sweep's
trials, what a pbt sweep file may ask for, and the record of each exploit.

An exploit, as Ray's scheduler does it: at a perturbation a trial in the worst `quantile_fraction`
is paused, its searched values become a best trial's with the `mutate` fields perturbed, and Tune
restarts it from that donor's latest Tune checkpoint. Every report this sweep gives Tune carries a
checkpoint that only names the reporting run's Train checkpoint (sweep/trial.py), so the restarted
driver knows it was handed a checkpoint that is not its own. It starts a new Train run of its own,
SWEEP/trials/<trial id>-g<N> (a new name: a run resumes only its own checkpoints, and the donor's run
keeps training), with `resume_from` naming the donor's Train checkpoint: the run's first resume loads
G, D, the EMA, both optimisers and the iteration from there, then the new config's learning rates
(runs/resume.py). It appends the exploit to SWEEP/trials/<trial id>/exploits.jsonl before training:
our own record, in the sweep's storage whether local or s3:// (Ray's pbt_policy_*.txt logs are
written to the driver's local experiment folder and name trials by tag, not by run or checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from deeprecognition import storage
from deeprecognition.config import ClassifierConfig, GanConfig

# What PBT may change mid-run: fields the restore applies after loading the optimiser state (the
# learning rates, Adam's betas) or that only shape the steps to come (D steps per G step, the batch).
# Others shape the checkpoint itself (model.latent, model.width, model.arch, optim.optimizer) or
# change what the EMA and the metrics mean mid-way (model.ema_decay): a donor's checkpoint would not
# load into them, or the population would no longer compare like with like.
MUTABLE = ("optim.lr_g", "optim.lr_d", "optim.beta1", "optim.beta2", "optim.n_dis", "data.batch_size")
EXPLOITS = "exploits.jsonl"
# Before a trial exploits a donor, the donor trains on: its checkpoint must outlive the exploiting
# trial's start (Ray warns likewise for CheckpointConfig.num_to_keep <= 2).
MIN_KEEP = 3


def checked_mutate(mutate: tuple[str, ...], searched: dict[str, str]) -> tuple[str, ...]:
    """The fields PBT mutates (`mutate`, or every searched one), given the searched fields and their
    distributions' kinds; a ValueError names the key that cannot work."""
    grids = [f for f, kind in searched.items() if kind == "grid"]
    if grids:
        raise ValueError(
            f"search {', '.join(grids)}: grid under scheduler pbt, whose exploits replace a trial's values mid-run; "
            "use choice"
        )
    mutate = mutate or tuple(searched)
    unsearched = [m for m in mutate if m not in searched]
    if unsearched:
        raise ValueError(f"scheduler.mutate: {', '.join(unsearched)} not searched: add it to search:")
    fixed = [m for m in mutate if m not in MUTABLE]
    if fixed:
        raise ValueError(
            f"scheduler.mutate: {', '.join(fixed)} cannot change mid-run (a donor's checkpoint would not fit it); "
            f"mutable: {', '.join(MUTABLE)}; list those to change in scheduler.mutate (the others are drawn once "
            "per trial and passed on with the donor's checkpoint)"
        )
    return mutate


def check_settings(perturbation_interval: float, quantile_fraction: float, resample_probability: float) -> None:
    if perturbation_interval <= 0:
        raise ValueError(f"scheduler.perturbation_interval must be above 0, got {perturbation_interval}")
    if not 0 < quantile_fraction <= 0.5:
        raise ValueError(f"scheduler.quantile_fraction must be in (0, 0.5], got {quantile_fraction}")
    if not 0 <= resample_probability <= 1:
        raise ValueError(f"scheduler.resample_probability must be in [0, 1], got {resample_probability}")


def check_checkpoints(base: ClassifierConfig | GanConfig, metric: str) -> None:
    """PBT's exploits and replays count GAN iterations, and each report it ranks must carry the
    checkpoint of the weights it measured."""
    if not isinstance(base, GanConfig):
        raise ValueError("scheduler pbt needs a GAN preset: its exploits and replays count GAN iterations")
    sched = base.schedule
    if metric in ("fid", "kid") and not (
        sched.eval_every and sched.checkpoint_every and sched.eval_every % sched.checkpoint_every == 0
    ):
        raise ValueError(
            f"scheduler pbt on {metric}: schedule.eval_every ({sched.eval_every}) must be a multiple of "
            f"schedule.checkpoint_every ({sched.checkpoint_every}), so that a donor's score and checkpoint agree"
        )
    if base.scale.keep_checkpoints < MIN_KEEP:
        raise ValueError(
            f"scheduler pbt needs scale.keep_checkpoints of at least {MIN_KEEP} (got {base.scale.keep_checkpoints}): "
            "a donor's checkpoint must outlive the start of the trial that takes it"
        )


@dataclass(frozen=True)
class Exploit:
    iteration: int  # the donor checkpoint's GAN iteration, where the trial continues with `config`
    from_trial: str  # the donor
    config: dict[str, Any]  # the trial's searched values from then on
    checkpoint: str  # the donor's Train checkpoint it started from
    run: str  # the Train run it trains in from then on: <trial id>-g<N>


def exploits_uri(runs: str, trial_id: str) -> str:
    return storage.join(runs, trial_id, EXPLOITS)


def read_exploits(runs: str, trial_id: str) -> list[Exploit]:
    uri = exploits_uri(runs, trial_id)
    if not storage.exists(uri):
        return []
    return [Exploit(**json.loads(line)) for line in storage.read_bytes(uri).decode().splitlines() if line]


def append_exploit(runs: str, trial_id: str, exploit: Exploit) -> None:
    """Only the trial's own driver writes its file, one driver at a time: read, append, replace."""
    uri = exploits_uri(runs, trial_id)
    before = storage.read_bytes(uri) if storage.exists(uri) else b""
    storage.write_bytes_atomic(uri, before + (json.dumps(asdict(exploit)) + "\n").encode())


def donor_run(exploit: Exploit) -> str:
    """The Train run the donor checkpoint belongs to: RUNS/<run>/checkpoint_..."""
    return exploit.checkpoint.rstrip("/").rsplit("/", 2)[-2]


def own_schedule(initial: dict[str, Any], exploits: list[Exploit]) -> list[dict[str, Any]]:
    """A trial's searched values over its iterations: its first ones, then each exploit's."""
    return [{"iteration": 0, "config": initial}] + [{"iteration": e.iteration, "config": e.config} for e in exploits]


def lineage(trial_id: str, generation: int, histories: dict[str, list[Exploit]], initial: dict[str, dict]) -> list:
    """The schedule that trained generation `generation` of `trial_id` (its run `<trial id>-g<N>`,
    0: `<trial id>`) from iteration 0: its donor's schedule up to the exploit, then its own values.
    A donor's generation started at or before the checkpoint taken from it, so nothing is cut."""
    if generation == 0:
        return [{"iteration": 0, "config": initial[trial_id]}]
    exploit = histories[trial_id][generation - 1]
    donor, _, donor_generation = donor_run(exploit).partition("-g")
    before = lineage(donor, int(donor_generation or 0), histories, initial)
    return [*before, {"iteration": exploit.iteration, "config": exploit.config}]
