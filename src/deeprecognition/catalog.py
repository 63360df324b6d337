"""`deeprec checkpoints list URI`: the runs and checkpoints under a storage URI, each checkpoint
with its position, metrics and size, best first.

A checkpoint is any folder holding state.pt (checkpoint.write_checkpoint) and its run is the folder
above it, so one recursive listing finds them all: a storage root of many runs, a sweep's nested
trial folders, one run, or one checkpoint.
"""

from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from deeprecognition import storage
from deeprecognition.checkpoint import CHECKSUMS, METRICS, STATE, incomplete_reason, read_checksums
from deeprecognition.errors import InputError


@dataclass(frozen=True)
class Ranking:
    """What orders checkpoints: one metric, and whether higher is better."""

    metric: str
    higher_is_better: bool

    def key(self, metrics: dict[str, Any]) -> tuple[bool, float, float]:
        """Larger is better. A checkpoint without the metric sorts after those with it; ties go
        to the later one (the step or iteration it was written at)."""
        value = metrics.get(self.metric)
        later = float(metrics.get("iteration", metrics.get("step", 0)))
        if not isinstance(value, (int, float)):
            return (False, 0.0, later)
        return (True, float(value) if self.higher_is_better else -float(value), later)


# By preference: a GAN's FID once it is measured, a classifier's validation accuracy, else the
# latest position (a GAN without FID yet: its later iterations are the better trained ones).
RANKINGS = (
    Ranking("fid", higher_is_better=False),
    Ranking("val/mean_accuracy", higher_is_better=True),
    Ranking("iteration", higher_is_better=True),
    Ranking("epoch", higher_is_better=True),
)


def ranking_for(metrics: list[dict[str, Any]]) -> Ranking:
    return next((r for r in RANKINGS if any(r.metric in m for m in metrics)), RANKINGS[-1])


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
        files = {rel[len(prefix) :]: o.size for rel, o in objects.items() if rel.startswith(prefix) and "/" not in rel[len(prefix) :]}
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
        partial = f" ({len(incomplete)} partial: {'; '.join(f'{f or uri}: {why}' for f, why in sorted(incomplete.items()))})" if incomplete else ""
        raise InputError(uri, f"holds no complete checkpoints{partial}: give a storage folder, a run or a checkpoint")
    metrics = dict(zip(folders, _read_metrics(uri, folders, set(objects))))
    runs = []
    for run in sorted({posixpath.dirname(f) for f in folders}):
        inside = [f for f in folders if posixpath.dirname(f) == run]
        partial = tuple((posixpath.basename(f), why) for f, why in sorted(incomplete.items()) if posixpath.dirname(f) == run)
        ranking = ranking_for([metrics[f] for f in inside])
        checkpoints = [
            CheckpointInfo(run, posixpath.basename(f) or posixpath.basename(uri.rstrip("/")), _uri(uri, f), _size(objects, f), metrics[f])
            for f in inside
        ]
        checkpoints.sort(key=lambda c: (ranking.key(c.metrics), c.name), reverse=True)
        name = run or posixpath.basename(uri.rstrip("/"))
        runs.append(RunInfo(name, _uri(uri, run), _size(objects, run), ranking, tuple(checkpoints), partial))
    runs.sort(key=lambda r: r.ranking.key(r.best.metrics), reverse=True)
    runs.sort(key=lambda r: RANKINGS.index(r.ranking))
    return runs


def _size(objects: dict[str, storage.ObjectInfo], folder: str) -> int:
    prefix = f"{folder}/" if folder else ""
    return sum(o.size for rel, o in objects.items() if rel.startswith(prefix))


def best(uri: str) -> CheckpointInfo:
    """The best checkpoint under `uri`, across its runs when they are ranked by the same metric."""
    runs = list_runs(uri)
    rankings = {r.ranking.metric for r in runs}
    if len(rankings) > 1:
        raise InputError(uri, f"its runs are ranked by different metrics ({', '.join(sorted(rankings))}): give one run's URI")
    return max((r.best for r in runs), key=lambda c: runs[0].ranking.key(c.metrics))


def find(uri: str, name: str) -> CheckpointInfo:
    """The checkpoint called `name` ("checkpoint_000004", or "RUN/checkpoint_000004") under `uri`."""
    found = [c for r in list_runs(uri) for c in r.checkpoints if name in (c.name, posixpath.join(c.run, c.name))]
    if not found:
        raise InputError(uri, f"holds no checkpoint named {name!r}: `deeprec checkpoints list {uri}` shows them")
    if len(found) > 1:
        raise InputError(uri, f"several runs hold {name!r} ({', '.join(c.run for c in found)}): give RUN/{name} or the run's URI")
    return found[0]


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _score(c: CheckpointInfo, ranking: Ranking) -> str:
    value = c.metrics.get(ranking.metric)
    shown = f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)
    return f"{ranking.metric}={shown}"


def format_runs(runs: list[RunInfo]) -> str:
    """A table per run, its checkpoints best first."""
    lines = []
    for r in runs:
        order = "higher" if r.ranking.higher_is_better else "lower"
        lines.append(f"{r.name}  {r.uri}  {len(r.checkpoints)} checkpoint(s), {human_bytes(r.bytes)}, ranked by {r.ranking.metric} ({order} is better)")
        for i, c in enumerate(r.checkpoints):
            lines.append(f"  {'*' if i == 0 else ' '} {c.name:<40} {c.position():<22} {_score(c, r.ranking):<32} {human_bytes(c.bytes):>9}")
        lines += [f"  ! {name:<40} incomplete, not listed: {why}" for name, why in r.incomplete]
    return "\n".join(lines)


def runs_json(runs: list[RunInfo]) -> list[dict[str, Any]]:
    return [
        {
            "run": r.name, "uri": r.uri, "bytes": r.bytes, "ranked_by": r.ranking.metric, "higher_is_better": r.ranking.higher_is_better,
            "checkpoints": [{"name": c.name, "uri": c.uri, "bytes": c.bytes, "metrics": c.metrics} for c in r.checkpoints],
            "incomplete": [{"name": name, "why": why} for name, why in r.incomplete],
        }
        for r in runs
    ]
