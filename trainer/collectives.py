"""Collectives the losses and evaluations share, written with plain ``all_gather``/``all_reduce``
so they run on gloo (CPU tests) as well as NCCL, and degrade to identities in one process."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's ``n``, in rank order."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(rank_and_world()[1])]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.int64, device=device))
    return [int(s.item()) for s in sizes]


class AllGatherRows(torch.autograd.Function):
    """Equal-sized ``[n, ...]`` tensors of all ranks, concatenated in rank order.

    Backward: this rank's rows of the sum of every rank's gradient (each rank used the gathered
    rows in its own loss).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward is the sum of the ranks' gradients (every rank holds the result)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_padded(x: torch.Tensor, differentiable: bool) -> tuple[torch.Tensor, list[int]]:
    """Every rank's ``x [n_r, ...]``, padded to the largest ``n_r`` and stacked, and the ``n_r``."""
    sizes = gather_sizes(x.shape[0], x.device)
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0]))
    if differentiable:
        return AllGatherRows.apply(padded), sizes
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat(parts), sizes


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks of tensors whose first dimension may differ by rank (no gradient)."""
    if rank_and_world()[1] == 1:
        return x
    padded, sizes = gather_padded(x, differentiable=False)
    step = max(sizes)
    return torch.cat([padded[r * step : r * step + n] for r, n in enumerate(sizes)])
