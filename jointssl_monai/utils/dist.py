"""Small ``torch.distributed`` helpers that degrade to no-ops in a single process.

Every collective here must be called by all processes of the default group in the same order, exactly like
the ``torch.distributed`` primitive it wraps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_variable", "all_reduce_max", "all_reduce_sum", "is_dist", "rank", "world_size"]


def is_dist() -> bool:
    """Whether a default process group is initialised (so collectives are meaningful)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group, 1 without one."""
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """Rank of this process in the default group, 0 without one."""
    return dist.get_rank() if is_dist() else 0


def _active(distributed: bool | None) -> bool:
    return is_dist() and world_size() > 1 if distributed is None else bool(distributed) and is_dist()


def all_reduce_sum(tensor: torch.Tensor, distributed: bool | None = None) -> torch.Tensor:
    """Sum ``tensor`` in place over all processes (no-op in one process) and return it.

    Args:
        tensor: the local contribution, overwritten with the global sum.
        distributed: ``None`` reduces whenever a process group is initialised; ``False`` never reduces.
    """
    if _active(distributed):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor, distributed: bool | None = None) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` in place over all processes (no-op in one process)."""
    if _active(distributed):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


@torch.no_grad()
def all_gather_variable(tensor: torch.Tensor, distributed: bool | None = None) -> torch.Tensor:
    """Concatenate along dim 0, in rank order, tensors whose first dimension differs between processes.

    No gradient flows through the result. Trailing dimensions and dtype must agree on every process.
    """
    if not _active(distributed):
        return tensor
    size = world_size()
    counts = torch.zeros(size, dtype=torch.long, device=tensor.device)
    counts[rank()] = tensor.shape[0]
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    longest = int(counts.max())
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts, strict=True)], dim=0)
