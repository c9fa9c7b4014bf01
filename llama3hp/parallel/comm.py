"""Collective helpers over an explicit process group (None = a group of one: identity).

Checked on gloo in torch 2.13: all_gather_into_tensor, reduce_scatter_tensor and async all_gather
all work on CPU, so NCCL and gloo take the same code path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor collectives (the old names warn); older torch has only the old ones.
all_gather_single = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
reduce_scatter_single = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool = False):
    """Sum x in place over group; returns a work handle with async_op (None for a group of one)."""
    if group is None:
        return None
    return dist.all_reduce(x, group=group, async_op=async_op)


def all_reduced(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """A new tensor: the sum of x over group (x itself is left as it is)."""
    out = x.contiguous().clone()
    all_reduce(out, group)
    return out


def all_gather_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Concatenate x from every rank of group along dim, in group-rank order."""
    n = group_size(group)
    if n == 1:
        return x
    xt = x.movedim(dim, 0).contiguous()
    out = torch.empty((n * xt.shape[0], *xt.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_single(out, xt, group=group)
    return out.movedim(0, dim)


def reduce_scatter_dim(x: torch.Tensor, dim: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Sum x over group and keep this rank's slice along dim (dim size divisible by the group size)."""
    n = group_size(group)
    if n == 1:
        return x
    if x.shape[dim] % n:
        raise ValueError(f"reduce-scatter: dim {dim} of size {x.shape[dim]} is not divisible by {n} ranks")
    xt = x.movedim(dim, 0).contiguous()
    out = torch.empty((xt.shape[0] // n, *xt.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_single(out, xt, group=group)
    return out.movedim(0, dim)
