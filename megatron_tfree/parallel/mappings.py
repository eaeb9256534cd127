"""Autograd-aware collectives over the tensor-parallel group (``state.get().tp_group``).

Each function is the forward of a pair whose backward is its conjugate, as in Megatron-LM:

==========================  =================================  ==================================
function                    forward                            backward
==========================  =================================  ==================================
:func:`copy_to_tp`          identity                           all-reduce (sum)
:func:`reduce_from_tp`      all-reduce (sum)                   identity
:func:`scatter_to_tp`       keep this rank's slice (last dim)  all-gather (last dim)
:func:`gather_from_tp`      all-gather (last dim)              keep this rank's slice
:func:`scatter_to_sp`       keep this rank's slice (seq dim)   all-gather (seq dim)
:func:`gather_from_sp`      all-gather (seq dim)               reduce-scatter (seq dim)
:func:`reduce_scatter_to_sp`  reduce-scatter (seq dim)         all-gather (seq dim)
==========================  =================================  ==================================

The ``*_sp`` variants serve sequence parallelism (``parallel.sequence_parallel``): outside the
tensor-parallel matmuls, activations ``[B, S, h]`` are split along the sequence dimension (dim 1,
batch-first) instead of being replicated. Every function returns its input unchanged when
``tp == 1`` (no process group needed). Split dimensions must be divisible by ``tp``.

gloo (the CPU backend) has no reduce-scatter; there it is an all-reduce followed by a slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import state

__all__ = [
    "copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
    "scatter_to_sp", "gather_from_sp", "reduce_scatter_to_sp", "split_along", "all_gather_along",
    "all_reduce_along",
]

SEQ_DIM = 1  # activations are [B, S, h]


# ------------------------------------------------------------------------------------ raw collectives
def all_reduce_along(x: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """A reduced copy of ``x`` over the TP group (``x`` is not modified)."""
    s = state.get()
    if s.tp == 1:
        return x
    out = x.clone().contiguous()
    dist.all_reduce(out, op=op, group=s.tp_group)
    return out


def split_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    """This TP rank's contiguous slice of ``x`` along ``dim`` (a contiguous copy)."""
    s = state.get()
    if s.tp == 1:
        return x
    size = x.shape[dim]
    if size % s.tp:
        raise ValueError(f"dimension {dim} of size {size} is not divisible by parallel.tensor ({s.tp})")
    return x.narrow(dim, s.tp_rank * (size // s.tp), size // s.tp).contiguous()


def all_gather_along(x: torch.Tensor, dim: int, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenation along ``dim`` of every TP rank's ``x`` (in TP-rank order); ``sizes`` gives each
    rank's extent along ``dim`` when they differ (uneven shards: padded to the largest, then trimmed)."""
    s = state.get()
    if s.tp == 1:
        return x
    width = max(sizes) if sizes else x.shape[dim]
    if x.shape[dim] < width:
        pad = list(x.shape)
        pad[dim] = width - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad)], dim=dim)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(s.tp)]
    dist.all_gather(parts, x, group=s.tp_group)
    if sizes:
        parts = [p.narrow(dim, 0, n) for p, n in zip(parts, sizes)]
    return torch.cat(parts, dim=dim)


def _reduce_scatter_along(x: torch.Tensor, dim: int) -> torch.Tensor:
    s = state.get()
    if s.tp == 1:
        return x
    if x.shape[dim] % s.tp:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by parallel.tensor ({s.tp})")
    if dist.get_backend(s.tp_group) == "gloo":  # no reduce_scatter in gloo
        return split_along(all_reduce_along(x), dim)
    chunks = [c.contiguous() for c in x.chunk(s.tp, dim=dim)]
    out = torch.empty_like(chunks[0])
    dist.reduce_scatter(out, chunks, group=s.tp_group)
    return out


# ------------------------------------------------------------------------------------ autograd pairs
class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return all_reduce_along(g)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return all_reduce_along(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return split_along(x, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather_along(g, ctx.dim), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return all_gather_along(x, dim)

    @staticmethod
    def backward(ctx, g):
        return split_along(g, ctx.dim), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return all_gather_along(x, dim)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter_along(g, ctx.dim), None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return _reduce_scatter_along(x, dim)

    @staticmethod
    def backward(ctx, g):
        return all_gather_along(g, ctx.dim), None


def _trivial() -> bool:
    return state.get().tp == 1


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Identity forward; the backward sums the gradient over the TP group (input of a column split)."""
    return x if _trivial() else _CopyToTP.apply(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """Sum over the TP group forward; identity backward (output of a row split, partial losses)."""
    return x if _trivial() else _ReduceFromTP.apply(x)


def scatter_to_tp(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the last dimension; the backward all-gathers the gradient."""
    return x if _trivial() else _ScatterToTP.apply(x, x.dim() - 1)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    """All-gather along the last dimension; the backward keeps this rank's slice of the gradient."""
    return x if _trivial() else _GatherFromTP.apply(x, x.dim() - 1)


def scatter_to_sp(x: torch.Tensor, dim: int = SEQ_DIM) -> torch.Tensor:
    """This rank's slice of the sequence dimension (enter a sequence-parallel region); the backward
    all-gathers the gradient."""
    return x if _trivial() else _ScatterToTP.apply(x, dim)


def gather_from_sp(x: torch.Tensor, dim: int = SEQ_DIM) -> torch.Tensor:
    """All-gather along the sequence dimension (input of a column split under sequence parallelism);
    the backward reduce-scatters the gradient (it is partial per rank, like :func:`copy_to_tp`'s)."""
    return x if _trivial() else _GatherFromSP.apply(x, dim)


def reduce_scatter_to_sp(x: torch.Tensor, dim: int = SEQ_DIM) -> torch.Tensor:
    """Sum over the TP group and keep this rank's sequence slice (output of a row split under sequence
    parallelism); the backward all-gathers the gradient."""
    return x if _trivial() else _ReduceScatterToSP.apply(x, dim)
