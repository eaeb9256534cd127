"""The model: one definition for T-Free and classic tokenizers (see :mod:`.gpt`)."""

from .embedding import ClassicEmbedding, ClassicHead, TFreeEmbedding, TFreeHead, build_embedding, build_head, gather_logits
from .gpt import GPTModel, OutputLayer, make_input_batch, param_groups
from .transformer import (
    AttentionMeta,
    KVCache,
    RMSNorm,
    TransformerBlock,
    apply_rotary,
    build_attention_meta,
    column_linear,
    mlp_inner_size,
    row_linear,
)

__all__ = [
    "AttentionMeta", "ClassicEmbedding", "ClassicHead", "GPTModel", "KVCache", "OutputLayer", "RMSNorm",
    "TFreeEmbedding", "TFreeHead", "TransformerBlock", "apply_rotary", "build_attention_meta", "build_embedding",
    "build_head", "column_linear", "gather_logits", "make_input_batch", "mlp_inner_size", "param_groups", "row_linear",
]
