"""``training.init_from``: start a new run from a checkpoint's weights (fine-tuning, inheritance).

Any checkpoint the streaming reader understands works: a run dir, a tag dir of any (TP, PP, DP, ZeRO)
layout, a consolidated or an imported directory (:mod:`megatron_tfree.hf`). Every rank reads the
full tensors it holds and keeps its shard; the optimizer, LR schedule, data position and step start
fresh (resuming is ``training.load_dir``). The run uses the checkpoint's tokenizer (its ids are what
the embedding rows mean); the config's tokenizer and model structure must agree with the checkpoint,
otherwise a :class:`~megatron_tfree.config.ConfigError` names the key. Once the run has saved a
checkpoint of its own, a restart resumes from that and ``init_from`` is ignored.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_tfree.checkpoint import CheckpointReader, load_into
from megatron_tfree.config import Config, ConfigError
from megatron_tfree.model.transformer import mlp_inner_size


def weight_structure(cfg: Config) -> dict[str, Any]:
    """The config values that decide the shapes and meaning of the weights (``training.init_from`` needs
    them equal; resuming needs these and more, :mod:`.resume_check`)."""
    m = cfg.model
    return {"model.hidden_size": m.hidden_size, "model.num_layers": m.num_layers,
            "model.num_attention_heads": m.num_attention_heads,
            "model.num_kv_heads": m.num_kv_heads or m.num_attention_heads,
            "model.ffn_hidden_size": mlp_inner_size(m), "model.bias": m.bias, "tokenizer.kind": cfg.tokenizer.kind}


def open_source(cfg: Config) -> CheckpointReader:
    """The reader of ``training.init_from``, checked against ``cfg`` (errors name the key)."""
    path = cfg.training.init_from
    try:
        reader = CheckpointReader(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"training.init_from={path}: {e}") from None
    mine, theirs = weight_structure(cfg), weight_structure(reader.cfg)
    for key, value in mine.items():
        if theirs[key] != value:
            raise ConfigError(f"training.init_from={path}: {key} is {value!r} here but {theirs[key]!r} in the "
                              f"checkpoint ({reader.tag_dir}); the weights do not fit this model")
    if cfg.tokenizer.kind == "tfree":
        from megatron_tfree.tokenizer import TrigramTokenizer

        want = TrigramTokenizer.from_config(cfg.tokenizer).config_dict()
        have = reader.tokenizer.config_dict()
        for key in sorted(set(want) - {"cache_size"}):
            if want[key] != have.get(key):
                raise ConfigError(f"training.init_from={path}: tokenizer.{key} is {want[key]!r} here but "
                                  f"{have.get(key)!r} in the checkpoint's tokenizer; the embedding rows would mean "
                                  f"other trigrams")
    return reader


def load_weights(model: torch.nn.Module, reader: CheckpointReader) -> int:
    """Copy the checkpoint's weights into this rank's part of ``model`` (before the engine is built)."""
    try:
        return load_into(model, reader, what="training.init_from")
    except ValueError as e:
        raise ConfigError(str(e)) from None
