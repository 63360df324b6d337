"""What a run leaves beside its checkpoints: the resolved config, a JSONL of metrics, TensorBoard
events, and at the end the final metrics (report.json) with whatever files the task adds (a
classifier's report.md and learning curves). Written by rank 0, to local or S3 run storage alike.

A flush sends only what is new, so a long run writes its log in linear bytes (metrics.jsonl is
rewritten whole only when a run resumes and when it ends): on a local disk metrics.jsonl is
appended to; S3 has no append, so each flush is a new object
`metrics.jsonl.parts/NNNNNNNN-from-POSITION-P.jsonl` (its lines replace any earlier ones at
POSITION >= P), folded into metrics.jsonl when the run ends. TensorBoard events go to a
new events file per flush (TensorBoard reads every file in the folder). `read_history` puts the
pieces together; readers never see a line twice or a line the resumed run trained again."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from deeprecognition import storage
from deeprecognition.runs.background import BackgroundWriter

METRICS_LOG = "metrics.jsonl"
PARTS = "metrics.jsonl.parts"
TENSORBOARD = "tensorboard"
_PART = re.compile(r"^(\d{8})-from-([a-z_]+)-(\d+)\.jsonl$")


@dataclass(frozen=True, order=True)
class _Part:
    """One flush's lines on S3: they replace every earlier line at `position` >= `start`."""

    seq: int
    position: str
    start: int

    @property
    def name(self) -> str:
        return f"{self.seq:08d}-from-{self.position}-{self.start}.jsonl"

    @classmethod
    def parse(cls, name: str) -> _Part | None:
        match = _PART.match(name)
        return cls(int(match[1]), match[2], int(match[3])) if match else None


@dataclass(frozen=True)
class _Logged:
    history: list[dict[str, Any]]
    torn: bool  # metrics.jsonl ends in a line cut short: a local append killed midway
    parts: list[_Part]  # oldest first


