"""Input embeddings, output heads and losses: the only place the T-Free and classic models differ.

Both kinds share one interface, so the model and the trainer never branch on the tokenizer kind::

    hidden = embedding(batch)                   # [B, S, h]
    logits = head(hidden)                       # [B, S, v]
    loss = head.loss(logits, batch)             # scalar (float32)
    loss = head.loss_from_hidden(hidden, batch) # the same, fused with the head where the kind has it

* T-Free (spec section 3): the input of a position is the sum of the embedding rows of all its ids
  (:func:`megatron_tfree.ops.embedding_bag`); the head is an untied bias-free linear ``h -> v``; the
  loss is :func:`megatron_tfree.ops.tfree_bce_loss` with ``model.loss_pos_weight`` and
  ``model.loss_scale`` (mean over ``B * S * v``, padding counted in the denominator). In training,
  ``head.loss_from_hidden(hidden, batch)`` computes the same loss fused with the head matmul
  (:func:`megatron_tfree.ops.tfree_head_loss`, ``model.head_chunk_size`` vocabulary rows at a time) when
  ``model.fused_head_loss`` is set, so the ``[B * S, v]`` logits and their gradient never exist in full.
* classic: one id per CSR row, an embedding lookup; untied bias-free head; weighted-mean
  cross-entropy (:func:`megatron_tfree.ops.cross_entropy_loss`, padding-invariant). Every target
  row must hold exactly one id (padding positions too, with weight 0).

Tensor parallelism (``parallel.state.initialize(tp, ...)`` before building) splits the vocabulary:
TP rank ``r`` holds the embedding rows and head columns ``[vocab_start, vocab_start + v / tp)``
(``v`` must be divisible by ``tp``). The embedding all-reduces its ``[B, S, h]`` output; the head
returns *vocab-local* logits ``[B, S, v / tp]`` and ``loss`` takes those (only scalars / ``[N]``
vectors are reduced, :mod:`megatron_tfree.parallel.vocab`); :func:`gather_logits` assembles the full
logits for inference and evaluation. At tp=1 everything is the plain single-process computation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..data.batch import Batch
from ..ops.reference import DEFAULT_CHUNK_SIZE
from ..parallel import vocab as vocab_parallel
from ..parallel.init import init_sharded, mark_sharded, vocab_range
from ..parallel.layers import ColumnParallelLinear
from .transformer import InitMethod, column_linear, init_method_normal, init_stds

KINDS = ("tfree", "classic")


def gather_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full ``[..., v]`` logits from the vocab-local ones (identity at tp=1; inference / eval only)."""
    return vocab_parallel.gather_logits(logits)


class _Embedding(nn.Module):
    """``E [v, h]``, or under tensor parallelism this rank's rows ``[vocab_start, vocab_end)`` of it."""

    def __init__(self, vocab_size: int, hidden_size: int, init_method: InitMethod, vocab_key: str = "tokenizer.vocab_size"):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_start, self.vocab_end = vocab_range(vocab_size, vocab_key)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, hidden_size))
        init_sharded(self.weight, (vocab_size, hidden_size), init_method, partition_dim=0)
        mark_sharded(self.weight, partition_dim=0)


class TFreeEmbedding(_Embedding):
    """``E [v, h]``; a position's input is the sum of the rows of its CSR ids (repeats count)."""

    def forward(self, batch: Batch) -> torch.Tensor:
        B, S = batch.shape
        out = vocab_parallel.embedding_bag(self.weight, batch.input_offsets, batch.input_ids, self.vocab_start)
        return out.view(B, S, self.hidden_size)


class ClassicEmbedding(_Embedding):
    """Token embedding lookup of the single id of every CSR row."""

    def forward(self, batch: Batch) -> torch.Tensor:
        B, S = batch.shape
        if batch.input_ids.numel() != B * S:
            raise ValueError(f"classic model: expected one input id per position ({B * S}), "
                             f"got {batch.input_ids.numel()}")
        return vocab_parallel.embedding(self.weight, batch.input_ids, self.vocab_start).view(B, S, self.hidden_size)


