"""How much each layer, attention group, SwiGLU channel and hidden dimension matters, and choosing the kept ones.

Width importance of a structure (:func:`width_scores`) sums, over every weight entry that belongs to it,

* ``l1``: ``|w|``; ``l2``: ``w^2``;
* ``taylor``: ``|w * dL/dw|`` with the gradient summed over calibration batches (first-order estimate of
  the loss change when the entry is zeroed).

Structures (see :mod:`.shape`): a KV group owns its ``qkv`` rows and ``dense`` columns; a SwiGLU channel
its ``gate`` and ``up`` rows and ``down`` column; a hidden dimension its column of the embedding, head,
``qkv`` and ``gate_up``, its row of ``dense`` and ``down``, and its entry of every RMSNorm weight
(across all layers: the residual stream is shared). Groups and channels are chosen per layer, hidden
dimensions once for the model; the top entries are kept, in their original order.

Layer selection (:func:`choose_layers`): ``even`` keeps the first and last blocks and evenly spaced
ones between; ``importance`` measures, on calibration batches, the loss increase when each block is
skipped (the residual stream passes through unchanged) and keeps the most important blocks, in order.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from megatron_tfree.checkpoint.names import EMBEDDING, HEAD
from megatron_tfree.config import ModelConfig
from megatron_tfree.data.batch import Batch

from .shape import Dims, Selection

METHODS = ("l1", "l2", "taylor")
LAYER_METHODS = ("even", "importance")


def entry_scores(model: nn.Module, method: str, batches: Optional[Sequence[Batch]] = None) -> dict[str, torch.Tensor]:
    """Per-entry importance of every parameter (``|w|``, ``w^2`` or ``|w * grad|``)."""
    if method not in METHODS:
        raise ValueError(f"width importance must be one of {', '.join(METHODS)}, got {method!r}")
    params = dict(model.named_parameters())
    if method != "taylor":
        return {n: (p.detach().abs() if method == "l1" else p.detach() ** 2) for n, p in params.items()}
    if not batches:
        raise ValueError("taylor importance needs calibration batches")
    model.zero_grad(set_to_none=True)
    model.train(False)
    for batch in batches:
        model.loss(batch).backward()
    scores = {n: (p.detach() * p.grad).abs() if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    return scores


def width_scores(scores: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(hidden [h], groups per layer [kv], channels per layer [ffn])`` summed from entry scores."""
    d = Dims.of(cfg)
    hidden = scores[EMBEDDING].sum(0) + scores[HEAD].sum(0) + scores["output.norm.weight"]
    groups, channels = [], []
    for i in range(d.layers):
        p = f"blocks.{i}."
        qkv, dense = scores[p + "attention.qkv.weight"], scores[p + "attention.dense.weight"]
        gate_up, down = scores[p + "mlp.gate_up.weight"], scores[p + "mlp.down.weight"]
        hidden = hidden + qkv.sum(0) + dense.sum(1) + gate_up.sum(0) + down.sum(1)
        hidden = hidden + scores[p + "input_norm.weight"] + scores[p + "post_attention_norm.weight"]
        for bias in ("attention.dense.bias", "mlp.down.bias"):
            if p + bias in scores:
                hidden = hidden + scores[p + bias]
        g = qkv.sum(1).view(d.kv_heads, -1).sum(1) + dense.sum(0).view(d.kv_heads, -1).sum(1)
        if p + "attention.qkv.bias" in scores:
            g = g + scores[p + "attention.qkv.bias"].view(d.kv_heads, -1).sum(1)
        c = gate_up.sum(1).view(2, d.ffn).sum(0) + down.sum(0)
        if p + "mlp.gate_up.bias" in scores:
            c = c + scores[p + "mlp.gate_up.bias"].view(2, d.ffn).sum(0)
        groups.append(g)
        channels.append(c)
    return hidden, groups, channels


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` largest scores, in ascending index order (ties: the lower index)."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return torch.sort(order).values


def even_layers(n_big: int, n_small: int) -> list[int]:
    """First and last block plus evenly spaced ones between (``n_small`` of ``n_big``)."""
    if n_small == 1:
        return [0]
    return sorted({round(i * (n_big - 1) / (n_small - 1)) for i in range(n_small)})


class _Skip(nn.Module):
    def forward(self, hidden: torch.Tensor, meta, kv_cache=None) -> torch.Tensor:
        return hidden


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[Batch]) -> float:
    losses = [float(model.loss(b)) for b in batches]
    return sum(losses) / len(losses)


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Sequence[Batch]) -> list[float]:
    """Loss increase on ``batches`` when each block is skipped."""
    model.train(False)
    base = mean_loss(model, batches)
    out = []
    for i, block in enumerate(list(model.blocks)):
        model.blocks[i] = _Skip()
        try:
            out.append(mean_loss(model, batches) - base)
        finally:
            model.blocks[i] = block
    return out


def choose_layers(n_big: int, n_small: int, method: str, importance: Optional[Sequence[float]] = None) -> list[int]:
    if method not in LAYER_METHODS:
        raise ValueError(f"layer selection must be one of {', '.join(LAYER_METHODS)}, got {method!r}")
    if method == "even":
        return even_layers(n_big, n_small)
    if importance is None or len(importance) != n_big:
        raise ValueError("importance layer selection needs one measured importance per block")
    return top(torch.tensor(importance), n_small).tolist()


def select(model: nn.Module, big: ModelConfig, small: ModelConfig, width: str, layers: str,
           batches: Optional[Sequence[Batch]] = None) -> tuple[Selection, dict]:
    """The :class:`Selection` of ``small`` inside ``big`` (``model``: the big model, tp=1) and what was
    measured (layer importances, when used)."""
    b, s = Dims.of(big), Dims.of(small)
    measured: dict = {}
    importance = None
    if layers == "importance":
        if not batches:
            raise ValueError("importance layer selection needs calibration batches")
        importance = layer_importance(model, batches)
        measured["layer_loss_increase"] = importance
    kept_layers = choose_layers(b.layers, s.layers, layers, importance)
    scores = entry_scores(model, width, batches)
    hidden, groups, channels = width_scores(scores, big)
    sel = Selection(kept_layers, top(hidden, s.hidden), [top(groups[i], s.kv_heads) for i in kept_layers],
                    [top(channels[i], s.ffn) for i in kept_layers])
    return sel, measured
