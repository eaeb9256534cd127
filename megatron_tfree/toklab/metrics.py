"""Tokenizer metrics on a corpus (definitions as in the tokenizer-lab issue and Dagan et al. 2024).

For a corpus of ``W`` whitespace-separated words, ``B`` UTF-8 bytes and ``C`` characters encoded into
``T`` units (BPE tokens, or T-Free words including the marker words):

* fertility = T / W; bytes per token = B / T; characters per token = C / T;
* NSL (normalised sequence length) = T / T_base for a base tokenizer on the same text;
* Renyi efficiency of order a = ``log2(sum_i p_i^a) / ((1 - a) log2 V)`` and Shannon efficiency =
  ``-sum_i p_i log2 p_i / log2 V`` over the unigram distribution p of the ids produced, V = vocabulary
  size (T-Free: the ``v`` trigram ids, counted with multiplicity: how evenly the hashed ids are used);
* near-duplicate share: vocabulary entries that are a variant of another entry, differing only by case
  or by a leading space (of each group of such variants all but one), over V (T-Free: 0, there are no
  vocabulary entries to duplicate);
* unused share: ids never produced on the corpus, over V.

T-Free also: ids per word (distinct trigram ids of a word occurrence, averaged) and id-set collisions
among the corpus's distinct words: pairs with identical id sets, and pairs whose Jaccard overlap is at
least a threshold (computed on the most frequent words, :func:`tfree_collisions`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np


def renyi_efficiency(counts: np.ndarray, vocab_size: int, order: float = 2.5) -> float:
    """``log2(sum p^a) / ((1 - a) log2 V)`` of the id counts (order 1: Shannon)."""
    if order == 1.0:
        return shannon_efficiency(counts, vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(np.log2(np.sum(p**order)) / ((1.0 - order) * math.log2(vocab_size)))


def shannon_efficiency(counts: np.ndarray, vocab_size: int) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log2(p)) / math.log2(vocab_size))


def unused_share(counts: np.ndarray, vocab_size: int) -> float:
    return float(np.count_nonzero(counts[:vocab_size] == 0) / vocab_size)


def near_duplicate_share(tokens: Iterable[bytes | str], vocab_size: int) -> float:
    """Share of the vocabulary that duplicates another entry up to case and a leading space: of each group
    of such variants (``the``, `` the``, ``The``, `` The``) all but one (``tokens``: the bytes, or text, of
    every non-special vocabulary entry; bytes that are not UTF-8 on their own are compared as bytes)."""
    def key(token: bytes | str) -> bytes | str:
        if isinstance(token, bytes):
            try:
                token = token.decode("utf-8")
            except UnicodeDecodeError:
                return token.lstrip(b" ")
        return token.lstrip(" ").lower()

    groups = Counter(key(t) for t in tokens)
    groups.pop("", None)  # spaces only: nothing to be a variant of
    groups.pop(b"", None)
    return sum(n - 1 for n in groups.values()) / vocab_size


@dataclass
class Tally:
    """What one tokenizer produced on one corpus."""

    words: int = 0  # whitespace-separated words
    bytes: int = 0
    chars: int = 0
    units: int = 0  # tokens or T-Free words
    id_counts: Optional[np.ndarray] = None  # [V] ids produced (T-Free: with multiplicity)
    word_ids: int = 0  # T-Free: sum over word occurrences of their distinct ids
    word_freq: Counter = field(default_factory=Counter)  # T-Free: distinct words

    def add_text(self, text: str) -> None:
        self.words += len(text.split())
        self.bytes += len(text.encode("utf-8"))
        self.chars += len(text)


def tfree_collisions(tokenizer, words: Counter, top: int = 2000, threshold: float = 0.9) -> dict[str, float]:
    """Among the ``top`` most frequent distinct words (special words excluded): the share of words whose id
    set equals another's, and of word pairs with Jaccard overlap >= ``threshold``."""
    import torch

    chosen = [w for w, _ in words.most_common() if "<|" not in w][:top]
    if len(chosen) < 2:
        return {"identical_id_sets": 0.0, "overlapping_pairs": 0.0, "words_checked": len(chosen)}
    sets = [tuple(tokenizer.word_ids(w)) for w in chosen]
    same = Counter(sets)
    identical = sum(n for n in same.values() if n > 1) / len(chosen)
    rows = torch.tensor([i for i, s in enumerate(sets) for _ in s])
    cols = torch.tensor([j for s in sets for j in s])
    a = torch.zeros(len(chosen), tokenizer.vocab_size)
    a[rows, cols] = 1.0
    inter = a @ a.t()
    size = a.sum(1)
    jaccard = inter / (size[:, None] + size[None, :] - inter)
    upper = torch.triu(jaccard >= threshold, diagonal=1)
    pairs = len(chosen) * (len(chosen) - 1) / 2
    return {"identical_id_sets": float(identical), "overlapping_pairs": float(upper.sum()) / pairs,
            "words_checked": len(chosen)}


def summary(t: Tally, vocab_size: int, base_units: Optional[int] = None, renyi_order: float = 2.5) -> dict[str, float]:
    """The metrics of a tally (see the module docstring; ``base_units``: the base tokenizer's count)."""
    counts = t.id_counts if t.id_counts is not None else np.zeros(vocab_size)
    out = {"units": t.units, "words": t.words, "bytes": t.bytes, "chars": t.chars,
           "fertility": t.units / max(t.words, 1), "bytes_per_token": t.bytes / max(t.units, 1),
           "chars_per_token": t.chars / max(t.units, 1),
           "nsl": t.units / base_units if base_units else float("nan"),
           "renyi_efficiency": renyi_efficiency(counts, vocab_size, renyi_order) if counts.sum() else float("nan"),
           "shannon_efficiency": shannon_efficiency(counts, vocab_size) if counts.sum() else float("nan"),
           "unused_share": unused_share(counts, vocab_size)}
    return out
