"""Comparing the ranks' records of collectives (tests/collective_record.py) against NCCL's rules."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .collective_record import P2P, RECVS, ROOT_ONLY_ARGS, SENDS, Call


def assert_same_collectives(records: Sequence[Sequence[Call]]) -> None:
    """Fails unless every rank made the same collectives (op, order, shapes, dtypes, reduce op, root;
    nested calls included), every send has its recv, and no tensor was on the wrong device.

    Shapes must match even for all_gather-like calls: NCCL's all_gather, all_reduce and broadcast
    need equal shapes on all ranks. Uneven all_to_all splits would be reported; compare those
    records yourself.
    """
    found = problems(records)
    if found:
        raise AssertionError("\n".join(found))


def problems(records: Sequence[Sequence[Call]]) -> list[str]:
    divergence = _divergence(records)
    return ([divergence] if divergence else []) + _p2p_mismatches(records) + _device_violations(records)


def _comparable(call: Call) -> tuple[Any, ...]:
    tensors = tuple((t.name, t.shape, t.dtype) for t in call.tensors if t.name.split("[")[0] not in ROOT_ONLY_ARGS)
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
