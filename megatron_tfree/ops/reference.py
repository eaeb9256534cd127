"""Pure-PyTorch reference implementations of the sparse T-Free ops.

These are the semantics every faster backend (C++/CUDA kernels, see :mod:`megatron_tfree.ops`) must
reproduce. All functions work on rows flattened over ``[batch, seq]``: row ``n`` is position
``(n // S, n % S)``, and CSR id sets are given as ``offsets [N + 1]`` + ``ids [nnz]`` with
``ids[offsets[n]:offsets[n + 1]]`` belonging to row ``n``.

Loss normalisation (the trainer relies on it):

* :func:`tfree_bce_loss` follows the T-Free spec (section 3):
  ``loss_scale * sum_{n, j} w_n * bce(n, j) / (N * v)``, i.e. the mean over *all* ``N * v``
  logits, padding rows included (they contribute 0 to the sum but count in the denominator).
  Padding therefore dilutes the value compared to an unpadded batch; this is the reference's
  behaviour and is kept on purpose.
* :func:`cross_entropy_loss` is the weighted mean over positions: ``sum_n w_n * ce_n / sum_n w_n``.
  Padding (``w = 0``) does not change the value; an all-zero weight vector gives a loss of 0.

Both losses are computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["embedding_bag", "tfree_bce_loss", "tfree_head_loss", "cross_entropy_loss", "multi_hot", "shard_targets"]

#: vocabulary rows per chunk of the fused head + loss (an ``[N, chunk]`` fp32 logits block at a time)
DEFAULT_CHUNK_SIZE = 4096


def embedding_bag(weight: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """Sum of embedding rows per CSR row.

    Args:
        weight: ``[v_local, h]`` embedding rows ``vocab_start .. vocab_start + v_local - 1`` (the whole
            matrix without tensor parallelism, one vocabulary shard with it).
        offsets: ``[N + 1]`` int64 CSR offsets, ``offsets[0] == 0``.
        ids: ``[nnz]`` global vocabulary ids. Ids outside this shard contribute zero (their rows live
            on another tensor-parallel rank); a repeated id counts each time it occurs.
        vocab_start: first global id held by ``weight``.

    Returns:
        ``[N, h]`` in ``weight.dtype``; an empty row gives a zero vector. The backward produces the
        gradient of ``weight`` directly (no dense ``[N, v]`` matrix is ever built).
    """
    ids = ids.long()
    local = ids - vocab_start
    in_shard = (local >= 0) & (local < weight.shape[0])
    local = torch.where(in_shard, local, torch.zeros_like(local))
    return F.embedding_bag(
        local,
        weight,
        offsets.long(),
        mode="sum",
        per_sample_weights=in_shard.to(weight.dtype),
        include_last_offset=True,
    )


def _row_index(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """``[nnz]`` row number of every CSR entry (no host sync: the output size is known)."""
    offsets = offsets.long()
    counts = offsets[1:] - offsets[:-1]
    rows = torch.arange(counts.numel(), device=offsets.device)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


def multi_hot(offsets: torch.Tensor, ids: torch.Tensor, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, vocab_size]`` multi-hot of CSR id sets, clamped to 1 (built with one scatter)."""
    n = offsets.numel() - 1
    out = torch.zeros(n, vocab_size, dtype=dtype, device=ids.device)
    rows = _row_index(offsets, ids.numel())
    out.index_put_((rows, ids.long()), torch.ones((), dtype=dtype, device=ids.device))  # assignment: clamps to 1
    return out


def tfree_bce_loss(
    logits: torch.Tensor,
    target_offsets: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    pos_weight: float,
    loss_scale: float,
) -> torch.Tensor:
    """T-Free multi-label loss (spec section 3).

    ``loss_scale * mean_{n, j}( w_n * BCEWithLogits(logits[n, j], y[n, j]; pos_weight) )`` where
    ``y`` is the multi-hot of the target ids of row ``n`` (clamped to 1) and the mean runs over all
    ``N * v`` entries.

    Args:
        logits: ``[N, v]`` (any float dtype; computed in float32).
        target_offsets, target_ids: CSR target ids, ``N`` rows.
        weights: ``[N]`` per-position weights (0 on padding).
        pos_weight: weight of the positive term (reference 7B: 300).
        loss_scale: factor on the mean (reference 7B: 100).
    """
    n, v = logits.shape
    target = multi_hot(target_offsets, target_ids, v)
    pw = torch.tensor(float(pos_weight), dtype=torch.float32, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(
        logits.float(), target, weight=weights.reshape(n, 1).float(), pos_weight=pw, reduction="mean"
    )
    return loss * loss_scale


def shard_targets(target_offsets: torch.Tensor, target_ids: torch.Tensor, vocab_start: int,
                  v_local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR target sets restricted to ``[vocab_start, vocab_start + v_local)`` and shifted to local ids."""
    local = target_ids.long() - vocab_start
    keep = (local >= 0) & (local < v_local)
    kept_before = torch.cat([keep.new_zeros(1, dtype=torch.long), keep.long().cumsum(0)])
    return kept_before[target_offsets.long()], local[keep]


def tfree_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_offsets: torch.Tensor,
    target_ids: torch.Tensor,
    weights: torch.Tensor,
    pos_weight: float,
    loss_scale: float,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Output head + T-Free loss: :func:`tfree_bce_loss` of ``hidden @ weight.T`` (a vocabulary shard).

    ``loss_scale * sum_{n, j local} w_n * bce(n, j) / (N * vocab_size)``: with a shard
    (``weight`` = rows ``vocab_start .. vocab_start + v_local - 1``) this is the shard's part of the
    global loss (target ids outside the shard are ignored); summed over the tensor-parallel ranks it is
    the full loss. ``vocab_size`` (global ``v``) defaults to ``v_local``.

    This reference materialises the ``[N, v_local]`` logits (in ``hidden``'s dtype, as the unfused
    model does); ``chunk_size`` (positive) only matters to the fused kernels, which never hold more
    than ``[N, chunk_size]`` logits. The loss is float32.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    v_local = weight.shape[0]
    v = v_local if vocab_size is None else int(vocab_size)
    offsets, ids = shard_targets(target_offsets, target_ids, vocab_start, v_local)
    logits = hidden @ weight.t()
    return tfree_bce_loss(logits, offsets, ids, weights, pos_weight, loss_scale) * (v_local / v)


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy ``sum_n w_n * ce_n / sum_n w_n`` (float32).

    Args:
        logits: ``[N, V]``.
        targets: ``[N]`` class ids; ids at positions with ``w == 0`` are ignored (may be invalid).
        weights: ``[N]`` per-position weights.
    """
    weights = weights.reshape(-1).float()
    targets = torch.where(weights > 0, targets.reshape(-1).long(), torch.zeros_like(targets.reshape(-1).long()))
    per_pos = F.cross_entropy(logits.float(), targets, reduction="none")
    den = weights.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return (per_pos * weights).sum() / den
