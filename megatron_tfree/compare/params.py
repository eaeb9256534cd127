"""Parameters of an arm, split into the vocabulary tensors (embedding + head) and the rest.

Counted from the model itself: :func:`trained_params` from a trained checkpoint's parameter specs
(:attr:`megatron_tfree.checkpoint.CheckpointReader.specs`, the real vocabulary size of its tokenizer),
:func:`model_params` from :func:`megatron_tfree.checkpoint.names.param_specs` of a model built on the
meta device at any vocabulary size (the paper's nominal 64k when the corpus gave a BPE fewer tokens).
The vocabulary tensors are :data:`megatron_tfree.checkpoint.names.VOCAB_ROWS`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_tfree.checkpoint.names import VOCAB_ROWS, ParamSpec, param_specs
from megatron_tfree.config import ModelConfig


def split(specs: dict[str, ParamSpec], vocab_size: int) -> dict[str, int]:
    """``{"embedding_head", "other", "total", "vocab_size"}`` of a model's parameter specs."""
    vocab = sum(specs[name].numel for name in VOCAB_ROWS if name in specs)
    total = sum(s.numel for s in specs.values())
    return {"embedding_head": vocab, "other": total - vocab, "total": total, "vocab_size": int(vocab_size)}


def trained_params(run_dir: str | Path) -> dict[str, int]:
    """The split of a trained arm (its checkpoint's model and tokenizer)."""
    from megatron_tfree.checkpoint import CheckpointReader

    reader = CheckpointReader(run_dir)
    return split(reader.specs, reader.tokenizer.vocab_size)


def model_params(model: ModelConfig, kind: str, vocab_size: int) -> dict[str, Any]:
    """The split of the model of ``model`` with a ``kind`` vocabulary of ``vocab_size`` rows."""
    return split(param_specs(model, kind, vocab_size), vocab_size)
