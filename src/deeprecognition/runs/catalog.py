"""`deeprec checkpoints list URI`: the runs and checkpoints under a storage URI, each checkpoint
with its position, metrics and size, best first; and the one ranking of checkpoints that every
reader (`generate`, `evaluate`, `evaluate-gan`, `checkpoints pull --best`), the local session's
pruning and resuming, and Ray's CheckpointConfig use.

A checkpoint is any folder holding state.pt (checkpoint.write_checkpoint) and its run is the folder
above it, so one recursive listing finds them all: a storage root of many runs, a sweep's nested
trial folders, one run, or one checkpoint.
"""

from __future__ import annotations

import json
import math
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deeprecognition import storage
from deeprecognition.config import ClassifierConfig, GanConfig
from deeprecognition.errors import InputError
from deeprecognition.runs.checkpoint import CHECKSUMS, METRICS, STATE, incomplete_reason, read_checksums

if TYPE_CHECKING:
    from ray.train import CheckpointConfig


@dataclass(frozen=True)
class CheckpointInfo:
    run: str  # the run's path under the listed URI ("" when the URI is the run itself)
    name: str
    uri: str
    bytes: int
    metrics: dict[str, Any]

    def position(self) -> str:
        """Where in training it was written: "epoch 2 (step 39)" or "iteration 5000"."""
        m = self.metrics
        mid_epoch = ", mid-epoch" if m.get("preemption_checkpoint") and "iteration" not in m else ""
        if "iteration" in m:
            return f"iteration {m['iteration']}"
        if "epoch" in m:
            return f"epoch {m['epoch']} (step {m.get('step', '?')}{mid_epoch})"
        return "?"

    def recency(self) -> tuple[float, tuple[int, ...]]:
        """Larger is later: the step (both loops report it), else the iteration or epoch, then the
        numbers in the name, compared as numbers (checkpoint_1000000 after checkpoint_999999,
        which string order puts first; Ray's timestamped names order the same way)."""
        step = next(
            (self.metrics[k] for k in ("step", "iteration", "epoch") if _number(self.metrics.get(k)) is not None), -1
        )
        return (float(step), tuple(int(digits) for digits in re.findall(r"\d+", self.name)))


def _number(value: Any) -> float | None:
    """A finite int or float as a float; None for anything else (absent, NaN, inf, text, bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class Ranking:
    """What orders a run's checkpoints: one metric and whether higher is better, or (metric None)
    recency alone, the latest first."""

    metric: str | None
    higher_is_better: bool = True

    @property
    def name(self) -> str:
        return self.metric or "latest"

    def score(self, metrics: dict[str, Any]) -> float | None:
        """The checkpoint's value of the metric; None where it was not measured (or is NaN/inf)."""
        return _number(metrics.get(self.metric)) if self.metric else None

    def key(self, checkpoint: CheckpointInfo) -> tuple[bool, float, tuple[float, tuple[int, ...]]]:
        """Larger is better. A checkpoint without the metric is never better than one with it;
        ties, and those without it among themselves, go to the later one."""
        value = self.score(checkpoint.metrics)
        signed = 0.0 if value is None else value if self.higher_is_better else -value
        return (value is not None, signed, checkpoint.recency())


FID = Ranking("fid", higher_is_better=False)
VAL_ACCURACY = Ranking("val/mean_accuracy", higher_is_better=True)
LATEST = Ranking(None)
# By preference: a GAN's FID once any checkpoint of the run has it, a classifier's validation
# accuracy, else the latest (a GAN without FID yet: its later iterations are the better trained).
RANKINGS = (FID, VAL_ACCURACY, LATEST)


def ranking_for(checkpoints: list[CheckpointInfo]) -> Ranking:
    return next(r for r in RANKINGS if r is LATEST or any(r.score(c.metrics) is not None for c in checkpoints))


def rank(checkpoints: list[CheckpointInfo]) -> tuple[Ranking, tuple[CheckpointInfo, ...]]:
    """One run's checkpoints best first, and the ranking that ordered them."""
    ranking = ranking_for(checkpoints)
    return ranking, tuple(sorted(checkpoints, key=ranking.key, reverse=True))


# Ray's score for the checkpoints of a GAN run with evaluation (checkpoint_score_attribute): the
# FID negated, under "max". Ray scores a report without the attribute as -inf times the order
# factor (_get_checkpoint_score in ray/train/_internal/checkpoint_manager.py, which Train V2's
# CheckpointManager inherits and sorts every checkpoint by): under "min" a checkpoint without FID
# would score +inf, the best of all, and push the best-FID checkpoint out of num_to_keep; under
# "max" it scores -inf, the worst. Not measured is a finite sentinel rather than left out (Ray
# logs an error for every report without the attribute) and rather than -inf: Ray keeps the
# metrics in checkpoint_manager_snapshot.json through pydantic, which writes non-finite floats as
# null, and a null score breaks the next checkpoint's ranking after a restore.
RAY_SCORE = "rank/neg_fid"
UNMEASURED = -1e30  # below every negated FID; ties among these go to the later report, as LATEST


