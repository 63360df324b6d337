"""The few collectives our own code runs, written once with NCCL's rules in mind: every rank calls
them at the same point with tensors on its own device, and in one process (no process group) they
are the identity. Work that all ranks share (GAN evaluation, metrics) goes through here; so do the
DDP wrapper the loops train through and the way back to the plain module inside it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


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


def data_parallel(module: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """`module` under DDP when there are several ranks (its weights broadcast from rank 0 now, a
    collective), else `module` itself."""
    if world_size == 1:
        return module
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside DDP's and torch.compile's wrappers (either, both or none): what
    evaluates, draws and is checkpointed."""
    while True:
        if isinstance(module, DistributedDataParallel):
            module = module.module
        # torch.compile's OptimizedModule keeps the original as `_orig_mod`; checked by name, as
        # importing torch._dynamo for its class costs a second.
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module
