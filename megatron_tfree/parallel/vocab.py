"""Vocabulary-parallel embeddings, logits and losses.

Under tensor parallelism TP rank ``r`` owns the vocabulary rows ``[r * v/tp, (r + 1) * v/tp)`` of
the embedding and the same columns of the head's output (``vocab_start`` = first owned id, see
:func:`.init.vocab_range`). Nothing here ever gathers ``[tokens, v]`` in training:

* :func:`embedding_bag` / :func:`embedding`: each rank sums (looks up) the rows it owns (other ids
  contribute zero), one all-reduce of ``[N, h]`` over TP.
* :func:`tfree_bce_loss`: each rank computes the BCE of its ``[N, v/tp]`` logits against the multi-hot
  of the target ids in its slice (shifted by ``vocab_start``); only the scalar partial losses are
  summed over TP. The mean is over ``N * v`` with the *global* ``v`` (spec section 3).
* :func:`tfree_head_loss`: the same loss fused with the head matmul (``hidden`` replicated, ``weight``
  this rank's rows; :func:`megatron_tfree.ops.tfree_head_loss`, chunked over the vocabulary): the
  partial losses are summed over TP and the ``hidden`` gradient is all-reduced by the replication.
* :func:`cross_entropy`: Megatron-style vocab-parallel softmax cross-entropy (all-reduces of the
  per-position max, sum of exponentials and target logit: ``[N]`` vectors), weighted mean as
  :func:`megatron_tfree.ops.cross_entropy_loss`.
* :func:`gather_logits`: the full ``[..., v]`` logits from the local ones (inference / eval only).

At ``tp == 1`` every function is exactly the single-process op of :mod:`megatron_tfree.ops`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops
from ..ops.reference import DEFAULT_CHUNK_SIZE
from ..ops.reference import shard_targets as local_targets  # the CSR targets of one vocabulary slice
from . import state
from .mappings import all_reduce_along, copy_to_tp, gather_from_tp, reduce_from_tp

__all__ = ["embedding_bag", "embedding", "tfree_bce_loss", "tfree_head_loss", "cross_entropy", "gather_logits",
           "local_targets"]


def embedding_bag(weight: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """``[N, h]`` sum over each CSR row's ids of the embedding rows; ``weight`` holds the rows
    ``vocab_start .. vocab_start + v/tp - 1`` (the whole matrix at tp=1)."""
    return reduce_from_tp(ops.embedding_bag(weight, offsets, ids, vocab_start))


def embedding(weight: torch.Tensor, ids: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """``[*ids.shape, h]`` lookup of one id per position (classic models) from a vocabulary shard."""
    if state.get().tp == 1:
        return F.embedding(ids.long(), weight)
    local = ids.long() - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    out = F.embedding(torch.where(inside, local, torch.zeros_like(local)), weight)
    return reduce_from_tp(out * inside.unsqueeze(-1).to(out.dtype))


def tfree_bce_loss(logits: torch.Tensor, target_offsets: torch.Tensor, target_ids: torch.Tensor,
                   weights: torch.Tensor, pos_weight: float, loss_scale: float, vocab_start: int = 0,
                   vocab_size: int | None = None) -> torch.Tensor:
    """The T-Free BCE loss (:func:`megatron_tfree.ops.tfree_bce_loss`) of vocab-local ``logits [N, v/tp]``.

    ``vocab_size`` is the global ``v`` (default ``logits.shape[1] * tp``). The result is the same scalar
    on every TP rank, and its gradient w.r.t. the local logits is the local slice of the full gradient.
    """
    tp = state.get().tp
    if tp == 1:
        return ops.tfree_bce_loss(logits, target_offsets, target_ids, weights, pos_weight, loss_scale)
    v_local = logits.shape[-1]
    v = v_local * tp if vocab_size is None else vocab_size
    offsets, ids = local_targets(target_offsets, target_ids, vocab_start, v_local)
    partial = ops.tfree_bce_loss(logits, offsets, ids, weights, pos_weight, loss_scale) * (v_local / v)
    return reduce_from_tp(partial)


def tfree_head_loss(hidden: torch.Tensor, weight: torch.Tensor, target_offsets: torch.Tensor,
                    target_ids: torch.Tensor, weights: torch.Tensor, pos_weight: float, loss_scale: float,
                    vocab_start: int = 0, vocab_size: int | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """:func:`tfree_bce_loss` of ``hidden [N, h] @ weight.T`` without the logits: ``weight`` holds the head
    rows ``vocab_start .. vocab_start + v/tp - 1`` (all of them at tp=1), ``vocab_size`` is the global ``v``
    (default ``weight.shape[0] * tp``). The same scalar on every TP rank."""
    v = weight.shape[0] * state.get().tp if vocab_size is None else vocab_size
    partial = ops.tfree_head_loss(copy_to_tp(hidden), weight, target_offsets, target_ids, weights, pos_weight,
                                  loss_scale, vocab_start, v, chunk_size)
    return reduce_from_tp(partial)


class _VocabParallelCE(torch.autograd.Function):
    """Per-position cross-entropy ``[N]`` of vocab-local logits ``[N, v/tp]`` (float32)."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start):
        ctx.dtype = logits.dtype
        logits = logits.float()
        v_local = logits.shape[-1]
        logits_max = all_reduce_along(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        local = targets - vocab_start
        inside = (local >= 0) & (local < v_local)
        local = torch.where(inside, local, torch.zeros_like(local))
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1) * inside
        target_logit = all_reduce_along(target_logit)
        exp = shifted.exp()
        sum_exp = all_reduce_along(exp.sum(dim=-1))
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, inside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, inside = ctx.saved_tensors
        g = softmax.clone()
        g.scatter_add_(-1, local.unsqueeze(-1), -inside.to(g.dtype).unsqueeze(-1))
        return (g * grad.unsqueeze(-1)).to(ctx.dtype), None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """Weighted-mean cross-entropy ``sum_n w_n ce_n / sum_n w_n`` of vocab-local ``logits [N, v/tp]``
    (as :func:`megatron_tfree.ops.cross_entropy_loss`; targets at ``w == 0`` are ignored)."""
    if state.get().tp == 1:
        return ops.cross_entropy_loss(logits, targets, weights)
    weights = weights.reshape(-1).float()
    targets = targets.reshape(-1).long()
    targets = torch.where(weights > 0, targets, torch.zeros_like(targets))
    per_pos = _VocabParallelCE.apply(logits, targets, vocab_start)
    den = weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return (per_pos * weights).sum() / den


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full ``[..., v]`` logits from every TP rank's ``[..., v/tp]`` slice (identity at tp=1;
    differentiable). For inference and evaluation: training losses use the local logits."""
    return gather_from_tp(logits)
