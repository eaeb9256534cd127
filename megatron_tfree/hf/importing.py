"""Bring a model trained elsewhere into this project (``tools/import_checkpoint.py``).

    import_checkpoint("hf/llama-tiny", "runs/llama-tiny")           # a Hugging Face Llama folder
    import_checkpoint("ref/7b", "runs/tfree-7b", layout=(2, 2, 1))   # a T-Free reference checkpoint

The source kind is detected (:func:`detect`): a folder with ``config.json`` of a Llama model
(:mod:`.import_llama`), or a T-Free reference checkpoint (a save dir with ``latest``, or one iteration
dir holding ``transformer/`` and ``tokenizer/``; :mod:`.import_reference`). The output is a weights-only
consolidated checkpoint (:mod:`megatron_tfree.checkpoint.consolidated`: the weights streamed in full
fp32 under this model's names, ``config.yaml``, ``tokenizer/``) that ``InferencePipe.from_checkpoint``,
``python -m megatron_tfree.generate --checkpoint OUT`` and ``training.init_from=OUT`` read; with
``layout`` it is then written as a DeepSpeed checkpoint of that (TP, PP, DP) layout (a fresh optimizer
at step 0). ``overrides`` (``section.key=value``) adjust the produced config (e.g. the reference's loss
settings, which its checkpoint does not record). Written atomically; an existing OUT only with ``force``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence

import torch

from ..checkpoint import atomic_output_dir, param_specs
from ..checkpoint.consolidated import write_weights_only
from ..checkpoint.files import WORD_COUNTS_FILE, write_json
from ..config import Config, ConfigError, apply_overrides


class ImportSource(Protocol):
    """A checkpoint format this project can read weights from."""

    kind: str  # what detect() calls it

    def config_dict(self) -> dict[str, Any]:
        """This project's config (as a dict) for the model."""

    def tokenizer(self) -> Any:
        """The tokenizer (this project's class) of the model."""

    def tensors(self, cfg: Config, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Our full tensors ``names`` in order, converted from the source."""

    def describe(self) -> dict[str, Any]:
        """What is recorded as the import's source."""


def detect(src: str | os.PathLike) -> ImportSource:
    """The source at ``src`` (errors say what was expected)."""
    from .import_llama import LlamaSource
    from .import_reference import ReferenceSource

    path = Path(src)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist (expected a Hugging Face Llama folder or a T-Free reference "
                                f"checkpoint)")
    if (path / "config.json").is_file():
        return LlamaSource(path)
    if ReferenceSource.matches(path):
        return ReferenceSource(path)
    raise ValueError(f"{path}: neither a Hugging Face folder (no config.json) nor a T-Free reference checkpoint (no "
                     f"'latest' naming an iteration dir, no transformer/ and tokenizer/ dirs)")


def import_checkpoint(src: str | os.PathLike, out: str | os.PathLike, layout: Optional[tuple[int, int, int]] = None,
                      zero_stage: Optional[int] = None, force: bool = False, overrides: Sequence[str] = (),
                      word_counts: Optional[str | os.PathLike] = None, progress: bool = False) -> Path:
    """Import ``src`` into ``out`` (see the module docstring); returns the checkpoint directory to load:
    ``out`` itself, or with ``layout`` the tag dir of the DeepSpeed checkpoint in ``out``."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    source = detect(src)
    data = apply_overrides(source.config_dict(), list(overrides))
    data.setdefault("training", {})["save_dir"] = str(out)
    try:
        cfg = Config.from_dict(data, source=f"the config imported from {src}")
    except ConfigError as e:
        raise ValueError(str(e)) from None
    tokenizer = source.tokenizer()
    specs = param_specs(cfg.model, cfg.tokenizer.kind, tokenizer.vocab_size)
    if layout is None:
        with atomic_output_dir(out, overwrite=force, flag="--force") as tmp:
            _write(tmp, cfg, tokenizer, source, specs, word_counts, progress)
        return out
    from ..training.consolidate import to_deepspeed

    staging = out.with_name(f".{out.name}.import{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        _write(staging, cfg, tokenizer, source, specs, word_counts, progress)
        tp, pp, dp = layout
        return to_deepspeed(staging, out, tensor=tp, pipe=pp, data=dp, zero_stage=zero_stage, overwrite=force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(directory: Path, cfg: Config, tokenizer: Any, source: ImportSource, specs: dict, word_counts, progress: bool) -> None:
    tensors = source.tensors(cfg, list(specs))
    write_weights_only(directory, cfg, tokenizer, tensors, specs, source.describe(), progress=progress)
    if word_counts is not None:
        from ..tokenizer.word_counts import read_word_counts

        write_json(directory / WORD_COUNTS_FILE, read_word_counts(word_counts))
