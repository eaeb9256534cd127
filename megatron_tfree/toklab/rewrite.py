"""A checkpoint with a new vocabulary: the same transformer, new embedding and head rows.

    write_checkpoint(reader, "runs/bpe-4k-init", tokenizer, rows={EMBEDDING: emb, HEAD: head},
                     source={"toklab": "prune", ...})

Every verb that changes a model's vocabulary (``prune`` remap, ``swap``) ends here: the checkpoint of
``reader`` (any layout) is streamed tensor by tensor into a weights-only consolidated directory
(:mod:`megatron_tfree.checkpoint.consolidated`), with the vocabulary tensors (``embedding.weight``,
``output.head.linear.weight``) replaced by ``rows`` and the new tokenizer saved beside them; the
config's tokenizer section follows the tokenizer. Written atomically (a temp dir renamed into place);
``training.init_from=OUT`` starts a run from it, with its tokenizer.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from megatron_tfree.checkpoint import CheckpointReader, atomic_output_dir, param_specs
from megatron_tfree.checkpoint.consolidated import write_weights_only
from megatron_tfree.checkpoint.files import write_json
from megatron_tfree.checkpoint.names import VOCAB_ROWS
from megatron_tfree.config import Config


def config_for(cfg: Config, tokenizer: Any) -> Config:
    """``cfg`` with its tokenizer section describing ``tokenizer`` (kind and its own settings)."""
    new = copy.deepcopy(cfg)
    t = new.tokenizer
    t.kind = tokenizer.kind
    if tokenizer.kind == "classic":
        t.classic_vocab_size = tokenizer.vocab_size
        t.tokenizer_file = ""  # the checkpoint's tokenizer/ is the tokenizer
    else:
        for key, value in tokenizer.config_dict().items():
            if hasattr(t, key) and key != "kind":
                setattr(t, key, value)
    return new


def write_checkpoint(reader: CheckpointReader, out: str | os.PathLike, tokenizer: Any,
                     rows: Mapping[str, torch.Tensor], source: dict[str, Any], cfg: Optional[Config] = None,
                     extra_json: Optional[Mapping[str, Any]] = None, overwrite: bool = False,
                     progress: bool = False) -> Path:
    """Write ``reader``'s weights with the vocabulary tensors ``rows`` (full ``[V_new, h]``) and
    ``tokenizer`` to ``out`` (see the module docstring); ``cfg``: the config to save (default: the
    reader's with the tokenizer's settings); ``extra_json``: more files (name -> JSON data, e.g. the
    T-Free word counts). Shapes are checked; returns ``out``."""
    cfg = config_for(cfg or reader.cfg, tokenizer)
    specs = param_specs(cfg.model, cfg.tokenizer.kind, tokenizer.vocab_size)
    missing = [n for n in VOCAB_ROWS if n not in rows]
    if missing:
        raise ValueError(f"new vocabulary rows missing for {', '.join(missing)}")
    for name in VOCAB_ROWS:
        if tuple(rows[name].shape) != specs[name].shape:
            raise ValueError(f"{name}: new rows have shape {tuple(rows[name].shape)}, the model with "
                             f"{tokenizer.vocab_size} ids needs {specs[name].shape}")
    kept = set(specs) - set(VOCAB_ROWS)
    have = set(reader.specs) - set(VOCAB_ROWS)
    if kept != have:
        raise ValueError(f"{reader.tag_dir}: the model's other tensors differ from the new model's "
                         f"({sorted(kept ^ have)[:3]})")

    def tensors():
        blocks = reader.tensors(kept)
        for name in specs:  # state_dict order: embedding, blocks..., output
            if name in rows:
                yield name, rows[name].float()
            else:
                got, tensor = next(blocks)
                if got != name:
                    raise ValueError(f"{reader.tag_dir}: expected tensor {name!r}, read {got!r}")
                yield name, tensor

    with atomic_output_dir(out, overwrite=overwrite, flag="--force") as tmp:
        write_weights_only(tmp, cfg, tokenizer, tensors(), specs,
                           {"from": str(reader.tag_dir), **source}, progress=progress)
        for name, data in (extra_json or {}).items():
            write_json(tmp / name, data)
    return Path(out)


def vocab_rows(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """The checkpoint's full embedding and head (fp32)."""
    return {name: tensor.float().clone() for name, tensor in reader.tensors(set(VOCAB_ROWS))}
