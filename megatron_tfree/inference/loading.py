"""What inference reads from a checkpoint beside the weights: word counts and the decode dictionary.

The weights, config and tokenizer of any checkpoint (a run dir with ``latest``, a tag dir of any
(TP, PP, DP, ZeRO) layout, a consolidated or imported directory) come through
:class:`megatron_tfree.checkpoint.CheckpointReader`; :func:`load_model` and :func:`load_model_state` are
thin conveniences over it. The decode dictionary is the precomputed one stored beside the weights
(``decode_dictionary.safetensors`` + ``.json``, :func:`precompute_dictionary`) or is built from the
checkpoint's ``word_counts.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import CheckpointReader, resolve_tag_dir
from ..checkpoint.files import WORD_COUNTS_FILE, dictionary_path, has_dictionary
from ..tokenizer import Tokenizer
from ..tokenizer.dictionary import DecodeDictionary, read_word_counts

logger = logging.getLogger(__name__)

resolve_checkpoint = resolve_tag_dir  # a run dir (its latest tag) or a checkpoint directory -> the tag dir


def load_model_state(tag_dir: str | Path) -> dict[str, torch.Tensor]:
    """The model's full state dict (TP shards merged, pipeline stages joined, ZeRO-3 partitions gathered)."""
    return CheckpointReader(tag_dir).state_dict()


def load_model(tag_dir: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A whole :class:`GPTModel` with the checkpoint's weights, in eval mode on ``device``."""
    return CheckpointReader(tag_dir).load_model(device)


def load_word_counts(tag_dir: Path, extra: Optional[str | Path] = None, allow_pickle: bool = False) -> dict[str, int]:
    """Training word counts of the checkpoint (empty when absent) plus those of ``extra`` (summed)."""
    counts: dict[str, int] = {}
    path = tag_dir / WORD_COUNTS_FILE
    if path.is_file():
        counts = read_word_counts(path)
    if extra is not None:
        for w, c in read_word_counts(extra, allow_pickle=allow_pickle).items():
            counts[w] = counts.get(w, 0) + c
    return counts


def checkpoint_dictionary(tag_dir: Path, tokenizer: Tokenizer, word_counts: Optional[str | Path] = None,
                          allow_pickle: bool = False) -> Optional[DecodeDictionary]:
    """The decode dictionary of a checkpoint: the stored one (no recomputation) when present and no
    extra word counts are given, else built from the word counts. None for classic tokenizers."""
    if tokenizer.kind != "tfree":
        return None
    if word_counts is None and has_dictionary(tag_dir):
        logger.info("loading precomputed decode dictionary %s", dictionary_path(tag_dir))
        return DecodeDictionary.load(dictionary_path(tag_dir), tokenizer=tokenizer)
    counts = load_word_counts(tag_dir, word_counts, allow_pickle)
    logger.info("building the decode dictionary from %d words", len(counts))
    return DecodeDictionary.build(tokenizer, counts)


def precompute_dictionary(checkpoint: str | Path, word_counts: Optional[str | Path] = None,
                          reduce_to: Optional[int] = None, allow_pickle: bool = False) -> Path:
    """Build the decode dictionary of a checkpoint once and store it beside the weights; returns the
    ``.safetensors`` path. ``reduce_to`` keeps the special words plus the top-N words."""
    from ..tokenizer import load_tokenizer
    from ..checkpoint.files import TOKENIZER_DIR

    tag_dir = resolve_tag_dir(checkpoint)
    tokenizer = load_tokenizer(tag_dir / TOKENIZER_DIR)
    if tokenizer.kind != "tfree":
        raise ValueError(f"{tag_dir}: a {tokenizer.kind!r} tokenizer has no decode dictionary")
    counts = load_word_counts(tag_dir, word_counts, allow_pickle)
    d = DecodeDictionary.build(tokenizer, counts, progress=True)
    if reduce_to is not None:
        d = d.reduce_to(reduce_to)
    path, _ = d.save(dictionary_path(tag_dir))
    logger.info("stored %d dictionary words in %s", len(d), path)
    return path


__all__ = ["resolve_checkpoint", "load_model_state", "load_model", "load_word_counts", "dictionary_path",
           "checkpoint_dictionary", "precompute_dictionary"]
