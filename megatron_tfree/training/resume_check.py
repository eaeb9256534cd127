"""Resuming compares the saved config with the new one, so a run never continues as something else.

Keys that define the model, its tokenizer and the data order must match; one :class:`ConfigError` lists
every difference with both values. Keys that may change on resume (iterations, the learning-rate
schedule, intervals, logging, sampling, the save dir, batch sizes: the global sample order is fixed by
``data.seed``) are allowed and reported. The layout (``parallel.*``, the data-parallel size, the
precision) may change only through a layout-free (consolidated) checkpoint: a DeepSpeed checkpoint is
split for its own layout, so the error points at ``tools/convert_checkpoint.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_tfree.checkpoint.consolidated import is_consolidated
from megatron_tfree.checkpoint.files import CONFIG_FILE, TrainerState
from megatron_tfree.config import Config, ConfigError, load_config
from megatron_tfree.training.init_from import weight_structure

MODEL_KEYS = ("norm_eps", "rotary_embedding_base")  # beyond the weights' structure
TFREE_TOKENIZER_KEYS = ("kind", "vocab_size", "vocab_population", "vocab_population_partial_lowercase", "initialize",
                        "seed", "lowercase", "entire_words", "end_of_text")
DATA_KEYS = ("prefix_paths", "valid_prefix_paths", "finetuning", "seq_len", "aligned_max_bytes", "seed", "sample_index")
LAYOUT_KEYS = ("parallel.tensor", "parallel.pipe", "parallel.zero_stage", "training.precision")


def _fixed(cfg: Config) -> dict[str, Any]:
    """The values that must not change on resume."""
    out = weight_structure(cfg)  # ffn_hidden_size: mlp_factor or ffn_hidden_size, the size counts
    out.update({f"model.{k}": getattr(cfg.model, k) for k in MODEL_KEYS})
    keys = TFREE_TOKENIZER_KEYS if cfg.tokenizer.kind == "tfree" else ("kind", "end_of_text")
    out.update({f"tokenizer.{k}": getattr(cfg.tokenizer, k) for k in keys})
    out.update({f"data.{k}": getattr(cfg.data, k) for k in DATA_KEYS})
    out["training.seed"] = cfg.training.seed
    return out


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{k}": v for section, values in cfg.to_dict().items() for k, v in values.items()}


def check_resume(cfg: Config, tag_dir: Path, world_size: int) -> list[str]:
    """Raise :class:`ConfigError` listing every key that must not differ between the checkpoint's config
    and ``cfg``; return ``"key: old -> new"`` for the allowed changes (to be logged)."""
    saved = load_config(tag_dir / CONFIG_FILE)
    mine, theirs = _fixed(cfg), _fixed(saved)
    wrong = [f"{k}: {theirs[k]!r} in the checkpoint, {mine[k]!r} now" for k in mine if mine[k] != theirs[k]]
    if wrong:
        raise ConfigError(f"cannot resume {tag_dir} with this config; these keys define the model, tokenizer or data "
                          f"order and must not change:\n  " + "\n  ".join(wrong) +
                          "\n(start a new run with training.init_from to reuse the weights under another config)")
    new, old = _flat(cfg), _flat(saved)
    if not is_consolidated(tag_dir):
        state_world = TrainerState.read(tag_dir).world_size
        layout = [f"{k}: {old[k]!r} in the checkpoint, {new[k]!r} now" for k in LAYOUT_KEYS if new[k] != old[k]]
        # ZeRO, and DeepSpeed's bf16 optimizer (used with a pipeline), split the optimizer state over the
        # data-parallel ranks
        partitioned = cfg.parallel.zero_stage > 0 or (cfg.parallel.pipe > 1 and cfg.training.precision == "bf16")
        if partitioned and world_size != state_world:
            layout.append(f"world size: {state_world} in the checkpoint, {world_size} now (the optimizer state is "
                          f"partitioned over the data-parallel ranks)")
        if layout:
            raise ConfigError(f"cannot resume the DeepSpeed checkpoint {tag_dir} at another layout:\n  " +
                              "\n  ".join(layout) + f"\nconvert it first: python tools/convert_checkpoint.py "
                              f"{tag_dir} OUT, then training.load_dir=OUT")
    fixed = set(mine) | {"model.mlp_factor", "model.num_kv_heads", "model.ffn_hidden_size", "training.save_dir",
                         "training.load_dir", "training.init_from"}
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k not in fixed and new[k] != old.get(k)]
