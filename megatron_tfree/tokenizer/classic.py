"""Classic subword tokenizer (byte-level BPE) over Hugging Face ``tokenizers``, fully offline.

Units are the BPE token strings (byte-level alphabet, e.g. ``"Ġthe"``) and every unit has exactly one
id, so the CSR ids of a text are ``offsets = 0..n`` and ``indices = ids``; data, batching and the
trainer treat both tokenizer kinds alike. ``<|endoftext|>`` is an added special token, so it is one
unit wherever it occurs in text.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .base import ID_DTYPE, OFFSET_DTYPE, Encoding, SparseIds, Tokenizer

CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_FILE = "tokenizer.json"


def _names_file(text: str) -> bool:
    """Whether ``text`` is the path of an existing file (a long text is not: the OS refuses it)."""
    if len(text) >= 4096 or "\n" in text:
        return False
    try:
        return Path(text).is_file()
    except OSError:  # e.g. a component longer than NAME_MAX
        return False


def _resolve_training_input(files_or_iterator: Any) -> tuple[list[str] | None, Iterable[str] | None]:
    """Split the ``train`` input into (files, texts).

    A str/Path naming a file or a directory (all ``*.txt`` below it), or a list/tuple of
    ``os.PathLike`` or of str that all name existing files, means files; any other iterable means
    texts (strings, e.g. a generator over documents).
    """
    if isinstance(files_or_iterator, (str, os.PathLike)):
        path = Path(files_or_iterator)
        if path.is_dir():
            files = sorted(str(p) for p in path.rglob("*.txt"))
            if not files:
                raise FileNotFoundError(f"no *.txt files under {path}")
            return files, None
        if path.is_file():
            return [str(path)], None
        raise FileNotFoundError(f"training input {path} is neither a file nor a directory")
    if isinstance(files_or_iterator, (list, tuple)):
        items = list(files_or_iterator)
        if not items:
            raise ValueError("no training input given")
        if any(isinstance(p, os.PathLike) for p in items):
            missing = [str(p) for p in items if not Path(p).is_file()]
            if missing:
                raise FileNotFoundError(f"training files not found: {missing[:5]}")
            return [str(p) for p in items], None
        if all(isinstance(p, str) and _names_file(p) for p in items):
            return list(items), None
        if not all(isinstance(t, str) for t in items):
            raise TypeError("training texts must be str")
        return None, items
    if isinstance(files_or_iterator, Iterable):
        return None, files_or_iterator
    raise TypeError(f"cannot train on {type(files_or_iterator).__name__}")


class ClassicTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` behind the common :class:`Tokenizer` interface."""

    kind = "classic"

    def __init__(self, tokenizer: Any, end_of_text: str = "<|endoftext|>"):
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(tokenizer, HFTokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if tokenizer.token_to_id(end_of_text) is None:
            raise ValueError(f"end-of-text token {end_of_text!r} is not in the tokenizer's vocabulary")
        self._tok = tokenizer
        self._eot = end_of_text
        self._v = tokenizer.get_vocab_size(with_added_tokens=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_file(cls, path: str | Path, end_of_text: str = "<|endoftext|>") -> "ClassicTokenizer":
        """Load a ``tokenizer.json`` written by Hugging Face ``tokenizers``."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls(HFTokenizer.from_file(str(path)), end_of_text=end_of_text)

    @classmethod
    def train(
        cls,
        files_or_iterator: Any,
        vocab_size: int = 32000,
        min_frequency: int = 2,
        end_of_text: str = "<|endoftext|>",
        special_tokens: Sequence[str] = (),
    ) -> "ClassicTokenizer":
        """Train a byte-level BPE (no normaliser, lossless) with ``end_of_text`` as a special token.

        ``files_or_iterator``: a file, a directory of ``*.txt``, a list of files, or an iterable of
        texts (see :func:`_resolve_training_input`).
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not isinstance(vocab_size, int) or vocab_size < 257 + 1 + len(special_tokens):
            raise ValueError(f"vocab_size must cover the 256 bytes and the special tokens, got {vocab_size!r}")
        files, texts = _resolve_training_input(files_or_iterator)
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = [end_of_text] + [s for s in special_tokens if s != end_of_text]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        if files is not None:
            tok.train(files, trainer)
        else:
            tok.train_from_iterator(iter(texts), trainer)  # type: ignore[arg-type]
        return cls(tok, end_of_text=end_of_text)

    # ------------------------------------------------------------------ interface
    @property
    def vocab_size(self) -> int:
        return self._v

    @property
    def end_of_text(self) -> str:
        return self._eot

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def encode_ids(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as an int32 array (the fast path: no unit strings)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=ID_DTYPE)

    @staticmethod
    def _one_per_unit(ids: np.ndarray) -> SparseIds:
        return SparseIds(np.arange(len(ids) + 1, dtype=OFFSET_DTYPE), ids.astype(ID_DTYPE, copy=False))

    def encode(self, text: str) -> Encoding:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        enc = self._tok.encode(text, add_special_tokens=False)
        return Encoding(self._one_per_unit(np.asarray(enc.ids, dtype=ID_DTYPE)), list(enc.tokens))

    def encode_units(self, units: Sequence[str]) -> SparseIds:
        if isinstance(units, str):
            raise TypeError("encode_units takes a list of token strings, not a str (use encode for text)")
        ids = []
        for u in units:
            i = self._tok.token_to_id(u)
            if i is None:
                raise KeyError(f"unknown token {u!r}")
            ids.append(i)
        return self._one_per_unit(np.asarray(ids, dtype=ID_DTYPE))

    def decode(self, units: Sequence[str]) -> str:
        """Token strings back to text (special tokens kept)."""
        ids = self.encode_units(list(units)).indices.tolist()
        return self.decode_ids(ids)

    def decode_ids(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer_file": TOKENIZER_FILE, "end_of_text": self._eot, "vocab_size": self._v}

    def identity(self) -> str:
        """The settings plus a hash of the whole ``tokenizer.json``: two BPEs of one size differ by their merges."""
        import hashlib

        return super().identity() + hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / TOKENIZER_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.config_dict(), indent=2) + "\n")

    def save_file(self, path: str | Path) -> None:
        """Write only the Hugging Face ``tokenizer.json`` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self._tok.save(str(tmp))
        shutil.move(str(tmp), str(path))

    @classmethod
    def load(cls, directory: str | Path) -> "ClassicTokenizer":
        """Rebuild the tokenizer that :meth:`save` wrote into ``directory``."""
        directory = Path(directory)
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_FILE} in {directory}")
        cfg = json.loads(path.read_text())
        if cfg.get("kind") != cls.kind:
            raise ValueError(f"{path} holds a {cfg.get('kind')!r} tokenizer, not {cls.kind!r}")
        tok = cls.from_file(directory / cfg.get("tokenizer_file", TOKENIZER_FILE), end_of_text=cfg["end_of_text"])
        if "vocab_size" in cfg and cfg["vocab_size"] != tok.vocab_size:
            raise ValueError(f"{path}: vocab_size {cfg['vocab_size']} does not match the tokenizer file ({tok.vocab_size})")
        return tok

    def __getstate__(self) -> dict[str, Any]:
        return {"json": self._tok.to_str(), "end_of_text": self._eot}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.__init__(HFTokenizer.from_str(state["json"]), end_of_text=state["end_of_text"])

    def __repr__(self) -> str:
        return f"ClassicTokenizer(vocab_size={self._v}, end_of_text={self._eot!r})"

