"""T-Free decode scores of dictionary words from head logits (spec section 4), standalone in torch.

This module imports only torch, so it is also the scoring code of a Hugging Face export (copied there
verbatim as ``tfree_scoring.py``); :class:`~.dictionary.DecodeDictionary` holds the word patterns and
calls it (or the native kernel, which computes the same formula).

A dictionary of ``n`` words is a CSR weight matrix ``W [n, v]`` over each word's *distinct* ids: 1 on
its non-edge ids, ``edge_weight`` on its edge ids (ids of trigrams that begin or end with a space).
With ``p = sigmoid(logits)`` (fp32), ``m = vocab_population`` and ``c_w`` the word's number of distinct
trigrams::

    S_w     = (W p)_w  = sum_{i in N_w} p_i + e * sum_{i in Edge_w} p_i
    score_w = S_w / (m c_w) + (S_w - sum_i p_i) / max(v - m c_w, 1)

:func:`geometric_means` gives the calibrated alternative used for likelihoods (bits per byte): the
mean over a word's distinct ids of ``log sigmoid(logit - log pos_weight)``.
"""

from __future__ import annotations

import math
import warnings

import torch


def weight_matrix(offsets: torch.Tensor, ids: torch.Tensor, edge: torch.Tensor, vocab_size: int,
                  edge_weight: float = 1.0) -> torch.Tensor:
    """The ``[n, v]`` CSR weight matrix of ``n`` words (``offsets [n + 1]``, distinct ``ids``, ``edge``
    flags per id): 1 on non-edge ids, ``edge_weight`` on edge ids (float32)."""
    values = torch.where(edge.bool(), torch.tensor(float(edge_weight)), torch.tensor(1.0)).to(torch.float32)
    # int32 indices make the CPU CSR matmul ~3x faster (less memory traffic) when they fit
    index = torch.int32 if ids.numel() < 2**31 else torch.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(offsets.to(index), ids.to(index), values, (offsets.numel() - 1, vocab_size),
                                       check_invariants=False)


def _apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(matrix @ x^T)^T`` for ``x [B, v]``: ``[B, n]``."""
    return (matrix @ x.t().contiguous()).t()


def spec_scores(logits: torch.Tensor, matrix: torch.Tensor, c: torch.Tensor, vocab_population: int) -> torch.Tensor:
    """``[B, v]`` head logits -> ``[B, n]`` float32 decode scores (formula in the module docstring);
    ``matrix`` from :func:`weight_matrix` (on the logits' device), ``c [n]`` distinct trigrams per word."""
    p = torch.sigmoid(logits.float())
    total = p.sum(dim=1, keepdim=True)
    s = _apply(matrix, p)
    mc = c.to(device=p.device, dtype=torch.float32) * vocab_population
    return s / mc + (s - total) / torch.clamp(matrix.shape[1] - mc, min=1.0)


def geometric_means(logits: torch.Tensor, matrix: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """``[B, n]``: per word, the mean over its distinct ids of ``log sigmoid(logit - log pos_weight)``
    (``matrix`` with edge weight 1); its log-softmax over the words is the calibrated log p(word)."""
    logp = torch.nn.functional.logsigmoid(logits.float() - math.log(pos_weight))
    counts = _apply(matrix, logp.new_ones(1, matrix.shape[1]))
    return _apply(matrix, logp) / counts.clamp(min=1.0)
