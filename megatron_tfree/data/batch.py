"""The batch the model consumes: a small dataclass with named fields, not a tuple.

Inputs and targets are CSR id sets (see :class:`megatron_tfree.tokenizer.base.SparseIds`) flattened
over the ``[batch, seq]`` positions in row-major order: position ``(b, s)`` is CSR row
``b * seq_len + s``. For a classic tokenizer every row has exactly one id.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Batch:
    input_offsets: torch.Tensor  # [B*S + 1] int64
    input_ids: torch.Tensor  # [nnz_in] int64 vocabulary ids of the input units
    target_offsets: torch.Tensor  # [B*S + 1] int64
    target_ids: torch.Tensor  # [nnz_tgt] int64 vocabulary ids of the next unit (multi-hot for T-Free)
    position_ids: torch.Tensor  # [B, S] int64, restart at 0 after every end-of-text
    document_ids: torch.Tensor  # [B, S] int64, block-causal attention: attend only within equal ids
    loss_weights: torch.Tensor  # [B, S] float32; 0 on padding, has_loss in finetuning
    target_bytes: torch.Tensor | None = None  # [B, S] int64: UTF-8 bytes of each target unit (bits/byte)
    # [B][S] surface strings of the target units (words for T-Free) where weight > 0; feeds the
    # training word counter behind the decode dictionary. Not moved by .to().
    target_units: list[list[str]] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.position_ids.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "Batch":
        return replace(self, **{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
                                for f in fields(self)})
