"""Recording a rank's `torch.distributed` calls (tests/collectives.py runs the ranks that use it).

What is recorded: every call to a name in COLLECTIVES made through `torch.distributed.X` or
`torch.distributed.distributed_c10d.X` at call time (our code and torchmetrics both do), as the op,
its tensor arguments (shape, dtype, device), the reduce op and the root or peer. Torch builds some
calls from others (all_gather_object runs two all_gather, broadcast_object_list two broadcast, send
runs isend): the inner calls are recorded too, one `depth` deeper, because their tensors are the ones
that travel; under NCCL they sit on `torch.cuda.current_device()`, so if the ranks never call
`torch.cuda.set_device`, every rank but 0 shows a violation (cuda:0 where cuda:{rank} is expected).
Object arguments (`obj`, `object_list`) are pickled, not sent as tensors, so they carry no device rule.

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
import os
import threading
from collections.abc import Callable, Iterator
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
ROOT_ONLY_ARGS = frozenset({"gather_list", "gather_tensor", "scatter_list"})
_PEER_ARGS = ("src", "dst", "group_src", "group_dst")


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
