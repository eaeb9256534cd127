"""Tensor-parallel linear layers (Megatron-LM's column / row split), bias-free unless asked.

* :class:`ColumnParallelLinear` ``y = x W^T`` with ``W [out, in]`` split along ``out``: each TP rank
  holds ``out / tp`` rows and produces its slice of the output features. The input is replicated
  (:func:`copy_to_tp`: its gradient is summed over the group) or, under sequence parallelism,
  sequence-sharded and all-gathered (:func:`gather_from_sp`). ``gather_output=True`` all-gathers the
  output (in the full layer's feature order, also for ``stride > 1``).
* :class:`RowParallelLinear` with ``W`` split along ``in``: takes the output of a column-parallel
  layer (``input_is_parallel=True``) or splits a replicated input itself, and all-reduces the
  partial products (:func:`reduce_from_tp`), or reduce-scatters them along the sequence under
  sequence parallelism (:func:`reduce_scatter_to_sp`).

Both are plain ``nn.Linear`` equivalents at ``tp == 1`` (same ``weight`` name and shape, so state
dicts do not change) and initialise layout-independently (:mod:`.init`). Their weights carry
``tensor_model_parallel`` / ``model_parallel`` / ``partition_dim`` / ``partition_stride``
(:func:`.init.mark_sharded`). With ``bias=True`` (zeros at init) a column-parallel bias is split like the
output features; a row-parallel bias is replicated and added once, after the reduction.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import state
from .init import LayoutError, divide, init_sharded, mark_sharded, shard_size
from .mappings import copy_to_tp, gather_from_sp, gather_from_tp, reduce_from_tp, reduce_scatter_to_sp, scatter_to_tp

__all__ = ["ColumnParallelLinear", "RowParallelLinear"]

InitMethod = Callable[[torch.Tensor], None]


class ColumnParallelLinear(nn.Module):
    """Bias-free linear ``in -> out`` with the output features split over the TP group.

    Args:
        in_features, out_features: the full layer's sizes (``out`` divisible by ``stride``; by
            ``tp * stride`` with ``gather_output``, else ranks may hold uneven parts, see :mod:`.init`).
        init_method: in-place initialiser applied to the *full* ``[out, in]`` weight.
        gather_output: return the full ``[..., out]`` output on every rank instead of the local slice.
        bias: add a bias (zeros at init), split over the TP group like the output features.
        stride: the output is ``stride`` equal fused blocks (e.g. 2 for ``[gate | up]``); each rank
            keeps its slice of every block, in block order.
        sequence_parallel: the input is split along the sequence (dim 1) over the TP group.
        name: config key(s) named in a :class:`~megatron_tfree.parallel.state.LayoutError`.
    """

    def __init__(self, in_features: int, out_features: int, init_method: InitMethod, gather_output: bool = False,
                 stride: int = 1, sequence_parallel: bool = False, name: str = "output features", bias: bool = False):
        super().__init__()
        s = state.get()
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.stride, self.sequence_parallel = gather_output, stride, sequence_parallel
        divide(out_features, stride, name)
        if gather_output and out_features % (s.tp * stride):
            raise LayoutError(f"{name} ({out_features}) is not divisible by parallel.tensor ({s.tp}) * stride "
                              f"({stride}); gather_output needs equal parts")
        self.out_per_rank = shard_size(out_features, s.tp, s.tp_rank, stride)
        self.weight = nn.Parameter(torch.empty(self.out_per_rank, in_features))
        init_sharded(self.weight, (out_features, in_features), init_method, partition_dim=0, stride=stride)
        mark_sharded(self.weight, partition_dim=0, stride=stride, full_size=out_features)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_per_rank))
            mark_sharded(self.bias, partition_dim=0, stride=stride, full_size=out_features)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_from_sp(x) if self.sequence_parallel else copy_to_tp(x)
        y = F.linear(x, self.weight, self.bias)
        if not self.gather_output:
            return y
        y = gather_from_tp(y)
        tp = state.get().tp
        if self.stride > 1 and tp > 1:  # rank-major [r][block][part] -> block-major [block][r][part]
            lead = y.shape[:-1]
            y = y.reshape(*lead, tp, self.stride, -1).transpose(-3, -2).reshape(*lead, self.out_features)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {self.out_per_rank}), stride={self.stride}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Bias-free linear ``in -> out`` with the input features split over the TP group.

    Args:
        in_features, out_features: the full layer's sizes (``in`` divisible by ``tp`` unless
            ``input_is_parallel``: then uneven parts matching the column layer's are fine).
        init_method: in-place initialiser applied to the *full* ``[out, in]`` weight.
        input_is_parallel: the input already holds this rank's ``in / tp`` features (the output of a
            :class:`ColumnParallelLinear`); otherwise the full input is split here.
        sequence_parallel: reduce-scatter the output along the sequence (dim 1) instead of all-reducing.
        name: config key(s) named in a :class:`~megatron_tfree.parallel.state.LayoutError`.
        bias: add a bias (zeros at init; replicated, added after the reduction).
    """

    def __init__(self, in_features: int, out_features: int, init_method: InitMethod, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, name: str = "input features", bias: bool = False):
        super().__init__()
        s = state.get()
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        if not input_is_parallel:  # the input split needs equal parts
            divide(in_features, s.tp, name)
        self.in_per_rank = shard_size(in_features, s.tp, s.tp_rank)
        self.weight = nn.Parameter(torch.empty(out_features, self.in_per_rank))
        init_sharded(self.weight, (out_features, in_features), init_method, partition_dim=1)
        mark_sharded(self.weight, partition_dim=1, full_size=in_features)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None  # replicated, added once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x)
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y) if self.sequence_parallel else reduce_from_tp(y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {self.in_per_rank}), out_features={self.out_features}, "
                f"input_is_parallel={self.input_is_parallel}")
