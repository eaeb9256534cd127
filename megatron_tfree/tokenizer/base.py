"""What every tokenizer gives the rest of the system.

Both tokenizer kinds turn text into a sequence of *units* (words for T-Free, tokens for a classic
BPE) and every unit into a set of vocabulary ids. The ids of a sequence are stored CSR-style
(:class:`SparseIds`): ``indices[offsets[i]:offsets[i+1]]`` are the ids of unit ``i``. A classic
tokenizer is the special case of exactly one id per unit, so data, batching and the trainer handle
both kinds the same way; only the model's embedding, head and loss look at the kind.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .hashing import ID_DTYPE, OFFSET_DTYPE  # noqa: F401 (int32 vocabulary ids, int64 CSR offsets)


@dataclass
class SparseIds:
    """CSR ids of ``len(self)`` units: ``indices[offsets[i]:offsets[i+1]]`` belong to unit ``i``."""

    offsets: np.ndarray  # [n + 1] int64, offsets[0] == 0, non-decreasing
    indices: np.ndarray  # [offsets[-1]] int32

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.indices[self.offsets[i] : self.offsets[i + 1]]

    def rows(self) -> list[np.ndarray]:
        return [self.row(i) for i in range(len(self))]

    def slice(self, start: int, stop: int) -> "SparseIds":
        """Units ``start:stop`` as a new SparseIds (offsets rebased to 0)."""
        offs = self.offsets[start : stop + 1]
        return SparseIds(offs - offs[0], self.indices[offs[0] : offs[-1]])

    @staticmethod
    def from_rows(rows: Sequence[Sequence[int] | np.ndarray]) -> "SparseIds":
        lengths = np.fromiter((len(r) for r in rows), dtype=OFFSET_DTYPE, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=OFFSET_DTYPE)
        np.cumsum(lengths, out=offsets[1:])
        if len(rows) and offsets[-1]:
            indices = np.concatenate([np.asarray(r, dtype=ID_DTYPE) for r in rows])
        else:
            indices = np.zeros(0, dtype=ID_DTYPE)
        return SparseIds(offsets, indices)

    @staticmethod
    def concat(parts: Sequence["SparseIds"]) -> "SparseIds":
        if not parts:
            return SparseIds(np.zeros(1, dtype=OFFSET_DTYPE), np.zeros(0, dtype=ID_DTYPE))
        offsets = [np.zeros(1, dtype=OFFSET_DTYPE)]
        base = 0
        for p in parts:
            offsets.append(p.offsets[1:] + base)
            base += int(p.offsets[-1])
        return SparseIds(np.concatenate(offsets), np.concatenate([p.indices for p in parts]).astype(ID_DTYPE, copy=False))


@dataclass
class Encoding:
    """A text as units: their ids and (for inspection/decoding) their surface strings."""

    ids: SparseIds
    units: list[str]  # words (T-Free) or token strings (classic), len == len(ids)

    def __len__(self) -> int:
        return len(self.units)


class Tokenizer(abc.ABC):
    """Interface shared by :class:`TrigramTokenizer` and :class:`ClassicTokenizer`."""

    kind: str  # "tfree" or "classic"

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Size of the id space (rows of the embedding matrix, outputs of the head)."""

    @property
    @abc.abstractmethod
    def end_of_text(self) -> str:
        """The unit that ends a document (``<|endoftext|>``)."""

    @abc.abstractmethod
    def encode(self, text: str) -> Encoding:
        """Split ``text`` into units and give each its ids. No end-of-text is appended."""

    @abc.abstractmethod
    def encode_units(self, units: Sequence[str]) -> SparseIds:
        """Ids of already split units (words or token strings)."""

    @abc.abstractmethod
    def decode(self, units: Sequence[str]) -> str:
        """Units back to text (exact inverse of the split for T-Free)."""

    @abc.abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """What :meth:`save` writes; enough to rebuild an identical tokenizer."""

    def identity(self) -> str:
        """A string that differs between tokenizers that split or number text differently (caches of
        per-item unit counts are keyed on it): the settings of :meth:`config_dict`, except the cache size."""
        import json

        return json.dumps({k: v for k, v in self.config_dict().items() if k != "cache_size"}, sort_keys=True, default=str)

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None:
        """Write the tokenizer's config (and files) into ``directory`` (beside a checkpoint)."""

    def eot_ids(self) -> SparseIds:
        return self.encode_units([self.end_of_text])
