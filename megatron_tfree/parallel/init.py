"""Layout-independent initialisation of tensor-parallel shards, and the shard arithmetic.

The same seed must give the same *full* weights whatever the (TP, PP) layout. Every rank that
holds a shard of a weight builds that one full weight on the fly, fills it with the layer's init
method from the current torch RNG, keeps its slice and frees the rest. The model seeds the RNG per
pipeline stage (``GPTModel``: ``seeded(seed, stage_index)``) and builds a stage's weights in a
fixed order, and every TP peer of a stage builds all of that stage's weights (each keeps another
slice), so each full weight is a function of ``(seed, stage index, position of the weight in the
stage)`` only. Without tensor parallelism the full weight *is* the parameter, so TP=1 draws exactly
what the model drew before tensor parallelism existed (bit-identical weights and checkpoints).
Only one full weight exists at a time (the largest is the embedding or head, ``v x h``).

Strided shards (``stride > 1``) serve fused weights: the output dimension is ``stride`` equal
blocks (SwiGLU ``[gate | up]``: stride 2) and a rank keeps its ``1/tp`` of every block,
concatenated in block order, so ``gate, up = local_out.chunk(2, -1)`` stays aligned per rank.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import state
from .state import LayoutError

__all__ = ["LayoutError", "divide", "shard_indices", "local_shard", "init_sharded", "vocab_range", "mark_sharded"]


def divide(size: int, tp: int, what: str) -> int:
    """``size // tp``; a :class:`LayoutError` naming ``what`` and ``parallel.tensor`` when it does not divide."""
    if size % tp:
        raise LayoutError(f"{what} ({size}) is not divisible by parallel.tensor ({tp})")
    return size // tp


def shard_indices(size: int, tp: int, tp_rank: int, stride: int = 1) -> torch.Tensor:
    """Indices (along the split dimension of the full weight) of rank ``tp_rank``'s shard."""
    block = size // stride
    part = block // tp
    return torch.cat([torch.arange(b * block + tp_rank * part, b * block + (tp_rank + 1) * part)
                      for b in range(stride)])


def local_shard(full: torch.Tensor, dim: int, tp: int, tp_rank: int, stride: int = 1) -> torch.Tensor:
    """Rank ``tp_rank``'s shard of ``full`` along ``dim`` (a copy); the inverse of gathering shards."""
    if tp == 1:
        return full
    return full.index_select(dim, shard_indices(full.shape[dim], tp, tp_rank, stride))


def init_sharded(weight: torch.Tensor, full_shape: tuple[int, ...], init_method: Callable[[torch.Tensor], None],
                 partition_dim: int, stride: int = 1) -> None:
    """Fill the local ``weight`` with this TP rank's shard of a full weight initialised by ``init_method``."""
    s = state.get()
    if s.tp == 1:
        init_method(weight)
        return
    full = torch.empty(full_shape, dtype=weight.dtype, device=weight.device)
    init_method(full)
    with torch.no_grad():
        weight.copy_(local_shard(full, partition_dim, s.tp, s.tp_rank, stride))
    del full


def mark_sharded(param: torch.Tensor, partition_dim: int, stride: int = 1) -> None:
    """Tag a TP-sharded parameter the way Megatron and DeepSpeed read it.

    DeepSpeed (``runtime.utils.is_model_parallel_parameter``, used by its gradient-norm / clipping and
    the ZeRO optimizers) counts a parameter on every TP rank when ``tensor_model_parallel`` or
    ``model_parallel`` is true and otherwise only on TP rank 0, so replicated parameters (norm
    weights) are counted once. Set on the parallel layers whatever ``tp`` is (harmless at tp=1).
    """
    param.tensor_model_parallel = True
    param.model_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def vocab_range(vocab_size: int, key: str = "tokenizer.vocab_size") -> tuple[int, int]:
    """``(vocab_start, vocab_end)`` of this TP rank's rows; ``vocab_size`` must be divisible by TP
    (no padding, so the model is the same for every layout); ``key`` names the config key in errors."""
    s = state.get()
    part = divide(vocab_size, s.tp, key)
    return s.tp_rank * part, (s.tp_rank + 1) * part
