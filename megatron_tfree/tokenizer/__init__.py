"""Tokenizers: text -> units -> CSR vocabulary ids, for T-Free (trigram hashing) and classic BPE.

``build_tokenizer(cfg)`` makes the tokenizer a :class:`~megatron_tfree.config.TokenizerConfig`
describes; ``load_tokenizer(directory)`` rebuilds one saved beside a checkpoint (``tokenizer.save``).
The word splitter (``text_to_words``/``words_to_text``) lives in :mod:`.words` and is imported on
first use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .base import Encoding, SparseIds, Tokenizer
from .classic import ClassicTokenizer
from .trigram import CONFIG_FILE, TrigramTokenizer

__all__ = [
    "text_to_words",
    "words_to_text",
    "TrigramTokenizer",
    "ClassicTokenizer",
    "Tokenizer",
    "SparseIds",
    "Encoding",
    "build_tokenizer",
    "load_tokenizer",
]

_WORDS_API = ("text_to_words", "words_to_text", "is_special")


def __getattr__(name: str) -> Any:
    """Lazy access to the word splitter, so this package imports even before words.py exists."""
    if name in _WORDS_API:
        from . import words

        return getattr(words, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_tokenizer(cfg: Any, train_files: Sequence[str | Path] | str | Path | None = None) -> Tokenizer:
    """The tokenizer a ``TokenizerConfig`` describes.

    ``tfree``: a :class:`TrigramTokenizer` from the config. ``classic``: the Hugging Face file
    ``cfg.tokenizer_file``; when it does not exist, a byte-level BPE of ``cfg.classic_vocab_size`` is
    trained on ``train_files`` and saved there.
    """
    kind = getattr(cfg, "kind", None)
    if kind == "tfree":
        return TrigramTokenizer.from_config(cfg)
    if kind != "classic":
        raise ValueError(f"unknown tokenizer kind {kind!r} (expected 'tfree' or 'classic')")
    if not cfg.tokenizer_file:
        raise ValueError("tokenizer.kind='classic' needs tokenizer.tokenizer_file (a tokenizer.json path)")
    path = Path(cfg.tokenizer_file)
    if path.is_file():
        return ClassicTokenizer.from_file(path, end_of_text=cfg.end_of_text)
    if train_files is None:
        raise FileNotFoundError(f"tokenizer file {path} does not exist and no train_files were given to train one")
    tok = ClassicTokenizer.train(train_files, vocab_size=cfg.classic_vocab_size, end_of_text=cfg.end_of_text)
    tok.save_file(path)
    return tok


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild the tokenizer saved in ``directory`` (dispatch on the ``kind`` in its config file)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
    kind = json.loads(path.read_text()).get("kind")
    if kind == TrigramTokenizer.kind:
        return TrigramTokenizer.load(directory)
    if kind == ClassicTokenizer.kind:
        return ClassicTokenizer.load(directory)
    raise ValueError(f"{path}: unknown tokenizer kind {kind!r}")
