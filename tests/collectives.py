"""Run a function on N real gloo ranks, record each rank's collectives, and check NCCL's rules.

NCCL needs every rank to join every collective in the same order, with the same shapes and dtypes,
each tensor on the rank's own device; break a rule and it hangs. Gloo on CPU forgives most of it
(an all_reduce of 3 elements against one of 4 "succeeds" on one rank), so tests that run gloo must
check the rules themselves:

- `run_ranks` spawns one process per rank in a fresh gloo group on 127.0.0.1, records the rank's
  `torch.distributed` calls while `fn(rank, world_size, *args)` runs, and returns each rank's return
  value and record. A rank that raises fails the caller (`RanksFailed`) with its traceback; a stuck
  collective raises inside its rank after `timeout_s` (gloo's timeout); a rank still running after
  `deadline_s` is killed. Records are written a line per call as it happens, so a killed rank's
  record survives, and the report names the call each rank did not return from.
- `assert_same_collectives` fails on the first divergence between the ranks' records (op, order,
  shapes, dtypes, reduce op, root), on send/recv pairs that do not match, and on every tensor that
  was not on the rank's expected device.

Usage (`fn` must be importable, i.e. module-level; its arguments and return value picklable):

    def sum_of_ranks(rank: int, world_size: int) -> float:
        total = torch.tensor([float(rank)])
        dist.all_reduce(total)
        return total.item()

    results = run_ranks(sum_of_ranks, world_size=2, timeout_s=10)
    assert [r.value for r in results] == [1.0, 1.0]
    assert_same_collectives([r.record for r in results])

What is recorded, and what the recorder cannot see: tests/collective_record.py. How records are
compared: tests/collective_compare.py.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist

from .collective_compare import assert_same_collectives, problems
from .collective_record import Call, TensorArg, read_record, record_collectives

__all__ = ["Call", "RankResult", "RanksFailed", "TensorArg", "assert_same_collectives", "run_ranks"]

# Spawning a rank and importing torch takes seconds, more on a loaded machine: the rendezvous waits
# this long for the slowest rank, and only then does the clock for deadline_s start.
_STARTUP_S = 120.0
# The time a rank that has written its result has to exit before it is terminated.
_EXIT_S = 5.0
_POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class RankResult:
    rank: int
    value: Any  # what fn returned on this rank
    record: list[Call]


class RanksFailed(AssertionError):
    """A rank raised, died or was killed; the message has every rank's status and open calls, the
    divergence between the records and the tracebacks."""

    def __init__(self, message: str, records: list[list[Call]]) -> None:
        super().__init__(message)
        self.records = records


def run_ranks(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    args: tuple[Any, ...] = (),
    timeout_s: float = 60.0,
    deadline_s: float = 300.0,
    device: str = "cpu",
) -> list[RankResult]:
    """Runs `fn(rank, world_size, *args)` on `world_size` gloo ranks, each in its own process.

    timeout_s: gloo's limit for each collective; a stuck one raises in its rank, with a traceback.
    deadline_s: how long the ranks may run once all are up before they are killed: the backstop for
    hangs gloo does not end (a rank stuck outside any collective, or in one given a longer timeout).
    device: the device each rank's tensors must be on, formatted with the rank ("cuda:{rank}"); a
    tensor elsewhere is recorded as a violation. Raises RanksFailed unless every rank returns.
    """
    pickle.dumps((fn, args))  # a lambda or a local function fails here, before any rank starts
    with tempfile.TemporaryDirectory(prefix="collectives-") as run_dir:
        spawn = multiprocessing.get_context("spawn")
        procs = [
            spawn.Process(
                target=_rank_main,
                args=(_RankSpec(fn, rank, world_size, args, run_dir, timeout_s, device),),
                name=f"rank-{rank}",
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            _wait_for_ranks(procs, run_dir, deadline_s)
        finally:
            killed = _stop_ranks(procs, run_dir)
        records = [read_record(_record_path(run_dir, rank)) for rank in range(world_size)]
        outcomes = [_read_outcome(run_dir, rank) for rank in range(world_size)]
    errors = [_rank_error(outcome, k, p.exitcode) for outcome, k, p in zip(outcomes, killed, procs)]
    if any(errors):
        raise RanksFailed(_failure_report(errors, records), records)
    return [RankResult(rank, outcome["value"], record) for rank, (outcome, record) in enumerate(zip(outcomes, records))]


@dataclasses.dataclass(frozen=True)
class _RankSpec:
    fn: Callable[..., Any]
    rank: int
    world_size: int
    args: tuple[Any, ...]
    run_dir: str
    timeout_s: float
    device: str


def _record_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"rank{rank}.jsonl")


def _outcome_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, f"rank{rank}.outcome")


def _rank_main(spec: _RankSpec) -> None:
    """The body of each rank's process: its outcome goes to a file, whatever happens in fn."""
    outcome: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(spec.run_dir, 'store')}",
            rank=spec.rank,
            world_size=spec.world_size,
            timeout=timedelta(seconds=_STARTUP_S),
        )
        # The rendezvous above waits for the slowest rank to start; collectives get the short limit.
        dist.set_timeout(timedelta(seconds=spec.timeout_s))
        expected_device = torch.device(spec.device.format(rank=spec.rank))
        # The record file appearing tells the parent that this rank is up.
        with record_collectives(_record_path(spec.run_dir, spec.rank), expected_device):
            outcome = {"value": spec.fn(spec.rank, spec.world_size, *spec.args)}
    except BaseException:  # any way fn ends, SystemExit included, goes to the parent as a traceback
        outcome = {"error": traceback.format_exc()}
    _write_outcome(_outcome_path(spec.run_dir, spec.rank), outcome)
    # Exiting without this aborts the process; it also makes peers still in a collective fail fast.
    if dist.is_initialized():
        dist.destroy_process_group()