def with_ray_score(metrics: dict[str, Any]) -> dict[str, Any]:
    """A GAN report's metrics plus RAY_SCORE: -FID where this report measured it, else UNMEASURED.
    The GAN loop passes the metrics of every report that carries a checkpoint through this."""
    fid = FID.score(metrics)
    return {**metrics, RAY_SCORE: UNMEASURED if fid is None else -fid}


def ray_checkpoint_config(cfg: ClassifierConfig | GanConfig) -> CheckpointConfig:
    """Which checkpoints Ray keeps for a run: the best `scale.keep_checkpoints` by the ranking above,
    plus the latest (Ray always keeps it). A checkpoint without the metric is never among the best:
    a classifier's mid-epoch preemption checkpoint (no val/mean_accuracy) scores -inf under "max",
    a GAN's checkpoint between evaluations UNMEASURED."""
    from ray.train import CheckpointConfig

    keep = cfg.scale.keep_checkpoints
    if isinstance(cfg, ClassifierConfig):
        return CheckpointConfig(
            num_to_keep=keep, checkpoint_score_attribute=VAL_ACCURACY.metric, checkpoint_score_order="max"
        )
    if cfg.schedule.eval_every:
        return CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=RAY_SCORE, checkpoint_score_order="max")
    return CheckpointConfig(num_to_keep=keep)  # never an FID: by recency, as LATEST


@dataclass(frozen=True)
class RunInfo:
    name: str
    uri: str
    bytes: int  # every file of the run, its checkpoints included
    ranking: Ranking
    checkpoints: tuple[CheckpointInfo, ...]  # best first
    incomplete: tuple[tuple[str, str], ...] = ()  # (name, why) of checkpoint folders not whole: never listed above

    @property
    def best(self) -> CheckpointInfo:
        return self.checkpoints[0]

    @property
    def latest(self) -> CheckpointInfo:
        return max(self.checkpoints, key=CheckpointInfo.recency)


def _hidden(rel: str) -> bool:
    """Temp files, interrupted pulls and Ray's markers: names starting with a dot."""
    return any(part.startswith(".") for part in rel.split("/"))


def _uri(root: str, rel: str) -> str:
    return storage.join(root, *rel.split("/")) if rel else root.rstrip("/")


def _read_metrics(uri: str, folders: list[str], files: set[str]) -> list[dict[str, Any]]:
    """metrics.json of each checkpoint folder ({} where absent), fetched concurrently."""

    def read(folder: str) -> dict[str, Any]:
        rel = posixpath.join(folder, METRICS)
        return json.loads(storage.read_bytes(_uri(uri, rel))) if rel in files else {}

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(read, folders))


def incomplete_checkpoints(uri: str, objects: dict[str, storage.ObjectInfo]) -> dict[str, str]:
    """{folder: why} of the checkpoint folders (holding state.pt or checksums.json) under `uri`
    that an interrupted upload left partial; `objects` is `storage.walk(uri)`."""
    folders = sorted({posixpath.dirname(rel) for rel in objects if posixpath.basename(rel) in (STATE, CHECKSUMS)})

    def why(folder: str) -> str | None:
        prefix = f"{folder}/" if folder else ""
        files = {
            rel[len(prefix) :]: o.size
            for rel, o in objects.items()
            if rel.startswith(prefix) and "/" not in rel[len(prefix) :]
        }
        return incomplete_reason(files, read_checksums(_uri(uri, folder)))

    with ThreadPoolExecutor(max_workers=8) as pool:
        return {f: reason for f, reason in zip(folders, pool.map(why, folders)) if reason}


def list_runs(uri: str) -> list[RunInfo]:
    """Every run under `uri` with its checkpoints best first; runs ranked by the same metric are
    ordered by their best checkpoint, best first. A checkpoint folder that is not whole (a killed
    upload) is never listed as a checkpoint: its run names it among `incomplete`."""
    objects = {rel: o for rel, o in storage.walk(uri).items() if not _hidden(rel)}
    found = sorted(posixpath.dirname(rel) for rel in objects if posixpath.basename(rel) == STATE)
    incomplete = incomplete_checkpoints(uri, objects)
    folders = [f for f in found if f not in incomplete]
    if not folders:
        partial = (
            f" ({len(incomplete)} partial: {'; '.join(f'{f or uri}: {why}' for f, why in sorted(incomplete.items()))})"
            if incomplete
            else ""
        )
        raise InputError(uri, f"holds no complete checkpoints{partial}: give a storage folder, a run or a checkpoint")
    metrics = dict(zip(folders, _read_metrics(uri, folders, set(objects))))
    runs = []
    for run in sorted({posixpath.dirname(f) for f in folders}):
        inside = [f for f in folders if posixpath.dirname(f) == run]
        partial = tuple(
            (posixpath.basename(f), why) for f, why in sorted(incomplete.items()) if posixpath.dirname(f) == run
        )
        ranking, checkpoints = rank(
            [
                CheckpointInfo(
                    run,
                    posixpath.basename(f) or posixpath.basename(uri.rstrip("/")),
                    _uri(uri, f),
                    _size(objects, f),
                    metrics[f],
                )
                for f in inside
            ]
        )
        name = run or posixpath.basename(uri.rstrip("/"))
        runs.append(RunInfo(name, _uri(uri, run), _size(objects, run), ranking, checkpoints, partial))
    runs.sort(key=lambda r: r.ranking.key(r.best), reverse=True)
    runs.sort(key=lambda r: RANKINGS.index(r.ranking))
    return runs


