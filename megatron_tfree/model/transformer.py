"""The decoder block of megatron_tfree: RMSNorm, rotary embeddings, attention, SwiGLU MLP.

A Llama-style pre-norm block (no biases unless ``model.bias``), the same for T-Free and classic models::

    h = h + dropout(Attention(RMSNorm(h)))
    h = h + dropout(MLP(RMSNorm(h)))

Tensors are batch-first, ``[B, S, h]``. Packed samples hold several documents per row: positions
restart at 0 for every document (``position_ids``) and attention is block-causal (a token sees the
earlier tokens of its own document only, ``document_ids``). Documents must be contiguous runs of
equal ``document_ids`` within a row.

Attention runs on one of two paths, chosen per forward by :func:`build_attention_meta`:

* ``flash``: ``flash_attn_varlen_func`` over the documents as variable-length sequences; used when
  flash-attn imports, the tensors are on CUDA in fp16/bf16 and no KV cache is in use
  (``model.attention`` = ``auto`` or ``flash``).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with a boolean block-causal mask
  (causal AND same document), everywhere else. Which path runs is logged once per path.

Linear layers are created only through :func:`column_linear` / :func:`row_linear`, which build
:class:`~megatron_tfree.parallel.layers.ColumnParallelLinear` / ``RowParallelLinear`` (plain linears
at tp=1): under tensor parallelism (``parallel.state.initialize(tp, pp)`` before the model is built)
each rank holds ``kv_heads / tp`` KV groups of attention heads and about ``ffn / tp`` MLP features
(uneven when ``tp`` does not divide ``ffn``), and the
block's output is all-reduced. Weight layouts are chosen to split cleanly along the output dimension:

* fused QKV: output features grouped per KV head, ``[kv_head][q_0 .. q_{g-1}, k, v][head_dim]`` with
  ``g = heads / kv_heads``, so a contiguous column split gives each rank whole KV groups;
* fused SwiGLU gate|up: ``[gate (ffn) | up (ffn)]``; a tensor-parallel split must shard each half
  (stride 2 in Megatron terms).

Initialisation "pythia" (reference 7B): normal with std ``sqrt(2 / (5 h))`` for every weight except
the output projections (attention out, MLP down), which get ``2 / (L * sqrt(h))``. "normal" uses
``model.init_std`` for every weight. Norm weights start at 1.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..parallel import state as parallel_state
from ..parallel.init import divide
from ..parallel.layers import ColumnParallelLinear, RowParallelLinear

logger = logging.getLogger("megatron_tfree")

try:  # optional: only on CUDA machines with flash-attn installed
    from flash_attn import flash_attn_varlen_func  # type: ignore
except Exception:  # ImportError, or a broken CUDA build
    flash_attn_varlen_func = None

InitMethod = Callable[[torch.Tensor], None]

# --------------------------------------------------------------------------------------------------
# initialisation and linear-layer factories (the tensor-parallel issue swaps the factories)
# --------------------------------------------------------------------------------------------------


def init_method_normal(std: float) -> InitMethod:
    """An in-place N(0, std^2) initialiser."""

    def init(weight: torch.Tensor) -> None:
        with torch.no_grad():
            nn.init.normal_(weight, mean=0.0, std=std)

    return init


def init_stds(cfg: ModelConfig) -> tuple[float, float]:
    """``(std, output_std)``: std of most weights and of the output projections (attention out, MLP down)."""
    if cfg.init == "pythia":
        h = cfg.hidden_size
        return math.sqrt(2.0 / (5.0 * h)), 2.0 / (cfg.num_layers * math.sqrt(h))
    return cfg.init_std, cfg.init_std


def _as_nn_linear(init_method: InitMethod) -> InitMethod:
    """``init_method`` preceded by ``nn.Linear``'s own default init (kaiming-uniform), which the model
    drew before tensor parallelism existed: keeping that RNG draw keeps the weights of every seed
    bit-identical to earlier versions (and layout-independent, see :mod:`megatron_tfree.parallel.init`)."""

    def init(weight: torch.Tensor) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        init_method(weight)

    return init


def column_linear(in_features: int, out_features: int, init_method: InitMethod, stride: int = 1,
                  name: str = "output features", cls: type[ColumnParallelLinear] = ColumnParallelLinear,
                  bias: bool = False) -> nn.Module:
    """Linear (bias-free unless ``bias``) whose output dimension tensor parallelism splits (QKV, gate|up,
    head): a :class:`~megatron_tfree.parallel.layers.ColumnParallelLinear` (a plain linear at tp=1; or the
    subclass ``cls``) whose output is this TP rank's slice; ``stride`` = number of fused blocks each rank
    takes a slice of."""
    kwargs = {"bias": True} if bias else {}
    return cls(in_features, out_features, _as_nn_linear(init_method), stride=stride, name=name, **kwargs)


def row_linear(in_features: int, out_features: int, init_method: InitMethod, name: str = "input features",
               bias: bool = False) -> nn.Module:
    """Linear (bias-free unless ``bias``) whose input dimension tensor parallelism splits (attention out,
    MLP down): a :class:`~megatron_tfree.parallel.layers.RowParallelLinear` taking this rank's slice of
    the input and returning the full (all-reduced) output."""
    return RowParallelLinear(in_features, out_features, _as_nn_linear(init_method), name=name, bias=bias)


def mlp_inner_size(cfg: ModelConfig) -> int:
    """SwiGLU inner size: ``model.ffn_hidden_size`` when set, else ``int(mlp_factor * hidden_size)``
    (truncation, no multiple-of rounding, as in the reference: 7B 4096 * 2.66796875 = 10928; tiny
    256 * 2.66796875 = 683)."""
    return cfg.ffn_hidden_size or int(cfg.mlp_factor * cfg.hidden_size)


# --------------------------------------------------------------------------------------------------
# norm and rotary embeddings
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 and cast back to the input dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return out.to(x.dtype)


def apply_rotary(x: torch.Tensor, position_ids: torch.Tensor, base: float) -> torch.Tensor:
    """Rotate ``x [B, S, heads, d]`` by the positions ``[B, S]`` (float32 compute, cast back).

    Pairs are adjacent channels ``(x[2i], x[2i+1])`` rotated by ``pos * base^(-2i/d)``, the complex
    formulation of the reference. Positions are arbitrary per token, so they may restart per document
    and continue across KV-cache steps; there is no maximum sequence length.
    """
    d = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [d/2]
    angle = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, S, d/2]
    cos = angle.cos()[:, :, None, :]
    sin = angle.sin()[:, :, None, :]
    xf = x.float().reshape(*x.shape[:-1], d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# KV cache and the per-forward attention metadata
# --------------------------------------------------------------------------------------------------


class KVCache:
    """Keys/values of earlier steps for incremental decoding.

    Per layer index: keys and values ``[B, S_past, kv_heads, head_dim]`` (keys already rotated), plus
    the document ids ``[B, S_past]`` of the cached positions for the block-causal mask. A step appends
    its new positions; the caller continues ``position_ids`` from where the previous step ended.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.document_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        """Number of cached positions."""
        return 0 if self.document_ids is None else int(self.document_ids.shape[1])

    def extend_documents(self, document_ids: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Register a step's ``[B, S_new]`` document ids; returns (past length, all key document ids)."""
        past = len(self)
        if self.document_ids is not None:
            document_ids = torch.cat([self.document_ids, document_ids], dim=1)
        self.document_ids = document_ids
        return past, document_ids

    def append(self, layer_index: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append a layer's new keys/values ``[B, S_new, kv, d]``; returns all keys/values so far."""
        if layer_index in self.keys:
            key = torch.cat([self.keys[layer_index], key], dim=1)
            value = torch.cat([self.values[layer_index], value], dim=1)
        self.keys[layer_index], self.values[layer_index] = key, value
        return key, value


@dataclass
class AttentionMeta:
    """What every block of one forward needs besides the hidden states (built once per forward)."""

    position_ids: torch.Tensor  # [B, S] of the query positions
    path: str  # "flash" or "sdpa"
    mask: Optional[torch.Tensor] = None  # sdpa: [B, 1, S_q, S_k] bool, True = may attend
    cu_seqlens: Optional[torch.Tensor] = None  # flash: [num_docs + 1] int32 over the flattened B*S
    max_seqlen: int = 0


_logged_paths: set[str] = set()


def _flash_possible(dtype: torch.dtype, device: torch.device) -> bool:
    return flash_attn_varlen_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def build_attention_meta(
    position_ids: torch.Tensor,
    document_ids: torch.Tensor,
    dtype: torch.dtype,
    attention: str = "auto",
    kv_cache: Optional[KVCache] = None,
) -> AttentionMeta:
    """Choose the attention path and build its mask (sdpa) or document boundaries (flash).

    ``attention`` is ``model.attention``: ``auto`` and ``flash`` use flash-attn when possible (see the
    module docstring), ``sdpa`` never does. With a ``kv_cache`` the new document ids are registered
    in the cache and the mask covers cached + new keys (always sdpa).
    """
    if attention not in ("auto", "flash", "sdpa"):
        raise ValueError(f"model.attention must be auto, flash or sdpa, got {attention!r}")
    B, S = document_ids.shape
    use_flash = attention != "sdpa" and kv_cache is None and _flash_possible(dtype, document_ids.device)
    if attention == "flash" and not use_flash and "flash-unavailable" not in _logged_paths:
        _logged_paths.add("flash-unavailable")
        logger.warning("model.attention=flash but flash-attn cannot run here (needs flash-attn, CUDA, "
                       "fp16/bf16 and no KV cache); using torch sdpa")
    path = "flash" if use_flash else "sdpa"
    if path not in _logged_paths:
        _logged_paths.add(path)
        logger.info("attention path: %s", "flash-attn varlen" if use_flash else "torch sdpa with block-causal mask")

    if use_flash:
        flat = document_ids.reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::S] = True  # every batch row starts a new sequence
        idx = starts.nonzero().squeeze(1)
        cu = torch.cat([idx, idx.new_tensor([B * S])]).to(torch.int32)
        return AttentionMeta(position_ids, "flash", cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))

    past, key_docs = (0, document_ids) if kv_cache is None else kv_cache.extend_documents(document_ids)
    q_index = torch.arange(S, device=document_ids.device) + past
    k_index = torch.arange(key_docs.shape[1], device=document_ids.device)
    causal = k_index[None, :] <= q_index[:, None]  # [S_q, S_k]
    same_doc = document_ids[:, :, None] == key_docs[:, None, :]  # [B, S_q, S_k]
    return AttentionMeta(position_ids, "sdpa", mask=(causal & same_doc)[:, None])


