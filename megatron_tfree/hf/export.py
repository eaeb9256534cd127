"""Export any checkpoint of this project as a Hugging Face model folder (``tools/convert2hf.py``).

    export("runs/tiny", "hf/tiny")                               # run dir, tag dir, consolidated dir
    export("runs/7b", "hf/7b", dtype="bf16", max_shard_size="5GB")

The weights stream from :class:`~megatron_tfree.checkpoint.CheckpointReader` (any TP/PP/DP/ZeRO
layout, one pipeline layer at a time) through :mod:`.llama_names` into safetensors written one tensor
at a time (:mod:`megatron_tfree.checkpoint.safetensors_stream`; sharded with
``model.safetensors.index.json`` above ``max_shard_size``), so memory stays about one layer. What
differs by tokenizer kind is one :class:`ExportTarget`: a standard ``LlamaForCausalLM`` folder for
classic models (:mod:`.classic`), a remote-code T-Free folder (:mod:`.tfree`). Every export carries a
README model card (:mod:`.model_card`) and the resolved training config. The folder is written to a
temporary sibling and renamed when complete (never half an export); an existing folder is replaced
only with ``force``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Protocol

import torch

from ..checkpoint import CheckpointReader, atomic_output_dir
from ..checkpoint.safetensors_stream import Entry, SafetensorsWriter, parse_size, plan_shards, shard_names, write_index
from .llama_names import to_hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINING_CONFIG_FILE = "training_config.yaml"


class ExportTarget(Protocol):
    """What one tokenizer kind adds to the shared Llama weights."""

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors stored beside the model's weights (T-Free: the dictionary's rows and patterns)."""

    def write_files(self, directory: Path, dtype: str) -> None:
        """config.json, generation_config.json, the tokenizer files and any code."""

    def card(self) -> dict[str, str]:
        """Kind-specific model-card text: ``architecture``, ``tokenizer``, ``usage``, ``notes``."""


def _target(reader: CheckpointReader, **options) -> ExportTarget:
    from .classic import ClassicTarget
    from .tfree import TFreeTarget

    targets = {"classic": ClassicTarget, "tfree": TFreeTarget}
    return targets[reader.kind](reader, **options)


def _entries(reader: CheckpointReader, dtype: torch.dtype, extra: dict[str, torch.Tensor]) -> list[Entry]:
    """The folder's tensors in writing order: the model's (Llama names), then ``extra``."""
    cfg = reader.cfg.model
    entries = []
    for spec in reader.specs.values():
        meta = torch.empty(spec.shape, device="meta")
        entries += [Entry(name, dtype, tuple(t.shape)) for name, t in to_hf(spec.name, meta, cfg)]
    entries += [Entry(name, t.dtype, tuple(t.shape)) for name, t in extra.items()]
    return entries


def _tensors(reader: CheckpointReader, dtype: torch.dtype, extra: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    cfg = reader.cfg.model
    for name, full in reader.tensors():
        for hf_name, t in to_hf(name, full, cfg):
            yield hf_name, t.to(dtype)
    yield from extra.items()


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "fp32", max_shard_size: str | int = "5GB",
           force: bool = False, progress: bool = False, reduce_to: Optional[int] = None,
           word_counts: Optional[str | os.PathLike] = None, logit_scale: float = 20.0) -> Path:
    """Write the Hugging Face folder of ``checkpoint`` to ``out``; returns ``out``. T-Free options:
    ``reduce_to`` (keep the special words plus the N most frequent dictionary words), ``word_counts``
    (extra words for the dictionary), ``logit_scale`` (see ``configuration_tfree.TFreeConfig``)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    limit = parse_size(max_shard_size)
    if Path(out).exists() and not force:  # before any work (atomic_output_dir checks again)
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    reader = CheckpointReader(checkpoint)
    target = _target(reader, reduce_to=reduce_to, word_counts=word_counts, logit_scale=logit_scale)
    extra = target.extra_tensors()
    entries = _entries(reader, DTYPES[dtype], extra)
    shards = plan_shards(entries, limit)
    names = shard_names(len(shards))
    with atomic_output_dir(out, overwrite=force, flag="--force") as tmp:
        stream = _tensors(reader, DTYPES[dtype], extra)
        if progress:
            from tqdm import tqdm

            stream = iter(tqdm(stream, total=len(entries), desc=f"export {reader.tag_dir.name}", unit="tensor",
                               dynamic_ncols=True))
        for group, file in zip(shards, names):
            with SafetensorsWriter(tmp / file, group, metadata={"format": "pt"}) as writer:
                for entry in group:
                    name, tensor = next(stream)
                    writer.write(name, tensor)
        write_index(tmp, shards, names)
        target.write_files(tmp, dtype)
        reader.cfg.save(tmp / TRAINING_CONFIG_FILE)
        from .model_card import write_model_card

        write_model_card(tmp, reader, target, dtype, sum(e.nbytes for e in entries), len(names), str(out))
    return Path(out)
