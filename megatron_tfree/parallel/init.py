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

Uneven splits: where ``tp`` does not divide a split dimension (the SwiGLU inner size, which the
reference truncates to odd values such as 683) the first ``size % tp`` ranks hold one more entry
(:func:`block_part`); the model stays the same for every layout. Heads and the vocabulary are
split evenly and must be divisible (:func:`divide`).

Strided shards (``stride > 1``) serve fused weights: the output dimension is ``stride`` equal
blocks (SwiGLU ``[gate | up]``: stride 2) and a rank keeps its ``1/tp`` of every block,
concatenated in block order, so ``gate, up = local_out.chunk(2, -1)`` stays aligned per rank.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import state
from .state import LayoutError

__all__ = ["LayoutError", "divide", "block_part", "shard_size", "shard_indices", "local_shard", "init_sharded", "vocab_range", "mark_sharded",
           "gather_shards", "merge_shards", "full_weight"]


def divide(size: int, tp: int, what: str) -> int:
    """``size // tp``; a :class:`LayoutError` naming ``what`` and ``parallel.tensor`` when it does not divide."""
    if size % tp:
        raise LayoutError(f"{what} ({size}) is not divisible by parallel.tensor ({tp})")
    return size // tp


def block_part(block: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """``(start, length)`` of rank ``tp_rank``'s part of a block of ``block`` entries: equal parts, the
    first ``block % tp`` ranks one entry more when ``tp`` does not divide ``block`` (uneven split)."""
    base, extra = divmod(block, tp)
    return tp_rank * base + min(tp_rank, extra), base + (tp_rank < extra)


def shard_size(size: int, tp: int, tp_rank: int, stride: int = 1) -> int:
    """Number of entries of rank ``tp_rank``'s shard of a dimension of ``size`` (``stride`` blocks)."""
    return stride * block_part(size // stride, tp, tp_rank)[1]


def shard_indices(size: int, tp: int, tp_rank: int, stride: int = 1) -> torch.Tensor:
    """Indices (along the split dimension of the full weight) of rank ``tp_rank``'s shard: its part of
    each of the ``stride`` blocks, in block order."""
    block = size // stride
    start, length = block_part(block, tp, tp_rank)
    return torch.cat([torch.arange(b * block + start, b * block + start + length) for b in range(stride)])


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


def mark_sharded(param: torch.Tensor, partition_dim: int, stride: int = 1, full_size: int | None = None) -> None:
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
    param.partition_full_size = full_size if full_size is not None else param.shape[partition_dim] * state.get().tp


def mark_replicated(module: torch.nn.Module) -> None:
    """Tag every TP-replicated parameter of ``module`` (those not sharded, e.g. norm weights) so the
    gradient norm counts it exactly once per pipeline stage: ``model_parallel`` is true on TP rank 0
    only.

    DeepSpeed counts an untagged parameter only where its mpu's *model-parallel* rank is 0. With our
    mpu that is TP rank 0 of each stage (right), but DeepSpeed's pipeline grid numbers the whole
    TP x PP replica, so untagged parameters of every stage after the first would be left out of the
    norm (and gradient clipping would scale by a wrong coefficient). The explicit tag is correct for
    both. Call after the model (or this rank's pipeline stage) is built.
    """
    first = state.get().tp_rank == 0
    for p in module.parameters():
        if not getattr(p, "tensor_model_parallel", False):
            p.model_parallel = first


def vocab_range(vocab_size: int, key: str = "tokenizer.vocab_size") -> tuple[int, int]:
    """``(vocab_start, vocab_end)`` of this TP rank's rows; ``vocab_size`` must be divisible by TP
    (no padding, so the model is the same for every layout); ``key`` names the config key in errors."""
    s = state.get()
    part = divide(vocab_size, s.tp, key)
    return s.tp_rank * part, (s.tp_rank + 1) * part


def gather_shards(shard: torch.Tensor, partition_dim: int, stride: int = 1, full_size: int | None = None) -> torch.Tensor:
    """The full tensor (``full_size`` along ``partition_dim``, default ``tp x`` the shard's) from every TP
    rank's ``shard`` (collective over the TP group; the inverse of :func:`local_shard`, uneven and
    strided shards put back in order). Identity at tp=1."""
    from .mappings import all_gather_along  # local import: mappings imports nothing from here

    s = state.get()
    if s.tp == 1:
        return shard
    size = full_size if full_size is not None else shard.shape[partition_dim] * s.tp
    sizes = [shard_size(size, s.tp, r, stride) for r in range(s.tp)]
    gathered = all_gather_along(shard.detach(), partition_dim, sizes)  # rank-major [r][block][part]
    return _unshuffle(gathered, partition_dim, size, s.tp, stride)


def _unshuffle(concatenated: torch.Tensor, dim: int, size: int, tp: int, stride: int) -> torch.Tensor:
    """The full tensor from the rank-major concatenation of every rank's shard along ``dim``."""
    order = torch.cat([shard_indices(size, tp, r, stride) for r in range(tp)])  # full index of each row
    return torch.empty_like(concatenated).index_copy_(dim, order, concatenated)


def merge_shards(shards: list[torch.Tensor], partition_dim: int, stride: int = 1, chunk_bytes: int = 0,
                 after_chunk: Callable[[torch.Tensor], object] | None = None) -> torch.Tensor:
    """The full tensor from the shards of TP ranks ``0 .. len(shards) - 1`` (in rank order; uneven and
    strided shards put back in place): the local counterpart of :func:`gather_shards`, for shards read
    from files. The inverse of :func:`local_shard`. The shards are copied in pieces of about
    ``chunk_bytes`` (0: whole shards), each passed to ``after_chunk`` once copied (a reader releases
    memory-mapped pages there)."""
    if len(shards) == 1:
        return shards[0]
    tp = len(shards)
    size = sum(s.shape[partition_dim] for s in shards)
    for r, s in enumerate(shards):
        if s.shape[partition_dim] != shard_size(size, tp, r, stride):
            raise ValueError(f"TP shard {r} has {s.shape[partition_dim]} entries along dim {partition_dim}, expected "
                             f"{shard_size(size, tp, r, stride)} of {size} (stride {stride})")
    shape = list(shards[0].shape)
    shape[partition_dim] = size
    full = torch.empty(shape, dtype=shards[0].dtype)  # filled piece by piece: no concatenated copy
    for r, s in enumerate(shards):
        index = shard_indices(size, tp, r, stride)
        rows = s.shape[0]
        row_bytes = max(1, s[0].numel() * s.element_size()) if rows else 1
        step = max(1, chunk_bytes // row_bytes) if chunk_bytes else max(rows, 1)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            piece = s.narrow(0, start, n)
            if partition_dim == 0:
                full.index_copy_(0, index[start:start + n], piece)
            else:
                full.narrow(0, start, n).index_copy_(partition_dim, index, piece)
            if after_chunk is not None:
                after_chunk(piece)
    return full


def full_weight(param: torch.Tensor, tensor: torch.Tensor | None = None) -> torch.Tensor:
    """The full value of a (possibly TP-sharded) parameter, or of ``tensor`` laid out like it (e.g. its
    ``.grad``), on every TP rank. Replicated parameters are returned as they are. Collective for sharded
    parameters: every TP rank must call it, for the same parameters in the same order."""
    value = param if tensor is None else tensor
    if not getattr(param, "tensor_model_parallel", False):
        return value
    return gather_shards(value, param.partition_dim, getattr(param, "partition_stride", 1),
                         getattr(param, "partition_full_size", None))