# --------------------------------------------------------------------------------------------------
# attention, MLP, block
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with optional grouped KV heads, fused QKV, rotary (biases: ``model.bias``)."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_kv_heads or cfg.num_attention_heads
        self.group = self.num_heads // self.num_kv_heads  # query heads per KV head
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.rotary_base = cfg.rotary_embedding_base
        std, out_std = init_stds(cfg)
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        kv_key = "model.num_kv_heads" if cfg.num_kv_heads else "model.num_attention_heads"
        divide(self.num_kv_heads, parallel_state.get().tp, kv_key)  # each rank holds whole KV groups
        self.qkv = column_linear(cfg.hidden_size, qkv_out, init_method_normal(std), name=kv_key, bias=cfg.bias)
        self.dense = row_linear(self.num_heads * self.head_dim, cfg.hidden_size, init_method_normal(out_std),
                                name=kv_key, bias=cfg.bias)

    def forward(self, x: torch.Tensor, meta: AttentionMeta, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        B, S, _ = x.shape
        g, d = self.group, self.head_dim
        qkv = self.qkv(x)
        kv_local = qkv.shape[-1] // ((g + 2) * d)  # KV heads on this rank (all without tensor parallelism)
        qkv = qkv.view(B, S, kv_local, g + 2, d)
        q = qkv[:, :, :, :g].reshape(B, S, kv_local * g, d)
        k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]  # [B, S, kv, d]
        q = apply_rotary(q, meta.position_ids, self.rotary_base)
        k = apply_rotary(k, meta.position_ids, self.rotary_base)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_index, k, v)

        if meta.path == "flash":
            out = flash_attn_varlen_func(
                q.reshape(B * S, -1, d), k.reshape(B * S, -1, d), v.reshape(B * S, -1, d),
                meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen,
                dropout_p=0.0, causal=True,
            )
        else:
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, d]
            if g > 1:
                kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=meta.mask).transpose(1, 2)
        return self.dense(out.reshape(B, S, kv_local * g * d))


class SwiGLUMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up fused into one projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        std, out_std = init_stds(cfg)
        self.ffn = mlp_inner_size(cfg)
        key = "SwiGLU inner size int(model.mlp_factor * model.hidden_size)"
        # uneven TP splits are fine here (the reference's sizes are often odd: 683)
        self.gate_up = column_linear(cfg.hidden_size, 2 * self.ffn, init_method_normal(std), stride=2, name=key,
                                     bias=cfg.bias)
        self.down = row_linear(self.ffn, cfg.hidden_size, init_method_normal(out_std), name=key, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm residual block. Dropout (``model.dropout``) applies to the attention and MLP outputs
    before the residual additions (no attention-probability dropout, as in the reference)."""

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg, layer_index)
        self.post_attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLUMLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, hidden: torch.Tensor, meta: AttentionMeta, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        hidden = hidden + self.dropout(self.attention(self.input_norm(hidden), meta, kv_cache))
        return hidden + self.dropout(self.mlp(self.post_attention_norm(hidden)))