def _decode(data: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The whole lines of a JSONL file, and whether a last line was cut short (then left out)."""
    complete, _, rest = data.decode().rpartition("\n")
    return [json.loads(line) for line in complete.splitlines() if line.strip()], bool(rest.strip())


def _encode(history: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(m) + "\n" for m in history).encode()


def _parts(run_uri: str) -> list[_Part]:
    return sorted(p for p in map(_Part.parse, storage.list_names(storage.join(run_uri, PARTS))) if p is not None)


def _read(run_uri: str) -> _Logged:
    """metrics.jsonl with the parts after it applied in order. The parts are listed before the
    base is read: a fold that ends in between leaves a base holding those parts, which applying
    them again gives back unchanged."""
    parts = _parts(run_uri)
    base = _base(run_uri)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            datas = list(pool.map(lambda p: storage.read_bytes(storage.join(run_uri, PARTS, p.name)), parts))
    except FileNotFoundError:  # a fold is under way: the base it wrote before removing any part is the whole log
        return _Logged(*_decode(_base(run_uri)), _parts(run_uri))
    history, torn = _decode(base)
    for part, data in zip(parts, datas):
        history = [m for m in history if m[part.position] < part.start] + _decode(data)[0]
    return _Logged(history, torn, parts)


def _base(run_uri: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(run_uri, METRICS_LOG))
    except FileNotFoundError:
        return b""


def read_history(run_uri: str) -> list[dict[str, Any]]:
    """Every line the run logged, in order, each once."""
    return _read(run_uri).history


def _fold(
    run_uri: str, history: list[dict[str, Any]], parts: list[_Part], drop_from: tuple[str, int] | None = None
) -> None:
    """metrics.jsonl := history, then the parts removed, oldest first. Every state in between reads
    as `history`: the parts left are always the newest, which applied to the new base change
    nothing. `drop_from` (position, P): lines at P or later in the parts are not in `history` (a
    resumed run trains them again), so an empty part dropping them is written first and removed last."""
    if parts and drop_from is not None:
        parts = [*parts, _Part(parts[-1].seq + 1, *drop_from)]
        storage.write_bytes_atomic(storage.join(run_uri, PARTS, parts[-1].name), b"")
    storage.write_bytes_atomic(storage.join(run_uri, METRICS_LOG), _encode(history))
    for part in parts:
        storage.remove(storage.join(run_uri, PARTS, part.name))
    storage.remove_empty_folder(storage.join(run_uri, PARTS))


def _append(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _move_events(path: str, uri: str) -> None:
    with open(path, "rb") as f:
        storage.write_bytes_atomic(uri, f.read())
    os.remove(path)


class RunLog:
    """Rank 0's record of a run. On resume it keeps the history up to the checkpoint's position:
    lines logged after the last checkpoint were lost with the failure and are logged again. With a
    `writer`, flushes go to storage in the background (the loops); without one, at once."""

    def __init__(
        self,
        run_uri: str,
        config: dict[str, Any],
        resume_at: int,
        position: str = "epoch",
        writer: BackgroundWriter | None = None,
    ) -> None:
        self.run_uri = run_uri
        self.position = position
        self._writer = writer
        logged = _read(run_uri)
        self.history = [m for m in logged.history if m[position] < resume_at]
        storage.write_bytes_atomic(
            storage.join(run_uri, "training_options.json"), json.dumps(config, indent=1).encode()
        )
        if logged.parts or logged.torn or len(self.history) < len(logged.history):
            # Before this run logs anything: the lines it will log again must not show twice.
            _fold(run_uri, self.history, logged.parts, (position, resume_at))
        self._stored = len(self.history)  # lines already in storage
        self._next_part = 0  # no parts are left after a fold
        self._tb_dir = tempfile.mkdtemp(prefix="deeprec-tb-")
        self._tb: Any = None  # the events file being written, until the next flush
        self._tb_files = 0
        self._tb_run = secrets.token_hex(4)  # events file names of two runs started in the same second must differ

    def log(self, metrics: dict[str, Any], flush: bool = True) -> None:
        """Record one line; `flush` sends what is new to storage (a long GAN schedule flushes at
        checkpoints and evaluations, not every line)."""
        self.history.append(metrics)
        scalars = {
            k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("epoch", "step", "iteration")
        }
        for key, value in scalars.items():
            self._events(metrics["step"]).add_scalar(key, value, global_step=metrics["step"])
        if flush:
            self.flush()

    def _events(self, step: int) -> Any:
        """This flush's events file. The first of a run is started with purge_step: TensorBoard then
        drops the steps from there on that a run before this one logged and did not checkpoint."""
        if self._tb is None:
            from tensorboardX import SummaryWriter

            purge = step if self._tb_files == 0 else None
            self._tb = SummaryWriter(self._tb_dir, purge_step=purge, filename_suffix=self._tb_suffix(self._tb_files))
            self._tb_files += 1
        return self._tb

    def _tb_suffix(self, index: int) -> str:
        return f".{self._tb_run}.{index:06d}"

    def flush(self) -> None:
        new = self.history[self._stored :]
        if new:
            if storage.is_remote(self.run_uri):
                part = _Part(self._next_part, self.position, new[0][self.position])
                self._next_part += 1
                self._submit(
                    f"{PARTS}/{part.name}",
                    storage.write_bytes_atomic,
                    storage.join(self.run_uri, PARTS, part.name),
                    _encode(new),
                )
            else:
                self._submit(
                    METRICS_LOG, _append, storage.local_path(storage.join(self.run_uri, METRICS_LOG)), _encode(new)
                )
            self._stored = len(self.history)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            [name] = [n for n in os.listdir(self._tb_dir) if n.endswith(self._tb_suffix(self._tb_files - 1))]
            self._submit(
                f"{TENSORBOARD}/{name}",
                _move_events,
                os.path.join(self._tb_dir, name),
                storage.join(self.run_uri, TENSORBOARD, name),
            )

    def _submit(self, what: str, job: Callable[..., None], *args: Any) -> None:
        if self._writer is None:
            job(*args)
        else:
            self._writer.submit(what, job, *args)

    def close(self) -> None:
        """Everything logged in storage, and metrics.jsonl whole (on S3 the parts folded into it)."""
        self.flush()
        if self._writer is not None:
            self._writer.drain()
        if storage.is_remote(self.run_uri):
            _fold(self.run_uri, self.history, _parts(self.run_uri))
        shutil.rmtree(self._tb_dir, ignore_errors=True)

    def finish(self, report: dict[str, Any], files: dict[str, bytes]) -> None:
        """The log closed, then the run's final metrics as report.json and the task's own files
        beside it (a classifier's report.md and curves.png): the log knows no task's formats."""
        self.close()
        storage.write_bytes_atomic(storage.join(self.run_uri, "report.json"), json.dumps(report, indent=1).encode())
        for name, data in files.items():
            storage.write_bytes_atomic(storage.join(self.run_uri, name), data)
