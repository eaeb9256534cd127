"""The T-Free tokenizer: text -> words (:mod:`.words`) -> sparse vocabulary ids (:mod:`.hashing`).

The id scheme (reference-exact md5 rows, the seeded ``fast`` family, partial lowercase, words hashed
whole, caching) is documented and implemented in :mod:`.hashing`; this class adds the
:class:`~.base.Tokenizer` interface, text encoding/decoding and the saved config
(``tokenizer_config.json``: the ids are a pure function of it).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Sequence

from .base import Encoding, SparseIds, Tokenizer
from .hashing import TrigramHasher, is_edge, is_hashed_whole, trigram_to_id, word_trigrams  # noqa: F401
from .words import text_to_words, words_to_text

CONFIG_FILE = "tokenizer_config.json"


class TrigramTokenizer(TrigramHasher, Tokenizer):
    """The T-Free tokenizer: :class:`~.hashing.TrigramHasher` behind the :class:`Tokenizer` interface."""

    kind = "tfree"

    def __init__(
        self,
        vocab_size: int = 8192,
        vocab_population: int = 10,
        vocab_population_partial_lowercase: int = 0,
        initialize: str = "hash",
        seed: int = 42,
        lowercase: bool = False,
        entire_words: bool = False,
        end_of_text: str = "<|endoftext|>",
        cache_size: int = 1_000_000,
    ):
        super().__init__(vocab_size, vocab_population, vocab_population_partial_lowercase, initialize, seed, lowercase,
                         entire_words, cache_size)
        if not isinstance(end_of_text, str) or "<|" not in end_of_text:
            raise ValueError(f"end_of_text must be a special word like '<|endoftext|>', got {end_of_text!r}")
        self._eot = end_of_text

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg: Any) -> "TrigramTokenizer":
        """Build from a :class:`megatron_tfree.config.TokenizerConfig` (``kind`` must be ``tfree``)."""
        if getattr(cfg, "kind", "tfree") != "tfree":
            raise ValueError(f"TrigramTokenizer needs tokenizer.kind='tfree', got {cfg.kind!r}")
        return cls(
            vocab_size=cfg.vocab_size,
            vocab_population=cfg.vocab_population,
            vocab_population_partial_lowercase=cfg.vocab_population_partial_lowercase,
            initialize=cfg.initialize,
            seed=cfg.seed,
            lowercase=cfg.lowercase,
            entire_words=cfg.entire_words,
            end_of_text=cfg.end_of_text,
            cache_size=cfg.cache_size,
        )

    def config_dict(self) -> dict[str, Any]:
        settings = self.settings()
        cache_size = settings.pop("cache_size")
        return {"kind": self.kind, **settings, "end_of_text": self._eot, "cache_size": cache_size}

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer_config.json`` (the ids are a pure function of it: nothing else to store)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "TrigramTokenizer":
        """Rebuild the tokenizer that :meth:`save` wrote into ``directory``."""
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
        cfg = json.loads(path.read_text())
        kind = cfg.pop("kind", None)
        if kind != cls.kind:
            raise ValueError(f"{path} holds a {kind!r} tokenizer, not {cls.kind!r}")
        unknown = sorted(set(cfg) - set(inspect.signature(cls.__init__).parameters))
        if unknown:
            raise ValueError(f"{path}: unknown tokenizer settings {unknown}")
        return cls(**cfg)

    def __getstate__(self) -> dict[str, Any]:  # pickling (DataLoader workers) skips the caches
        return self.config_dict()

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state.pop("kind", None)
        self.__init__(**state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config_dict().items() if k != "kind")
        return f"TrigramTokenizer({args})"

    @property
    def end_of_text(self) -> str:
        return self._eot

    # ------------------------------------------------------------------ public encoding
    def encode_units(self, units: Sequence[str]) -> SparseIds:
        """CSR ids of already split words (row i = word i's trigram rows back to back)."""
        return SparseIds(*self.encode_words(units))

    def encode(self, text: str) -> Encoding:
        """Split ``text`` into words (spec section 1) and give each its ids."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        words = text_to_words(text, lowercase=self.lowercase)
        return Encoding(self.encode_units(words), words)

    def decode(self, units: Sequence[str]) -> str:
        """Words back to text (exact inverse of the word split)."""
        return words_to_text(list(units))

    # convenience re-exports as methods
    word_trigrams = staticmethod(word_trigrams)
    is_edge = staticmethod(is_edge)
    trigram_to_id = staticmethod(trigram_to_id)
