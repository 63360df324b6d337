"""The collective recorder (tests/collectives.py) on real gloo ranks: symmetric code passes and is
recorded, each kind of asymmetry fails instead of hanging, a library's collectives are seen.

The rank functions live at module level because each rank is a spawned process that imports them."""

from __future__ import annotations

import time
import warnings
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from .collectives import Call, RanksFailed, TensorArg, assert_same_collectives, run_ranks

# Long enough for gloo on a loaded CI machine, short enough that a failing test fails fast.
TIMEOUT_S = 20
# The mismatch tests wait for gloo's timeout when the ranks are stuck against each other.
MISMATCH_TIMEOUT_S = 5


def every_collective(rank: int, world_size: int) -> dict[str, Any]:
    """The same collectives on every rank, then a send from 0 to 1; returns results to check."""
    # torch 2.14 deprecates all_gather_into_tensor and reduce_scatter_tensor; they still work.
    warnings.simplefilter("ignore", FutureWarning)
    mine = torch.tensor([float(rank + 1), 10.0])
    summed = mine.clone()
    dist.all_reduce(summed)
    gathered = [torch.empty(2) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    dist.all_gather_into_tensor(torch.empty(2 * world_size), mine)
    objects: list[Any] = [None] * world_size
    dist.all_gather_object(objects, {"rank": rank})
    from_root = mine.clone()
    dist.broadcast(from_root, src=0)
    listed: list[Any] = [f"from rank {rank}"]
    dist.broadcast_object_list(listed, src=0)
    dist.reduce(mine.clone(), dst=0, op=dist.ReduceOp.MAX)
    dist.reduce_scatter(torch.empty(2), [mine.clone() for _ in range(world_size)])
    dist.reduce_scatter_tensor(torch.empty(2), torch.ones(2 * world_size))
    dist.gather(mine, [torch.empty(2) for _ in range(world_size)] if rank == 0 else None, dst=0)
    dist.scatter(torch.empty(2), [torch.ones(2) for _ in range(world_size)] if rank == 0 else None, src=0)
    dist.all_to_all([torch.empty(2) for _ in range(world_size)], [mine.clone() for _ in range(world_size)])
    dist.barrier()
    received = torch.zeros(3, dtype=torch.int64)
    if rank == 0:
        dist.send(torch.arange(3), dst=1)
    elif rank == 1:
        dist.recv(received, src=0)
    return {
        "summed": summed.tolist(),
        "gathered": [t.tolist() for t in gathered],
        "objects": objects,
        "from_root": from_root.tolist(),
        "listed": listed,
        "received": received.tolist(),
    }


def test_same_collectives_pass_and_are_recorded() -> None:
    results = run_ranks(every_collective, world_size=2, timeout_s=TIMEOUT_S)

    # The recorder hands calls through unchanged: every result is the real collective's.
    for result in results:
        assert result.value["summed"] == [3.0, 20.0]
        assert result.value["gathered"] == [[1.0, 10.0], [2.0, 10.0]]
        assert result.value["objects"] == [{"rank": 0}, {"rank": 1}]
        assert result.value["from_root"] == [1.0, 10.0]
        assert result.value["listed"] == ["from rank 0"]
    assert results[1].value["received"] == [0, 1, 2]

    common = [
        "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
        "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter",
        "all_to_all", "barrier",
    ]  # fmt: skip
    records = [result.record for result in results]
    assert [call.op for call in records[0] if call.depth == 0] == [*common, "send"]
    assert [call.op for call in records[1] if call.depth == 0] == [*common, "recv"]
    all_reduce = records[1][0]
    assert all_reduce.tensors == (TensorArg("tensor", (2,), "float32", "cpu"),)
    assert all_reduce.reduce_op == "SUM"  # the default, recorded although not passed
    assert next(c for c in records[1] if c.op == "reduce").reduce_op == "MAX"
    # all_gather_object is two all_gather inside: recorded one level deeper, right after it.
    position = next(i for i, c in enumerate(records[0]) if c.op == "all_gather_object")
    assert [(c.op, c.depth) for c in records[0][position + 1 : position + 3]] == [("all_gather", 1)] * 2
    assert all(call.returned and not call.violations for record in records for call in record)
    assert_same_collectives(records)


def reduce_on_0_gather_on_1(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.all_reduce(torch.ones(3))
    else:
        dist.all_gather([torch.empty(3) for _ in range(world_size)], torch.ones(3))


def test_different_collectives_fail_naming_each_ranks_call() -> None:
    with pytest.raises(RanksFailed) as failure:
        run_ranks(reduce_on_0_gather_on_1, timeout_s=MISMATCH_TIMEOUT_S)

    message = str(failure.value)
    assert "collectives diverge at #0" in message
    assert "rank 0: call 0: all_reduce(tensor=float32[3]@cpu, op=SUM)" in message
    assert "rank 1: call 0: all_gather(tensor_list[0]=float32[3]@cpu" in message


def reduce_on_rank_0_only(rank: int, world_size: int) -> None:
    if rank == 0:
        dist.all_reduce(torch.ones(3))


def test_collective_on_rank_0_only_fails() -> None:
    with pytest.raises(RanksFailed) as failure:
        run_ranks(reduce_on_rank_0_only, timeout_s=MISMATCH_TIMEOUT_S)

    message = str(failure.value)
    assert "rank 0: call 0: all_reduce(tensor=float32[3]@cpu, op=SUM) (did not return)" in message
    assert "rank 1: no call (only 0 collectives)" in message
    assert [call.op for call in failure.value.records[0]] == ["all_reduce"]
    assert failure.value.records[1] == []


def reduce_rank_sized(rank: int, world_size: int) -> None:
    dist.all_reduce(torch.ones(3 + rank))


def test_all_reduce_of_different_shapes_is_reported() -> None:
    # Gloo lets the smaller rank finish with a wrong sum; the larger one fails when it leaves. Which
    # of run_ranks and the comparison reports it is gloo's business; the divergence must show.
    with pytest.raises(AssertionError) as failure:
        results = run_ranks(reduce_rank_sized, timeout_s=MISMATCH_TIMEOUT_S)
        assert_same_collectives([result.record for result in results])

    message = str(failure.value)
    assert "rank 0: call 0: all_reduce(tensor=float32[3]@cpu, op=SUM)" in message
    assert "rank 1: call 0: all_reduce(tensor=float32[4]@cpu, op=SUM)" in message


def reduce_cpu_tensor(rank: int, world_size: int) -> None:
    dist.all_reduce(torch.ones(2))


def test_tensor_off_the_expected_device_is_a_violation() -> None:
    # Stands in for a CPU tensor on a CUDA rank: the check compares each tensor's torch.device with
    # the rank's expected one, so "expected meta, found cpu" takes the path that "expected cuda:1,
    # found cpu" takes, without a GPU (gloo itself runs the all_reduce on CPU tensors as usual).
    results = run_ranks(reduce_cpu_tensor, timeout_s=TIMEOUT_S, device="meta")

    assert [result.record[0].violations for result in results] == [("tensor on cpu, expected meta",)] * 2
    with pytest.raises(AssertionError, match=r"wrong device on rank 1, call 0: all_reduce.*expected meta"):
        assert_same_collectives([result.record for result in results])


def synced_sum(rank: int, world_size: int, ranks_computing: tuple[int, ...]) -> float | None:
    from torchmetrics import SumMetric  # here, not at the top: every rank imports this module

    metric = SumMetric(sync_on_compute=True)
    metric.update(torch.tensor(float(rank + 1)))
    return metric.compute().item() if rank in ranks_computing else None


def test_library_collectives_are_recorded() -> None:
    results = run_ranks(synced_sum, args=((0, 1),), timeout_s=TIMEOUT_S)

    assert [result.value for result in results] == [3.0, 3.0]  # compute() did sync
    for result in results:
        assert "all_gather" in [call.op for call in result.record]
    assert_same_collectives([result.record for result in results])


def test_library_sync_on_rank_0_only_fails() -> None:
    with pytest.raises(RanksFailed) as failure:
        run_ranks(synced_sum, args=((0,),), timeout_s=MISMATCH_TIMEOUT_S)

    rank_0, rank_1 = failure.value.records
    assert rank_0 and not rank_0[-1].returned  # torchmetrics' sync is where rank 0 failed
    assert rank_1 == []
    assert "rank 1: no call (only 0 collectives)" in str(failure.value)


def barrier_against_a_sleeper(rank: int, world_size: int) -> None:
    if rank == 0:
        # Its own long timeout keeps gloo from ending the wait: only the deadline of run_ranks can.
        dist.monitored_barrier(timeout=timedelta(hours=1))
    else:
        time.sleep(3600)


def test_rank_stuck_past_the_deadline_is_killed_and_its_call_reported() -> None:
    with pytest.raises(RanksFailed) as failure:
        run_ranks(barrier_against_a_sleeper, deadline_s=5)  # neither rank will ever return

    message = str(failure.value)
    assert "rank 0: killed: still running when run_ranks gave up on it; in call 0: monitored_barrier(" in message
    assert "rank 1: killed: still running when run_ranks gave up on it; no open call (0 recorded)" in message
    assert [(call.op, call.returned) for call in failure.value.records[0]] == [("monitored_barrier", False)]


# --- the comparison alone, on hand-made records ---


def _call(
    op: str, *tensors: TensorArg, index: int = 0, depth: int = 0, reduce_op: str | None = None, peer: int | None = None
) -> Call:
    return Call(index, op, depth, tensors, reduce_op, peer, violations=())


def _tensor(name: str, *shape: int, dtype: str = "float32") -> TensorArg:
    return TensorArg(name, shape, dtype, "cpu")


@pytest.mark.parametrize(
    ("rank_0", "rank_1"),
    [
        (
            _call("all_reduce", _tensor("tensor", 3), reduce_op="SUM"),
            _call("all_reduce", _tensor("tensor", 3), reduce_op="MAX"),
        ),
        (_call("broadcast", _tensor("tensor", 3), peer=0), _call("broadcast", _tensor("tensor", 3), peer=1)),
        (
            _call("broadcast", _tensor("tensor", 3), peer=0),
            _call("broadcast", _tensor("tensor", 3, dtype="int64"), peer=0),
        ),
        (_call("all_gather_object"), _call("broadcast_object_list")),
    ],
    ids=["reduce-op", "root", "dtype", "op"],
)  # fmt: skip
def test_calls_that_differ_are_reported(rank_0: Call, rank_1: Call) -> None:
    with pytest.raises(AssertionError, match="collectives diverge at #0"):
        assert_same_collectives([[rank_0], [rank_1]])


def test_gather_list_is_compared_only_where_passed() -> None:
    on_root = _call("gather", _tensor("tensor", 2), _tensor("gather_list[0]", 2), _tensor("gather_list[1]", 2), peer=0)
    assert_same_collectives([[on_root], [_call("gather", _tensor("tensor", 2), peer=0)]])


def test_sends_and_recvs_are_paired_by_their_innermost_call() -> None:
    # send runs isend inside: the pair is one transfer, which a lone irecv on the peer matches.
    send = [_call("send", _tensor("tensor", 4), peer=1), _call("isend", _tensor("tensor", 4), index=1, depth=1, peer=1)]
    assert_same_collectives([send, [_call("irecv", _tensor("tensor", 4), peer=0)]])
    with pytest.raises(AssertionError, match=r"send/recv 0->1: sent \['float32\[4\]'\], received \['float32\[2\]'\]"):
        assert_same_collectives([send, [_call("irecv", _tensor("tensor", 2), peer=0)]])
