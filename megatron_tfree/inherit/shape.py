"""What a smaller model keeps of a larger one: the :class:`Selection`, and slicing the weights with it.

A selection names, in the big model's numbering,

* ``layers``: the transformer blocks kept, in order;
* ``hidden``: the residual-stream dimensions kept (the same in every tensor that touches the stream:
  embedding and head columns, every RMSNorm weight, the attention and MLP input columns and output
  rows);
* ``groups[i]``: the attention KV groups kept in kept block ``i`` (a group is one key/value head with
  its query heads: the fused ``qkv`` rows ``[q_0 .. q_{g-1}, k, v]`` of ``head_dim`` each, and the
  matching ``dense`` columns);
* ``channels[i]``: the SwiGLU channels kept in kept block ``i`` (a ``gate`` row, the ``up`` row of the
  same index, the ``down`` column).

:func:`slice_weights` cuts every tensor of the big model (full names, tp=1) to the small model's
shapes; kept entries keep their values exactly. The small config must keep the head size and the
query heads per KV head (:func:`check_shapes`, errors name the key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_tfree.checkpoint.names import EMBEDDING, HEAD
from megatron_tfree.config import Config, ModelConfig
from megatron_tfree.model.transformer import mlp_inner_size


@dataclass
class Selection:
    layers: list[int]
    hidden: torch.Tensor  # [h_small] sorted indices
    groups: list[torch.Tensor]  # per kept layer: [kv_small] sorted KV-group indices
    channels: list[torch.Tensor]  # per kept layer: [ffn_small] sorted SwiGLU channel indices

    def to_dict(self) -> dict:
        return {"layers": self.layers, "hidden": len(self.hidden), "groups": [g.tolist() for g in self.groups],
                "channels": [len(c) for c in self.channels]}


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    @classmethod
    def of(cls, m: ModelConfig) -> "Dims":
        kv = m.num_kv_heads or m.num_attention_heads
        return cls(m.num_layers, m.hidden_size, m.num_attention_heads, kv, m.hidden_size // m.num_attention_heads,
                   mlp_inner_size(m))

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads


def check_shapes(big: Config, small: Config) -> None:
    """The small model must fit inside the big one (errors name the key and both values)."""
    b, s = Dims.of(big.model), Dims.of(small.model)
    problems = []
    for key, bv, sv in (("model.num_layers", b.layers, s.layers), ("model.hidden_size", b.hidden, s.hidden),
                        ("model.num_attention_heads", b.heads, s.heads), ("SwiGLU inner size", b.ffn, s.ffn)):
        if sv > bv:
            problems.append(f"{key} is {sv}, more than the source's {bv}")
    if s.head_dim != b.head_dim:
        problems.append(f"head size model.hidden_size / model.num_attention_heads is {s.head_dim}, the source's is "
                        f"{b.head_dim}: choose model.num_attention_heads = {s.hidden // b.head_dim}" if
                        s.hidden % b.head_dim == 0 else f"head size is {s.head_dim}, the source's is {b.head_dim}")
    if s.group != b.group:
        problems.append(f"query heads per KV head (model.num_attention_heads / model.num_kv_heads) is {s.group}, "
                        f"the source's is {b.group}")
    for key in ("bias", "norm_eps", "rotary_embedding_base"):
        if getattr(big.model, key) != getattr(small.model, key):
            problems.append(f"model.{key} is {getattr(small.model, key)!r}, the source's is {getattr(big.model, key)!r}")
    if big.tokenizer.kind != small.tokenizer.kind:
        problems.append(f"tokenizer.kind is {small.tokenizer.kind!r}, the source's is {big.tokenizer.kind!r} (a new "
                        f"vocabulary: toklab prune/swap first)")
    if problems:
        raise ValueError("the smaller model does not fit inside the source: " + "; ".join(problems))


def _group_rows(groups: torch.Tensor, size: int) -> torch.Tensor:
    """Row indices of whole groups of ``size`` rows."""
    return (groups[:, None] * size + torch.arange(size)[None, :]).reshape(-1)


def slice_weights(weights: dict[str, torch.Tensor], big: ModelConfig, sel: Selection) -> Iterator[tuple[str, torch.Tensor]]:
    """The small model's tensors (its names, ``state_dict`` order) cut from the big model's ``weights``."""
    d = Dims.of(big)
    h = sel.hidden
    yield EMBEDDING, weights[EMBEDDING][:, h]
    for new, (old, groups, channels) in enumerate(zip(sel.layers, sel.groups, sel.channels)):
        p, q = f"blocks.{old}.", f"blocks.{new}."
        qkv_rows = _group_rows(groups, (d.group + 2) * d.head_dim)
        dense_cols = _group_rows(groups, d.group * d.head_dim)
        gate_up_rows = torch.cat([channels, d.ffn + channels])
        cut = {
            "input_norm.weight": lambda t: t[h],
            "attention.qkv.weight": lambda t: t[qkv_rows][:, h],
            "attention.qkv.bias": lambda t: t[qkv_rows],
            "attention.dense.weight": lambda t: t[h][:, dense_cols],
            "attention.dense.bias": lambda t: t[h],
            "post_attention_norm.weight": lambda t: t[h],
            "mlp.gate_up.weight": lambda t: t[gate_up_rows][:, h],
            "mlp.gate_up.bias": lambda t: t[gate_up_rows],
            "mlp.down.weight": lambda t: t[h][:, channels],
            "mlp.down.bias": lambda t: t[h],
        }
        names = [n for n in weights if n.startswith(p)]
        for name in names:
            rest = name[len(p):]
            if rest not in cut:
                raise ValueError(f"do not know how to cut {name!r}")
            yield q + rest, cut[rest](weights[name]).contiguous()
    yield "output.norm.weight", weights["output.norm.weight"][h]
    yield HEAD, weights[HEAD][:, h].contiguous()


def full_selection(big: ModelConfig) -> Selection:
    """Everything kept (the identity)."""
    d = Dims.of(big)
    return Selection(list(range(d.layers)), torch.arange(d.hidden), [torch.arange(d.kv_heads)] * d.layers,
                     [torch.arange(d.ffn)] * d.layers)
