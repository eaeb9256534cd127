"""The GPT model: embedding -> transformer blocks -> final norm + head, and its loss.

    model = GPTModel(cfg.model, cfg.tokenizer.kind, vocab_size, seed=cfg.training.seed)
    loss = model(batch, return_loss=True)             # training (= model.loss(batch); fused head + loss)
    logits = model(batch)                             # [B, S, v] (vocab-local [B, S, v/tp] under TP)
    full = model.gather_logits(logits)                # [B, S, v] on every TP rank (inference / eval)

    cache = model.new_kv_cache()                      # inference: incremental decoding
    logits = model(prompt_batch, kv_cache=cache)      # prompt, positions 0..P-1
    logits = model(next_batch, kv_cache=cache)        # one more position per row, position P, ...

The model is defined once as an ordered list of stages (:meth:`GPTModel.layers`): the embedding,
``num_layers`` :class:`TransformerBlock` s and the :class:`OutputLayer` (final norm + head). A
pipeline-parallel wrapper builds DeepSpeed layer specs from the same classes. Each stage is
initialised from its own seed derived from ``(seed, stage index)``, so a stage's weights do not
depend on which other stages a process builds.

Tensor parallelism is a property of the layers (:mod:`megatron_tfree.parallel`): call
``parallel.state.initialize(tp, pp)`` on every rank before building the model and each rank holds its
shards (attention heads by KV group, MLP features, vocabulary rows/columns). The full weights are the
same for every layout and seed (:mod:`megatron_tfree.parallel.init`); at tp=1 they are the weights
this model always had. Under TP, :meth:`GPTModel.forward` returns *vocab-local* logits; ``loss`` and
``loss_from_logits`` take them as they are (the same scalar on every TP rank), and
:meth:`GPTModel.gather_logits` assembles the full ``[B, S, v]``. All TP peers must draw the same
dropout masks (seed torch's RNG identically on them) and pass an explicit ``seed``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..data.batch import Batch
from .embedding import build_embedding, build_head, gather_logits
from .transformer import KVCache, RMSNorm, TransformerBlock, build_attention_meta


@contextlib.contextmanager
def seeded(seed: int, stage_index: int) -> Iterator[None]:
    """Run the block with the CPU RNG seeded from ``(seed, stage_index)``; the global RNG state is
    restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + stage_index) % (2**63))
        yield


class OutputLayer(nn.Module):
    """Final RMSNorm + head; ``loss`` delegates to the head (T-Free BCE or classic CE)."""

    def __init__(self, cfg: ModelConfig, kind: str, vocab_size: int):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = build_head(cfg, kind, vocab_size)

    def forward(self, hidden: torch.Tensor, batch: Optional[Batch] = None) -> torch.Tensor:
        """Logits of the last block's ``hidden``; with ``batch``, the training loss instead (for T-Free
        with ``model.fused_head_loss`` computed without forming the logits)."""
        if batch is None:
            return self.head(self.norm(hidden))
        return self.head.loss_from_hidden(self.norm(hidden), batch)

    @property
    def fuses_loss(self) -> bool:
        """Whether ``forward(hidden, batch)`` skips the logits (so callers should pass it ``hidden``)."""
        return bool(getattr(self.head, "fused", False))

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.head.loss(logits, batch)


def build_stage(cfg: ModelConfig, kind: str, vocab_size: int, seed: int, stage_index: int) -> nn.Module:
    """Stage ``stage_index`` of the model, built under ``seeded(seed, stage_index)``: 0 is the
    embedding, ``1..L`` the transformer blocks, ``L + 1`` the output layer. The one place layers are
    constructed, so a pipeline stage built alone has exactly the weights of the full model's."""
    L = cfg.num_layers
    if not 0 <= stage_index <= L + 1:
        raise ValueError(f"stage_index must be in [0, {L + 1}], got {stage_index}")
    with seeded(seed, stage_index):
        if stage_index == 0:
            return build_embedding(cfg, kind, vocab_size)
        if stage_index <= L:
            return TransformerBlock(cfg, stage_index - 1)
        return OutputLayer(cfg, kind, vocab_size)


