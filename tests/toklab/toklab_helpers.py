"""Tiny tokenizers and checkpoints for the tokenizer-lab tests (made here, no downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from megatron_tfree.checkpoint import atomic_output_dir, param_specs
from megatron_tfree.checkpoint.consolidated import write_weights_only
from megatron_tfree.config import Config
from megatron_tfree.model import GPTModel
from megatron_tfree.parallel import state

MODEL = {"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "attention": "sdpa"}


def byte_level_bpe(merges: Sequence[tuple[str, str]], specials: Sequence[str] = ("<|endoftext|>",)) -> Any:
    """A hand-made byte-level BPE: the 256 byte symbols (ids 0..255 in byte order), then one token per
    merge (in order), then the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from megatron_tfree.toklab.specs import byte_symbols

    vocab = {sym: b for b, sym in byte_symbols().items()}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    return tok


def model_config(kind: str = "classic", **tokenizer: Any) -> Config:
    return Config.from_dict({"tokenizer": {"kind": kind, **tokenizer}, "model": dict(MODEL)})


def make_checkpoint(out: Path, tokenizer: Any, seed: int = 0) -> Path:
    """A weights-only checkpoint of a randomly initialised tiny model for ``tokenizer`` (this project's
    ClassicTokenizer or TrigramTokenizer)."""
    settings = {} if tokenizer.kind == "classic" else {
        "vocab_size": tokenizer.vocab_size, "vocab_population": tokenizer.vocab_population}
    cfg = model_config(tokenizer.kind, **settings)
    with state.single_process():
        model = GPTModel(cfg.model, tokenizer.kind, tokenizer.vocab_size, seed=seed)
    specs = param_specs(cfg.model, tokenizer.kind, tokenizer.vocab_size)
    with atomic_output_dir(out) as tmp:
        write_weights_only(tmp, cfg, tokenizer, ((n, p.detach()) for n, p in model.named_parameters()), specs,
                           {"test": "toklab"})
    return out



def rows_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    from megatron_tfree.checkpoint import CheckpointReader

    return {n: t.clone() for n, t in CheckpointReader(checkpoint).tensors()}