def _size(objects: dict[str, storage.ObjectInfo], folder: str) -> int:
    prefix = f"{folder}/" if folder else ""
    return sum(o.size for rel, o in objects.items() if rel.startswith(prefix))


def best(uri: str, latest: bool = False) -> CheckpointInfo:
    """The best checkpoint under `uri`, across its runs when they are ranked by the same metric;
    with `latest`, the latest checkpoint of the one run there."""
    runs = list_runs(uri)
    if latest:
        if len(runs) > 1:
            raise InputError(
                uri,
                f"holds {len(runs)} runs ({', '.join(r.name for r in runs)}): give one run's URI for its latest "
                "checkpoint",
            )
        return runs[0].latest
    rankings = {r.ranking.name for r in runs}
    if len(rankings) > 1:
        raise InputError(
            uri, f"its runs are ranked by different metrics ({', '.join(sorted(rankings))}): give one run's URI"
        )
    return max((r.best for r in runs), key=runs[0].ranking.key)


def best_checkpoint(uri: str, latest: bool = False) -> str:
    """The folder a reader loads: `uri` itself when it is a checkpoint folder, else the best (or
    with `latest` the latest) checkpoint under it."""
    return uri if storage.exists(storage.join(uri, STATE)) else best(uri, latest).uri


def run_at(uri: str) -> RunInfo:
    """The run whose checkpoints lie directly in the folder `uri` (not those of runs below it)."""
    for run in list_runs(uri):
        if run.uri == uri.rstrip("/"):
            return run
    raise InputError(uri, "holds no checkpoints of its own, only runs below it: give one of those")


def find(uri: str, name: str) -> CheckpointInfo:
    """The checkpoint called `name` ("checkpoint_000004", or "RUN/checkpoint_000004") under `uri`."""
    found = [c for r in list_runs(uri) for c in r.checkpoints if name in (c.name, posixpath.join(c.run, c.name))]
    if not found:
        raise InputError(uri, f"holds no checkpoint named {name!r}: `deeprec checkpoints list {uri}` shows them")
    if len(found) > 1:
        raise InputError(
            uri, f"several runs hold {name!r} ({', '.join(c.run for c in found)}): give RUN/{name} or the run's URI"
        )
    return found[0]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _score(c: CheckpointInfo, ranking: Ranking) -> str:
    if ranking.metric is None:
        return ""  # the position column says it all
    value = c.metrics.get(ranking.metric)
    shown = f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)
    return f"{ranking.metric}={shown}"


def format_runs(runs: list[RunInfo]) -> str:
    """A table per run, its checkpoints best first."""
    lines = []
    for r in runs:
        order = (
            "the latest first"
            if r.ranking.metric is None
            else f"{'higher' if r.ranking.higher_is_better else 'lower'} is better"
        )
        lines.append(
            f"{r.name}  {r.uri}  {len(r.checkpoints)} checkpoint(s), {human_bytes(r.bytes)}, ranked by "
            f"{r.ranking.name} ({order})"
        )
        for i, c in enumerate(r.checkpoints):
            lines.append(
                f"  {'*' if i == 0 else ' '} {c.name:<40} {c.position():<22} {_score(c, r.ranking):<32} "
                f"{human_bytes(c.bytes):>9}"
            )
        lines += [f"  ! {name:<40} incomplete, not listed: {why}" for name, why in r.incomplete]
    return "\n".join(lines)


def runs_json(runs: list[RunInfo]) -> list[dict[str, Any]]:
    return [
        {
            "run": r.name,
            "uri": r.uri,
            "bytes": r.bytes,
            "ranked_by": r.ranking.name,
            "higher_is_better": r.ranking.higher_is_better,
            "checkpoints": [
                {"name": c.name, "uri": c.uri, "bytes": c.bytes, "metrics": c.metrics} for c in r.checkpoints
            ],
            "incomplete": [{"name": name, "why": why} for name, why in r.incomplete],
        }
        for r in runs
    ]