def _write_outcome(path: str, outcome: dict[str, Any]) -> None:
    try:
        data = pickle.dumps(outcome)
    except Exception as error:
        data = pickle.dumps({"error": f"fn's return value cannot be pickled: {error!r}"})
    with open(path + ".tmp", "wb") as file:  # renamed into place: the parent never reads half of it
        file.write(data)
    os.replace(path + ".tmp", path)


def _read_outcome(run_dir: str, rank: int) -> dict[str, Any] | None:
    path = _outcome_path(run_dir, rank)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as file:
        return pickle.load(file)


def _wait_for_ranks(procs: list[BaseProcess], run_dir: str, deadline_s: float) -> None:
    """Returns once every rank has an outcome or has died, or at the deadline."""
    ranks = range(len(procs))
    deadline = time.monotonic() + _STARTUP_S
    started = False
    while time.monotonic() < deadline:
        # `ended` before `up`: a rank creates its record file before it can leave an outcome.
        ended = [not procs[r].is_alive() or os.path.exists(_outcome_path(run_dir, r)) for r in ranks]
        up = [os.path.exists(_record_path(run_dir, r)) for r in ranks]
        if all(ended) or any(e and not u for e, u in zip(ended, up)):  # one never got up: the rest wait in vain
            return
        if not started and all(up):
            started = True
            deadline = time.monotonic() + deadline_s
        time.sleep(_POLL_S)


def _stop_ranks(procs: list[BaseProcess], run_dir: str) -> list[bool]:
    """Terminates ranks still without an outcome, lets the others exit; returns which were killed."""
    killed = [p.is_alive() and not os.path.exists(_outcome_path(run_dir, r)) for r, p in enumerate(procs)]
    for proc, kill in zip(procs, killed):
        if kill:
            proc.terminate()
    end = time.monotonic() + _EXIT_S
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))
    for proc in procs:
        if proc.is_alive():  # ignored SIGTERM, or never exited after writing its outcome
            proc.kill()
            proc.join()
    return killed


def _rank_error(outcome: dict[str, Any] | None, killed: bool, exitcode: int | None) -> str | None:
    if outcome is not None:
        return outcome.get("error")
    if killed:
        return "killed: still running when run_ranks gave up on it"
    return f"exited with code {exitcode} without an outcome"


def _failure_report(errors: list[str | None], records: list[list[Call]]) -> str:
    lines = ["not every rank returned:"]
    for rank, (error, record) in enumerate(zip(errors, records)):
        status = error.strip().splitlines()[-1] if error else "returned"
        open_calls = [str(call) for call in record if not call.returned]
        where = f"in {' > '.join(open_calls)}" if open_calls else f"no open call ({len(record)} recorded)"
        lines.append(f"  rank {rank}: {status}; {where}")
    lines += problems(records)
    for rank, error in enumerate(errors):
        if error and "\n" in error.strip():
            lines += [f"--- rank {rank} ---", error.rstrip()]
    return "\n".join(lines)