class GPTModel(nn.Module):
    """Decoder-only LM for ``tokenizer_kind`` ``tfree`` or ``classic``.

    Args:
        model_cfg: architecture (:class:`ModelConfig`).
        tokenizer_kind: ``tfree`` (embedding-bag input, BCE multi-label loss) or ``classic``.
        vocab_size: rows of the embedding / columns of the head.
        seed: initialisation seed (same seed -> same weights); ``None`` draws one from torch's global
            RNG, so ``torch.manual_seed`` before construction is deterministic too.
    """

    def __init__(self, model_cfg: ModelConfig, tokenizer_kind: str, vocab_size: int, seed: Optional[int] = None):
        super().__init__()
        self.cfg = model_cfg
        self.tokenizer_kind = tokenizer_kind
        self.vocab_size = vocab_size
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        L = model_cfg.num_layers
        self.embedding = build_stage(model_cfg, tokenizer_kind, vocab_size, seed, 0)
        self.blocks = nn.ModuleList(build_stage(model_cfg, tokenizer_kind, vocab_size, seed, i + 1) for i in range(L))
        self.output = build_stage(model_cfg, tokenizer_kind, vocab_size, seed, L + 1)

    def layers(self) -> list[nn.Module]:
        """The stages in order: embedding, block_0 .. block_{L-1}, output (final norm + head)."""
        return [self.embedding, *self.blocks, self.output]

    @staticmethod
    def new_kv_cache() -> KVCache:
        return KVCache()

    def forward(self, batch: Batch, kv_cache: Optional[KVCache] = None, return_loss: bool = False) -> torch.Tensor:
        """Logits ``[B, S, v]`` (this TP rank's ``[B, S, v / tp]`` under tensor parallelism, see
        :meth:`gather_logits`). Only the input fields, ``position_ids`` and ``document_ids`` of ``batch``
        are read. With ``kv_cache`` the batch holds the new positions only (continuing positions); their
        keys/values are appended to the cache. ``return_loss``: the scalar training loss of ``batch``
        instead (what training calls, through the DeepSpeed engine: ``engine(batch, return_loss=True)``),
        fused with the head where the model has that (``model.fused_head_loss``)."""
        hidden = self.embedding(batch)
        meta = build_attention_meta(batch.position_ids, batch.document_ids, hidden.dtype, self.cfg.attention, kv_cache)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training and kv_cache is None:
                hidden = checkpoint(block, hidden, meta, use_reentrant=False)
            else:
                hidden = block(hidden, meta, kv_cache)
        return self.output(hidden, batch if return_loss else None)

    @staticmethod
    def gather_logits(logits: torch.Tensor) -> torch.Tensor:
        """The full ``[..., v]`` logits from :meth:`forward`'s vocab-local ones (identity without tensor
        parallelism; an all-gather over the TP group otherwise, so every TP rank must call it)."""
        return gather_logits(logits)

    def loss_from_logits(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The scalar training loss of ``logits`` (float32; see :mod:`megatron_tfree.model.embedding`)."""
        return self.output.loss(logits, batch)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The training loss, ``self(batch, return_loss=True)``: equal to
        ``loss_from_logits(self(batch), batch)`` up to rounding (the fused head sums in another order)."""
        return self(batch, return_loss=True)


def make_input_batch(input_offsets: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                     document_ids: Optional[torch.Tensor] = None) -> Batch:
    """A :class:`Batch` for inference: inputs only (empty targets, zero loss weights).

    ``document_ids`` defaults to zeros (one document per row)."""
    B, S = position_ids.shape
    device = position_ids.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return Batch(
        input_offsets=input_offsets,
        input_ids=input_ids,
        target_offsets=torch.zeros(B * S + 1, dtype=torch.long, device=device),
        target_ids=empty,
        position_ids=position_ids,
        document_ids=torch.zeros_like(position_ids) if document_ids is None else document_ids,
        loss_weights=torch.zeros(B, S, dtype=torch.float32, device=device),
    )


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups: weight decay on matrices (linears, embedding), none on norm weights
    and biases (every parameter with fewer than 2 dimensions). Empty groups are left out."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
