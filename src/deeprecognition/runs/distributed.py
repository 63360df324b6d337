"""The few collectives our own code runs, written once with NCCL's rules in mind: every rank calls
them at the same point with tensors on its own device, and in one process (no process group) they
are the identity. Work that all ranks share (GAN evaluation, metrics) goes through here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(x: Tensor) -> Tensor:
    """x summed over the ranks (a new tensor; x stays as it was)."""
    total = x.clone()
    if world()[1] > 1:
        dist.all_reduce(total)
    return total


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's `n`, in rank order."""
    size = world()[1]
    if size == 1:
        return [n]
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(every, mine)
    return [int(t.item()) for t in every]


def all_gather_rows(x: Tensor) -> Tensor:
    """Every rank's rows of x (shapes equal but for the first dimension), concatenated in rank
    order, on every rank. Ranks may hold different numbers of rows, none included: the rows are
    padded to the longest for the collective, which needs equal shapes."""
    sizes = gather_sizes(len(x), x.device)
    if len(sizes) == 1:
        return x
    padded = torch.zeros((max(1, *sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    every = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(every, padded)
    return torch.cat([rows[:n] for rows, n in zip(every, sizes)])
