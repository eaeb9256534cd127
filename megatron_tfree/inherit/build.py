"""From a big checkpoint and a small config to the small model's initial checkpoint.

    out = inherit("runs/big", small_cfg, "runs/small-init", width="l1", layers="even")

The big checkpoint (any layout) is loaded whole at tp=1 (:meth:`CheckpointReader.load_model`); the
selection is made (:func:`.importance.select`; Taylor importance and layer importance use
``calibration`` micro-batches of the small config's training data, the first ones of its order), the
weights are cut (:func:`.shape.slice_weights`) and written as a weights-only consolidated checkpoint
with the big model's tokenizer (and its T-Free word counts), atomically; its source record holds the
selection and what was measured. ``training.init_from=OUT`` trains it.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any

from megatron_tfree.checkpoint import CheckpointReader, atomic_output_dir, param_specs
from megatron_tfree.checkpoint.consolidated import write_weights_only
from megatron_tfree.checkpoint.files import WORD_COUNTS_FILE
from megatron_tfree.config import Config

from .importance import select
from .shape import check_shapes, full_selection, slice_weights


def calibration_batches(cfg: Config, tokenizer: Any, n: int) -> list:
    """The first ``n`` training micro-batches of ``cfg`` (its data, order and micro batch size)."""
    from megatron_tfree.data.dataset import build_dataloader

    loader = build_dataloader(cfg, tokenizer, split="train", progress=False)
    return list(itertools.islice(iter(loader), n))


def inherit(src: str | os.PathLike, cfg: Config, out: str | os.PathLike, width: str = "l1", layers: str = "even",
            calibration: int = 4, overwrite: bool = False, progress: bool = False) -> tuple[Path, dict]:
    """Write the inherited checkpoint of ``cfg``'s model from ``src`` to ``out``; returns ``(out, record)``
    (the selection and the measurements, also stored in the checkpoint's marker)."""
    reader = CheckpointReader(src)
    check_shapes(reader.cfg, cfg)
    tokenizer = reader.tokenizer
    if cfg.tokenizer.kind == "tfree":  # the embedding rows are the source tokenizer's ids
        for key, value in tokenizer.config_dict().items():
            if hasattr(cfg.tokenizer, key) and key != "kind":
                setattr(cfg.tokenizer, key, value)
    model = reader.load_model()
    needs_data = width == "taylor" or layers == "importance"
    batches = calibration_batches(cfg, tokenizer, calibration) if needs_data else None
    if _same_shape(reader.cfg, cfg):
        sel, measured = full_selection(reader.cfg.model), {}
    else:
        sel, measured = select(model, reader.cfg.model, cfg.model, width, layers, batches)
    weights = {n: p.detach() for n, p in model.named_parameters()}
    specs = param_specs(cfg.model, cfg.tokenizer.kind, tokenizer.vocab_size)
    record = {"inherit": {"from": str(reader.tag_dir), "width": width, "layers": layers,
                          "calibration_batches": len(batches or []), **sel.to_dict(), **measured}}
    with atomic_output_dir(out, overwrite=overwrite, flag="--force") as tmp:
        write_weights_only(tmp, cfg, tokenizer, slice_weights(weights, reader.cfg.model, sel), specs, record,
                           progress=progress)
        if (reader.tag_dir / WORD_COUNTS_FILE).is_file():
            shutil.copyfile(reader.tag_dir / WORD_COUNTS_FILE, tmp / WORD_COUNTS_FILE)
    return Path(out), record


def _same_shape(big: Config, small: Config) -> bool:
    from .shape import Dims

    return Dims.of(big.model) == Dims.of(small.model)
