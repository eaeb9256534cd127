"""This model's tensors <-> Hugging Face Llama tensors (names, splits, rotary order), both directions.

The decoder is a Llama: RMSNorm, rotary, grouped KV heads, SwiGLU, untied head (biases only with
``model.bias``, which maps to Llama's ``attention_bias`` / ``mlp_bias``). What differs is layout:

* QKV is one matrix grouped per KV head, ``[kv][q_0 .. q_{g-1}, k, v][head_dim]`` (g = heads / kv
  heads); Llama has ``q_proj`` (heads in the order ``kv * g + j``, the same order), ``k_proj``, ``v_proj``.
* SwiGLU gate|up is one matrix ``[gate (ffn) | up (ffn)]``; Llama has ``gate_proj`` and ``up_proj``.
* Rotary: this model rotates adjacent channel pairs ``(x[2i], x[2i+1])`` (the complex formulation of
  the T-Free reference); Llama rotates ``(x[i], x[i + d/2])`` with the same frequency for ``i``. So the
  rows of q and k (and their biases) are permuted within every head: Llama channel ``i`` is our
  ``2i``, channel ``i + d/2`` our ``2i + 1``. Attention scores are unchanged (q and k move together).

``to_hf`` maps one full tensor to its Llama tensors; ``from_hf`` takes the Llama tensors of one of our
names back. Both are exact (pure re-indexing), so conversions round-trip bit for bit.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

from ..config import ModelConfig

_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_SIMPLE = {"input_norm.weight": "input_layernorm.weight",
           "post_attention_norm.weight": "post_attention_layernorm.weight",
           "attention.dense.weight": "self_attn.o_proj.weight", "attention.dense.bias": "self_attn.o_proj.bias",
           "mlp.down.weight": "mlp.down_proj.weight", "mlp.down.bias": "mlp.down_proj.bias"}
_TOP = {"embedding.weight": "model.embed_tokens.weight", "output.norm.weight": "model.norm.weight",
        "output.head.linear.weight": "lm_head.weight"}


def _dims(cfg: ModelConfig) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    kv = cfg.num_kv_heads or heads
    return heads, kv, cfg.hidden_size // heads


def interleaved_to_halves(t: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """Rows of ``heads`` heads of ``d`` channels: adjacent-pair order -> rotate-half order (per head)."""
    rest = t.shape[1:]
    return t.reshape(heads, d // 2, 2, *rest).transpose(1, 2).reshape(heads * d, *rest)


def halves_to_interleaved(t: torch.Tensor, heads: int, d: int) -> torch.Tensor:
    """The inverse of :func:`interleaved_to_halves`."""
    rest = t.shape[1:]
    return t.reshape(heads, 2, d // 2, *rest).transpose(1, 2).reshape(heads * d, *rest)


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The Llama tensors of our full tensor ``name``, made one at a time (an exporter writes each before
    the next exists: at most one re-ordered copy beside ``tensor``)."""
    if name in _TOP:
        yield _TOP[name], tensor
        return
    m = _BLOCK.fullmatch(name)
    if m is None:
        raise ValueError(f"{name!r} is not a parameter of this model")
    i, rest = m.groups()
    prefix = f"model.layers.{i}."
    if rest in _SIMPLE:
        yield prefix + _SIMPLE[rest], tensor
        return
    kind = rest.rsplit(".", 1)[1]  # weight / bias
    if rest.startswith("attention.qkv."):
        heads, kv, d = _dims(cfg)
        g = heads // kv
        trailing = tensor.shape[1:]
        grouped = tensor.reshape(kv, g + 2, d, *trailing)
        yield f"{prefix}self_attn.q_proj.{kind}", interleaved_to_halves(grouped[:, :g].reshape(heads * d, *trailing), heads, d)
        yield f"{prefix}self_attn.k_proj.{kind}", interleaved_to_halves(grouped[:, g].reshape(kv * d, *trailing), kv, d)
        yield f"{prefix}self_attn.v_proj.{kind}", grouped[:, g + 1].reshape(kv * d, *trailing).contiguous()
        return
    if rest.startswith("mlp.gate_up."):
        gate, up = tensor.chunk(2, dim=0)  # row blocks of a contiguous tensor: views, no copy
        yield f"{prefix}mlp.gate_proj.{kind}", gate.contiguous()
        yield f"{prefix}mlp.up_proj.{kind}", up.contiguous()
        return
    raise ValueError(f"{name!r} is not a parameter of this model")


def hf_names(name: str, cfg: ModelConfig) -> list[str]:
    """The Llama names :func:`to_hf` gives for ``name`` (no values needed)."""
    return [n for n, _ in to_hf(name, torch.empty(_probe_shape(name, cfg), device="meta"), cfg)]


def _probe_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    heads, kv, d = _dims(cfg)
    if ".qkv." in name:
        return ((heads + 2 * kv) * d,) + ((cfg.hidden_size,) if name.endswith("weight") else ())
    if ".gate_up." in name:
        return (2,) + ((1,) if name.endswith("weight") else ())
    return (1,)


def from_hf(name: str, get: Callable[[str], torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """Our full tensor ``name`` from the Llama tensors ``get(llama name)`` (inverse of :func:`to_hf`)."""
    names = hf_names(name, cfg)
    parts = [get(n) for n in names]
    if len(parts) == 1:
        return parts[0]
    if ".gate_up." in name:
        return torch.cat(parts, dim=0)
    heads, kv, d = _dims(cfg)
    g = heads // kv
    q, k, v = parts
    trailing = q.shape[1:]
    q = halves_to_interleaved(q, heads, d).reshape(kv, g, d, *trailing)
    k = halves_to_interleaved(k, kv, d).reshape(kv, 1, d, *trailing)
    v = v.reshape(kv, 1, d, *trailing)
    return torch.cat([q, k, v], dim=1).reshape((heads + 2 * kv) * d, *trailing)
