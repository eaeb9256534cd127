"""Where a config's text comes from, as plain strings: for tokenizer training and statistics.

The datasets read MemoryMaps directly; these helpers serve the places that want the raw documents
(fitting a classic BPE on the training split, measuring tokenizer statistics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

from ..tokenizer import Tokenizer, build_tokenizer
from .memory_map import MemoryMap


def split_prefixes(cfg: Any, split: str = "train", progress: bool = True) -> list[str]:
    """MemoryMap prefixes of ``split`` (``train``/``valid``); the default corpus when none are configured."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    d = cfg.data
    if d.prefix_paths:
        return list(d.prefix_paths if split == "train" else d.valid_prefix_paths)
    from .corpus import default_corpus

    corpus = default_corpus(d.cache_dir or None, progress=progress, aligned_max_bytes=d.aligned_max_bytes)
    return [corpus.train if split == "train" else corpus.valid]


def iter_documents(prefixes: list[str], max_bytes: Optional[int] = None) -> Iterator[str]:
    """UTF-8 documents of the MemoryMaps at ``prefixes``, in order, stopping after ``max_bytes``."""
    seen = 0
    for prefix in prefixes:
        mm = MemoryMap(prefix)
        for i in range(len(mm)):
            raw = mm.document_bytes(i)
            yield raw.decode("utf-8", errors="replace")
            seen += len(raw)
            if max_bytes is not None and seen >= max_bytes:
                return


def tokenizer_for_config(cfg: Any, progress: bool = True) -> Tokenizer:
    """The tokenizer of ``cfg.tokenizer``; a classic BPE missing on disk is trained on the train split.

    For ``kind: classic`` with an empty ``tokenizer.tokenizer_file`` the BPE is kept at
    ``{training.save_dir}/classic_tokenizer.json`` (trained once, then reused).
    """
    t = cfg.tokenizer
    if t.kind == "tfree":
        return build_tokenizer(t)
    if not t.tokenizer_file:
        from dataclasses import replace

        t = replace(t, tokenizer_file=str(Path(cfg.training.save_dir) / "classic_tokenizer.json"))
    if Path(t.tokenizer_file).is_file():
        return build_tokenizer(t)
    Path(t.tokenizer_file).parent.mkdir(parents=True, exist_ok=True)
    if not cfg.data.finetuning:
        return build_tokenizer(t, train_files=iter_documents(split_prefixes(cfg, "train", progress)))
    raise FileNotFoundError(f"tokenizer.tokenizer_file {t.tokenizer_file} does not exist; finetuning "
                            "needs the tokenizer the model was pretrained with")
