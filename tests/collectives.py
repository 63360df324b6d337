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

What is recorded: every call to a name in COLLECTIVES made through `torch.distributed.X` or
`torch.distributed.distributed_c10d.X` at call time (our code and torchmetrics both do), as the op,
its tensor arguments (shape, dtype, device), the reduce op and the root or peer. Torch builds some
calls from others (all_gather_object runs two all_gather, broadcast_object_list two broadcast, send
runs isend): the inner calls are recorded too, one `depth` deeper, because their tensors are the ones
that travel; under NCCL they sit on `torch.cuda.current_device()`, so if the ranks never call
`torch.cuda.set_device`, every rank but 0 shows a violation (cuda:0 where cuda:{rank} is expected). Object arguments (`obj`, `object_list`) are pickled,
not sent as tensors, so they carry no device rule.

What it cannot see:
- DDP's own traffic: the constructor's shape check and parameter broadcast (`_broadcast_coalesced`)
  and the reducer's bucket all_reduce run in C++. They are symmetric by construction when every rank
  builds the same model and runs the same number of backward passes (uneven batch counts per rank
  hang; only gloo's timeout shows that).
- Functional collectives and DTensor (`torch.distributed._functional_collectives`), which go through
  the c10d op dispatcher, not these functions.
- A name bound before recording starts (`from torch.distributed import all_reduce` in a module that
  `fn`'s module imports): call collectives through the module.
- Subgroups: records are compared whole, and a rank outside a group skips that group's calls.
TORCH_DISTRIBUTED_DEBUG=DETAIL makes gloo raise on mismatched collectives itself, but with torch
2.14.1 it segfaults in DDP's constructor on gloo; this recorder works with DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import multiprocessing
import os
import pickle
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any, TextIO

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

SENDS = frozenset({"send", "isend"})
RECVS = frozenset({"recv", "irecv"})
# Point-to-point calls pair a send on one rank with a recv on another: they are matched per
# (sender, receiver) channel, not compared rank against rank.
P2P = SENDS | RECVS | {"batch_isend_irecv", "send_object_list", "recv_object_list"}
COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_single",
    "reduce_scatter_tensor", "all_gather", "all_gather_single", "all_gather_into_tensor",
    "all_gather_coalesced", "all_gather_object", "gather", "gather_single", "gather_into_tensor",
    "gather_object", "scatter", "scatter_object_list", "broadcast", "broadcast_object_list",
    "all_to_all", "all_to_all_single", "barrier", "monitored_barrier", *sorted(P2P),
)  # fmt: skip
_OBJECT_ARGS = frozenset(
    {"obj", "object_list", "object_gather_list", "scatter_object_input_list", "scatter_object_output_list"}
)
# Only the root passes these (other ranks pass None), so they are device-checked but not compared.
_ROOT_ONLY_ARGS = frozenset({"gather_list", "gather_tensor", "scatter_list"})
_PEER_ARGS = ("src", "dst", "group_src", "group_dst")

# Spawning a rank and importing torch takes seconds, more on a loaded machine: the rendezvous waits
# this long for the slowest rank, and only then does the clock for deadline_s start.
_STARTUP_S = 120.0
# The time a rank that has written its result has to exit before it is terminated.
_EXIT_S = 5.0
_POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class TensorArg:
    name: str  # the argument, with the index inside a list: "tensor", "tensor_list[1]"
    shape: tuple[int, ...]
    dtype: str  # "float32"
    device: str  # "cpu", "cuda:1"

    @property
    def layout(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"

    def __str__(self) -> str:
        return f"{self.name}={self.layout}@{self.device}"


@dataclasses.dataclass(frozen=True)
class Call:
    """One recorded call, in the rank's call order."""

    index: int
    op: str
    depth: int  # 0: called by user or library code; 1: inside another recorded call; ...
    tensors: tuple[TensorArg, ...]
    reduce_op: str | None
    peer: int | None  # src/dst: the root of a rooted collective, the other end of a send/recv
    violations: tuple[str, ...]  # tensors not on the rank's expected device
    returned: bool = True  # False: the rank was stuck in it, or it raised

    def __str__(self) -> str:
        parts = [str(t) for t in self.tensors]
        parts += [f"op={self.reduce_op}"] if self.reduce_op else []
        parts += [f"{'peer' if self.op in P2P else 'root'}={self.peer}"] if self.peer is not None else []
        nested = f" [nested {self.depth}]" if self.depth else ""
        stuck = "" if self.returned else " (did not return)"
        return f"call {self.index}: {self.op}({', '.join(parts)}){nested}{stuck}"


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


def assert_same_collectives(records: Sequence[Sequence[Call]]) -> None:
    """Fails unless every rank made the same collectives (op, order, shapes, dtypes, reduce op, root;
    nested calls included), every send has its recv, and no tensor was on the wrong device.

    Shapes must match even for all_gather-like calls: NCCL's all_gather, all_reduce and broadcast
    need equal shapes on all ranks. Uneven all_to_all splits would be reported; compare those
    records yourself.
    """
    problems = _problems(records)
    if problems:
        raise AssertionError("\n".join(problems))


# --- recording, inside each rank ---


@contextlib.contextmanager
def record_collectives(path: str, expected_device: torch.device) -> Iterator[None]:
    """Records every call to a name in COLLECTIVES to `path` (JSON lines) while active."""
    # Some names exist only in recent torch (all_gather_single); the others are recorded anyway.
    originals = {name: getattr(c10d, name) for name in COLLECTIVES if hasattr(c10d, name)}
    with open(path, "w", encoding="utf-8") as file:
        recorder = _Recorder(file, expected_device)
        for name, original in originals.items():
            _patch(name, recorder.wrap(name, original))
        try:
            yield
        finally:
            for name, original in originals.items():
                _patch(name, original)


def _patch(name: str, function: Callable[..., Any]) -> None:
    # Callers use either module's name; c10d's own inner calls (all_gather_object -> all_gather)
    # look up its module globals.
    setattr(c10d, name, function)
    if hasattr(dist, name):
        setattr(dist, name, function)


class _Recorder:
    """Writes a JSON line when a call starts and one when it returns, flushed at once, so that a
    rank killed inside a call leaves its record up to and including that call."""

    def __init__(self, file: TextIO, expected_device: torch.device) -> None:
        self._file = file
        self._expected_device = expected_device
        self._lock = threading.RLock()  # _start writes while it holds it
        self._count = 0
        self._depth = threading.local()

    def wrap(self, op: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        @functools.wraps(original)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()  # all_reduce(t) records its default op=SUM
            depth = getattr(self._depth, "value", 0)
            index = self._start(op, depth, bound.arguments)
            self._depth.value = depth + 1
            try:
                result = original(*args, **kwargs)
            finally:
                self._depth.value = depth
            self._write({"returned": index})
            return result

        return recorded

    def _start(self, op: str, depth: int, arguments: dict[str, Any]) -> int:
        tensors = list(_tensor_args(arguments))
        with self._lock:
            call = Call(
                index=self._count,
                op=op,
                depth=depth,
                tensors=tuple(_describe(name, t) for name, t in tensors),
                reduce_op=_reduce_op_name(arguments.get("op")),
                peer=next((arguments[k] for k in _PEER_ARGS if arguments.get(k) is not None), None),
                violations=tuple(
                    f"{name} on {t.device}, expected {self._expected_device}"
                    for name, t in tensors
                    if t.device != self._expected_device
                ),
            )
            self._count += 1
            # "returned" is known only later: its own line says so
            self._write({k: v for k, v in dataclasses.asdict(call).items() if k != "returned"})
        return call.index

    def _write(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()


def _tensor_args(arguments: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in arguments.items():
        if name not in _OBJECT_ARGS:
            yield from _tensors_in(name, value)


def _tensors_in(name: str, value: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):  # tensor lists, and all_gather_coalesced's lists of lists
        for i, item in enumerate(value):
            yield from _tensors_in(f"{name}[{i}]", item)


def _describe(name: str, tensor: torch.Tensor) -> TensorArg:
    return TensorArg(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), str(tensor.device))


def _reduce_op_name(op: Any) -> str | None:
    return None if op is None else getattr(op, "name", None) or str(op)


def read_record(path: str) -> list[Call]:
    """A rank's calls as `record_collectives` wrote them; [] when the rank never started."""
    if not os.path.exists(path):
        return []
    starts: list[dict[str, Any]] = []
    returned: set[int] = set()
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the line a killed rank was writing
                break
            if "returned" in entry:
                returned.add(entry["returned"])
            else:
                starts.append(entry)
    return [_call_from_json(entry, entry["index"] in returned) for entry in starts]


def _call_from_json(entry: dict[str, Any], returned: bool) -> Call:
    tensors = tuple(TensorArg(**{**t, "shape": tuple(t["shape"])}) for t in entry["tensors"])
    return Call(**{**entry, "tensors": tensors, "violations": tuple(entry["violations"]), "returned": returned})


# --- comparing records ---


def _problems(records: Sequence[Sequence[Call]]) -> list[str]:
    divergence = _divergence(records)
    return ([divergence] if divergence else []) + _p2p_mismatches(records) + _device_violations(records)


def _comparable(call: Call) -> tuple[Any, ...]:
    tensors = tuple((t.name, t.shape, t.dtype) for t in call.tensors if t.name.split("[")[0] not in _ROOT_ONLY_ARGS)
    return call.op, call.depth, call.reduce_op, call.peer, tensors


def _divergence(records: Sequence[Sequence[Call]]) -> str | None:
    collectives = [[call for call in record if call.op not in P2P] for record in records]
    keys = [[_comparable(call) for call in calls] for calls in collectives]
    for position in range(max(map(len, keys), default=0)):
        # A slice, not an index: a rank whose record has ended gives (), which differs from any call.
        if len({tuple(k[position : position + 1]) for k in keys}) == 1:
            continue
        lines = [f"collectives diverge at #{position} (send/recv left out):"]
        for rank, calls in enumerate(collectives):
            here = str(calls[position]) if position < len(calls) else f"no call (only {len(calls)} collectives)"
            lines.append(f"  rank {rank}: {here}")
        return "\n".join(lines)
    return None


def _p2p_mismatches(records: Sequence[Sequence[Call]]) -> list[str]:
    sent: defaultdict[tuple[Any, Any], list[str]] = defaultdict(list)
    received: defaultdict[tuple[Any, Any], list[str]] = defaultdict(list)
    for rank, record in enumerate(records):
        for call, after in zip(record, [*record[1:], None]):
            if after is not None and after.depth > call.depth:
                continue  # send -> isend: the innermost call is the transfer; count it once
            payload = ", ".join(t.layout for t in call.tensors)
            if call.op in SENDS:
                sent[(rank, call.peer)].append(payload)
            elif call.op in RECVS:  # peer None (any source) never matches: NCCL has no such recv
                received[(call.peer, rank)].append(payload)
    return [
        f"send/recv {src}->{dst}: sent {sent[(src, dst)]}, received {received[(src, dst)]}"
        for src, dst in sorted(set(sent) | set(received), key=str)
        if sent[(src, dst)] != received[(src, dst)]
    ]


def _device_violations(records: Sequence[Sequence[Call]]) -> list[str]:
    return [
        f"wrong device on rank {rank}, {call}: {violation}"
        for rank, record in enumerate(records)
        for call in record
        for violation in call.violations
    ]


# --- running ranks ---


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
    lines += _problems(records)
    for rank, error in enumerate(errors):
        if error and "\n" in error.strip():
            lines += [f"--- rank {rank} ---", error.rstrip()]
    return "\n".join(lines)