class _Head(nn.Module):
    linear_cls: type[ColumnParallelLinear] = ColumnParallelLinear

    def __init__(self, hidden_size: int, vocab_size: int, init_method: InitMethod, vocab_key: str = "tokenizer.vocab_size"):
        super().__init__()
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_end = vocab_range(vocab_size, vocab_key)
        self.linear = column_linear(hidden_size, vocab_size, init_method, name=vocab_key, cls=self.linear_cls)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., h] -> [..., v / tp]`` vocab-local logits (in the hidden dtype; all ``v`` at tp=1)."""
        return self.linear(hidden)

    def loss_from_hidden(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The training loss of the head's input ``hidden [B, S, h]``: ``loss(self(hidden), batch)``."""
        return self.loss(self(hidden), batch)


class TFreeHeadLinear(ColumnParallelLinear):
    """The T-Free head's weight (``[v / tp, h]``, column-parallel): ``linear(x)`` gives the vocab-local
    logits, ``linear(x, batch, ...)`` the T-Free loss fused with the matmul. The loss goes through the
    module call too, so hooks on the layer (ZeRO-3 gathering the weight) run as they do for logits."""

    def forward(self, x: torch.Tensor, batch: Batch | None = None, pos_weight: float = 1.0, loss_scale: float = 1.0,
                vocab_start: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
        if batch is None:
            return super().forward(x)
        return vocab_parallel.tfree_head_loss(
            x.reshape(-1, x.shape[-1]), self.weight, batch.target_offsets, batch.target_ids,
            batch.loss_weights.reshape(-1), pos_weight, loss_scale, vocab_start, self.out_features, chunk_size,
        )


class TFreeHead(_Head):
    """Bias-free ``h -> v`` (untied) with the multi-label BCE loss of spec section 3; ``fused``:
    :meth:`loss_from_hidden` never forms the logits (``chunk_size`` vocabulary rows at a time)."""

    linear_cls = TFreeHeadLinear

    def __init__(self, hidden_size: int, vocab_size: int, init_method: InitMethod, pos_weight: float, loss_scale: float,
                 fused: bool = False, chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__(hidden_size, vocab_size, init_method)
        self.pos_weight = pos_weight
        self.loss_scale = loss_scale
        self.fused = fused
        self.chunk_size = chunk_size

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return vocab_parallel.tfree_bce_loss(
            logits.reshape(-1, logits.shape[-1]), batch.target_offsets, batch.target_ids,
            batch.loss_weights.reshape(-1), self.pos_weight, self.loss_scale, self.vocab_start, self.vocab_size,
        )

    def loss_from_hidden(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self.fused:
            return super().loss_from_hidden(hidden, batch)
        return self.linear(hidden, batch, self.pos_weight, self.loss_scale, self.vocab_start, self.chunk_size)


class ClassicHead(_Head):
    """Bias-free ``h -> V`` (untied) with weighted-mean cross-entropy."""

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        n = batch.loss_weights.numel()
        if batch.target_ids.numel() != n:
            raise ValueError(f"classic model: expected one target id per position ({n}), got {batch.target_ids.numel()}")
        return vocab_parallel.cross_entropy(logits.reshape(n, -1), batch.target_ids, batch.loss_weights.reshape(-1),
                                            self.vocab_start)


def _vocab_key(kind: str) -> str:
    """The config key that sets the vocabulary size of ``kind`` (named in layout errors)."""
    return "tokenizer.vocab_size" if kind == "tfree" else "tokenizer.classic_vocab_size"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"tokenizer kind must be one of {KINDS}, got {kind!r}")


def build_embedding(cfg: ModelConfig, kind: str, vocab_size: int) -> nn.Module:
    """The input embedding for ``kind`` (``tfree`` or ``classic``), initialised per ``cfg.init``."""
    _check_kind(kind)
    cls = TFreeEmbedding if kind == "tfree" else ClassicEmbedding
    return cls(vocab_size, cfg.hidden_size, init_method_normal(init_stds(cfg)[0]), _vocab_key(kind))


def build_head(cfg: ModelConfig, kind: str, vocab_size: int) -> nn.Module:
    """The output head (with its ``loss``) for ``kind``, initialised per ``cfg.init``."""
    _check_kind(kind)
    init = init_method_normal(init_stds(cfg)[0])
    if kind == "tfree":
        return TFreeHead(cfg.hidden_size, vocab_size, init, cfg.loss_pos_weight, cfg.loss_scale, cfg.fused_head_loss,
                         cfg.head_chunk_size)
    return ClassicHead(cfg.hidden_size, vocab_size, init, _vocab_key(kind))
