"""The T-Free decode dictionary: words -> sparse patterns -> next-word scores (spec section 4).

A :class:`DecodeDictionary` holds, for every word ``w``, its *distinct* vocabulary ids split into
``Edge`` (ids of trigrams that begin or end with a space; an id in both sets counts as edge, as in the
reference) and ``N`` (the others), and ``c`` = its number of distinct trigrams (1 for words hashed
whole). The ids are stored CSR-style (``offsets`` / ``ids`` / ``edge`` flags), so a million words
take ~60M int32 ids, and scoring is one sparse CSR x dense matmul, no Python loop over words.

Scores (``score``, computed by :mod:`.scoring` or the native kernel), with ``p = sigmoid(logits)`` in
fp32, ``m = vocab_population``, ``v = vocab_size`` and edge weight ``e``::

    S_w     = sum_{i in N_w} p_i + e * sum_{i in Edge_w} p_i
    score_w = S_w / (m c_w) + (S_w - sum_i p_i) / (v - m c_w)

This is the reference's "variant 2" exactly (checked against its ``decode_trigram``): the first term
is the mean activation over the word's ``m c`` slots, the second (negative) term subtracts the mean
activation of the other ids. Decisions where the formula is ambiguous, all following the reference:
``m c`` counts id *slots* (collisions inside a word are not subtracted); with ``e != 1`` the weighted
``S_w`` enters both terms; ``sum_i p_i`` runs over all ``v`` ids. One deviation: ``v - m c`` is clamped
to at least 1 (the reference divides by zero or a negative number when ``m c >= v``, which only tiny
test vocabularies reach). ``log_probs`` is the log-softmax of the scores over the dictionary.

A dictionary is immutable and made of *blocks*: :meth:`add_words` returns a new dictionary that shares
the base blocks and owns one extra block, so per-call words (prompt words, ``more_words``) never leak
into the base. Special words (end of text and the splitter's markers) are always present;
:meth:`reduce_to` keeps them plus the ``n`` most frequent other words.

Storage: :meth:`save` writes ``NAME.safetensors`` (the arrays) and ``NAME.json`` (words, counts'
metadata, tokenizer config); never pickle. Word counts are read from JSON ``{"word": count}`` or TSV
(``word<TAB>count`` per line, ``\\n``/``\\t``/``\\\\`` escaped) by :func:`read_word_counts`; pickle only with
``allow_pickle=True``.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..fileutil import default_permissions
from . import scoring
from .word_counts import read_word_counts, write_word_counts
from .words import END_OF_TEXT, SPECIAL_WORDS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer settings the ids depend on (the cache size does not matter)."""
    cfg = dict(tokenizer.config_dict())
    cfg.pop("cache_size", None)
    return cfg


class _Block:
    """An immutable run of dictionary words with their CSR patterns."""

    __slots__ = ("words", "counts", "offsets", "ids", "edge", "c", "_index", "_matrix", "_native")

    def __init__(self, words: list[str], counts: np.ndarray, offsets: np.ndarray, ids: np.ndarray,
                 edge: np.ndarray, c: np.ndarray):
        self.words, self.counts, self.offsets, self.ids, self.edge, self.c = words, counts, offsets, ids, edge, c
        self._index: Optional[dict[str, int]] = None
        self._matrix: dict[tuple[float, str], torch.Tensor] = {}
        self._native: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def native(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """``(offsets int64, ids int32, edge uint8, c int32)`` tensors for the native kernels: zero-copy on
        the CPU, copied once per other device (cached: decoding scores the same patterns every word)."""
        device = torch.device(device)
        if device not in self._native:
            if device.type != "cpu":
                self._native[device] = tuple(t.to(device) for t in self.native("cpu"))
            else:
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only use
                self._native[device] = (
                    torch.from_numpy(np.ascontiguousarray(self.offsets, dtype=np.int64)),
                    torch.from_numpy(np.ascontiguousarray(self.ids, dtype=np.int32)),
                    torch.from_numpy(np.ascontiguousarray(self.edge, dtype=bool).view(np.uint8)),
                    torch.from_numpy(np.ascontiguousarray(self.c, dtype=np.int32)))
        return self._native[device]

    def __len__(self) -> int:
        return len(self.words)

    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {w: i for i, w in enumerate(self.words)}
        return self._index

    def matrix(self, edge_weight: float, device: torch.device, v: int) -> torch.Tensor:
        """The ``[n, v]`` CSR weight matrix (1 on N ids, ``edge_weight`` on Edge ids), cached."""
        key = (float(edge_weight), str(device))
        if key not in self._matrix:
            offsets, ids, edge, _ = self.native("cpu")
            self._matrix[key] = scoring.weight_matrix(offsets, ids, edge, v, edge_weight).to(device)
        return self._matrix[key]


def _build_block(tokenizer: Any, words: Sequence[str], counts: np.ndarray, chunk_size: int, progress: bool) -> _Block:
    """Patterns of ``words`` (distinct, in order), vectorised per chunk of words."""
    from .trigram import TrigramTokenizer, is_edge, word_trigrams

    if not isinstance(tokenizer, TrigramTokenizer):
        raise TypeError(f"a decode dictionary needs a T-Free TrigramTokenizer, got {type(tokenizer).__name__}")
    v, m = tokenizer.vocab_size, tokenizer.vocab_population
    whole_all = tokenizer.entire_words
    parts_off, parts_ids, parts_edge, parts_c = [], [], [], []
    start_t, n = time.time(), len(words)
    for start in range(0, n, chunk_size):
        chunk = list(words[start : start + chunk_size])
        for w in chunk:
            if not isinstance(w, str) or not w:
                raise ValueError(f"dictionary words must be non-empty str, got {w!r}")
        enc = tokenizer.encode_units(chunk)  # row = trigram rows back to back (first-seen order)
        lengths = np.diff(enc.offsets)
        whole = np.fromiter((whole_all or "<|" in w for w in chunk), dtype=bool, count=len(chunk))
        c = np.where(whole, 1, lengths // m).astype(np.int32)
        # Edge entries: for a word without an inner space the edge trigrams are exactly its first
        # (" ab") and last ("yz ") distinct trigrams; words hashed whole have no edge ids.
        word_of = np.repeat(np.arange(len(chunk), dtype=np.int64), lengths)
        local = np.arange(len(enc.indices), dtype=np.int64) - np.repeat(enc.offsets[:-1], lengths)
        edge = (~whole[word_of]) & ((local < m) | (local >= lengths[word_of] - m))
        for i, w in enumerate(chunk):  # rare: a word with a space inside (not made by the splitter)
            if not whole[i] and " " in w:
                flags = np.repeat([is_edge(t) for t in word_trigrams(w.lower() if tokenizer.lowercase else w)], m)
                edge[enc.offsets[i] : enc.offsets[i + 1]] = flags
        # distinct ids per word, an id edge if any of its occurrences is
        key = word_of * v + enc.indices.astype(np.int64)
        order = np.argsort(key, kind="stable")
        ks, es = key[order], edge[order]
        first = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]])) if len(ks) else np.zeros(0, np.int64)
        edge_u = np.logical_or.reduceat(es, first) if len(ks) else np.zeros(0, bool)
        word_u, ids_u = ks[first] // v, ks[first] % v
        off = np.zeros(len(chunk) + 1, dtype=np.int64)
        np.cumsum(np.bincount(word_u, minlength=len(chunk)), out=off[1:])
        parts_off.append(off), parts_ids.append(ids_u.astype(np.int32)), parts_edge.append(edge_u), parts_c.append(c)
        if progress:
            done = min(start + chunk_size, n)
            logger.info("decode dictionary: %d/%d words (%.1f s)", done, n, time.time() - start_t)
    if not parts_off:
        return _Block([], np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, bool),
                      np.zeros(0, np.int32))
    offsets, base = [np.zeros(1, np.int64)], 0
    for off in parts_off:
        offsets.append(off[1:] + base)
        base += int(off[-1])
    return _Block(list(words), np.asarray(counts, dtype=np.int64), np.concatenate(offsets), np.concatenate(parts_ids),
                  np.concatenate(parts_edge), np.concatenate(parts_c))


def _as_counts(words_or_counts: Any) -> list[tuple[str, int]]:
    """(word, count) pairs from a mapping, (word, count) pairs or plain words (count 0)."""
    if words_or_counts is None:
        return []
    if isinstance(words_or_counts, Mapping):
        return [(w, int(c)) for w, c in words_or_counts.items()]
    out = []
    for item in words_or_counts:
        if isinstance(item, str):
            out.append((item, 0))
        else:
            w, c = item
            out.append((w, int(c)))
    return out


class DecodeDictionary:
    """Words and their decode patterns; see the module docstring."""

    def __init__(self, blocks: Sequence[_Block], vocab_size: int, vocab_population: int,
                 tokenizer_config: dict[str, Any]):
        self._blocks = tuple(blocks)
        self.vocab_size = vocab_size
        self.vocab_population = vocab_population
        self.tokenizer_config = dict(tokenizer_config)
        self._tokenizer: Any = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, tokenizer: Any, words_or_counts: Any = None, progress: Optional[bool] = None,
              chunk_size: int = 100_000) -> "DecodeDictionary":
        """Dictionary of ``words_or_counts`` (``{word: count}``, pairs or plain words) plus the special
        words, sorted by count (descending, ties in input order). ``progress`` logs per chunk
        (default: for more than ``chunk_size`` words)."""
        merged: Counter = Counter()
        order: dict[str, None] = {}
        for w, c in _as_counts(words_or_counts):
            merged[w] += c
            order.setdefault(w, None)
        for w in (*SPECIAL_WORDS, tokenizer.end_of_text):
            order.setdefault(w, None)
        words = sorted(order, key=lambda w: -merged[w])  # stable: ties keep input order
        counts = np.fromiter((merged[w] for w in words), dtype=np.int64, count=len(words))
        progress = len(words) > chunk_size if progress is None else progress
        block = _build_block(tokenizer, words, counts, chunk_size, progress)
        d = cls([block], tokenizer.vocab_size, tokenizer.vocab_population, _tokenizer_fingerprint(tokenizer))
        d._tokenizer = tokenizer
        return d

    @classmethod
    def from_patterns(cls, entries: Sequence[tuple[str, Sequence[int], Sequence[int], int, int]], vocab_size: int,
                      vocab_population: int, tokenizer_config: Optional[dict[str, Any]] = None) -> "DecodeDictionary":
        """A dictionary from explicit ``(word, non_edge_ids, edge_ids, c, count)`` entries (custom
        patterns, tests); no tokenizer involved, so no special words are added."""
        words, offs, ids, edge, cs, counts = [], [0], [], [], [], []
        for word, inner, edges, c, count in entries:
            inner_set, edge_set = set(map(int, inner)), set(map(int, edges))
            row = sorted(inner_set | edge_set)
            if any(not 0 <= i < vocab_size for i in row):
                raise ValueError(f"word {word!r}: ids must be in [0, {vocab_size})")
            words.append(word), cs.append(int(c)), counts.append(int(count))
            ids.extend(row), edge.extend(i in edge_set for i in row), offs.append(len(ids))
        blk = _Block(words, np.asarray(counts, np.int64), np.asarray(offs, np.int64), np.asarray(ids, np.int32),
                     np.asarray(edge, bool), np.asarray(cs, np.int32))
        return cls([blk], vocab_size, vocab_population, tokenizer_config or {})

    def add_words(self, words: Iterable[str], tokenizer: Any = None) -> "DecodeDictionary":
        """A new dictionary = this one + the words of ``words`` not yet in it (count 0). ``self`` is
        unchanged (the base blocks are shared, read-only). ``tokenizer`` defaults to the one used to
        build or attached with :meth:`attach`."""
        tok = tokenizer or self._tokenizer
        if tok is None:
            raise ValueError("add_words needs the tokenizer (pass tokenizer=..., or attach() one after load)")
        new = [w for w in dict.fromkeys(words) if self.index_of(w) is None]
        if not new:
            return self
        block = _build_block(tok, new, np.zeros(len(new), np.int64), 100_000, False)
        d = DecodeDictionary([*self._blocks, block], self.vocab_size, self.vocab_population, self.tokenizer_config)
        d._tokenizer = tok
        return d

    def added_since(self, base: "DecodeDictionary") -> "DecodeDictionary":
        """The words this dictionary adds to ``base`` (it must come from ``base.add_words``), as a
        dictionary of their own: ``score`` of ``self`` == ``score`` of base and of this, concatenated."""
        k = len(base._blocks)
        if self._blocks[:k] != base._blocks:
            raise ValueError("added_since: this dictionary does not extend the given base")
        d = DecodeDictionary(self._blocks[k:], self.vocab_size, self.vocab_population, self.tokenizer_config)
        d._tokenizer = self._tokenizer
        return d

    def attach(self, tokenizer: Any) -> "DecodeDictionary":
        """Use ``tokenizer`` for :meth:`add_words`; raises if its settings differ from the dictionary's."""
        if _tokenizer_fingerprint(tokenizer) != self.tokenizer_config:
            raise ValueError(f"tokenizer {_tokenizer_fingerprint(tokenizer)} does not match the dictionary's "
                             f"{self.tokenizer_config}")
        self._tokenizer = tokenizer
        return self

    def _merged(self) -> _Block:
        if len(self._blocks) == 1:
            return self._blocks[0]
        b = self._blocks
        offsets, base = [np.zeros(1, np.int64)], 0
        for blk in b:
            offsets.append(blk.offsets[1:] + base)
            base += int(blk.offsets[-1])
        return _Block([w for blk in b for w in blk.words], np.concatenate([x.counts for x in b]), np.concatenate(offsets),
                      np.concatenate([x.ids for x in b]), np.concatenate([x.edge for x in b]),
                      np.concatenate([x.c for x in b]))

    def reduce_to(self, n: int) -> "DecodeDictionary":
        """The special words plus the ``n`` most frequent other words (ties: dictionary order)."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"reduce_to needs a non-negative int, got {n!r}")
        blk = self._merged()
        special = np.fromiter(("<|" in w for w in blk.words), dtype=bool, count=len(blk))
        others = np.flatnonzero(~special)
        others = others[np.argsort(-blk.counts[others], kind="stable")[:n]]
        keep = np.sort(np.concatenate([np.flatnonzero(special), others]))
        lengths = np.diff(blk.offsets)[keep]
        off = np.zeros(len(keep) + 1, np.int64)
        np.cumsum(lengths, out=off[1:])
        entry = np.repeat(blk.offsets[:-1][keep], lengths) + (np.arange(off[-1]) - np.repeat(off[:-1], lengths))
        new = _Block([blk.words[i] for i in keep], blk.counts[keep], off, blk.ids[entry], blk.edge[entry], blk.c[keep])
        d = DecodeDictionary([new], self.vocab_size, self.vocab_population, self.tokenizer_config)
        d._tokenizer = self._tokenizer
        return d

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return sum(len(b) for b in self._blocks)

    @property
    def words(self) -> list[str]:
        return [w for b in self._blocks for w in b.words]

    @property
    def counts(self) -> np.ndarray:
        return np.concatenate([b.counts for b in self._blocks])

    def word(self, i: int) -> str:
        for b in self._blocks:
            if i < len(b):
                return b.words[i]
            i -= len(b)
        raise IndexError("dictionary index out of range")

    def index_of(self, word: str) -> Optional[int]:
        """Position of ``word`` in the dictionary, or None."""
        base = 0
        for b in self._blocks:
            i = b.index().get(word)
            if i is not None:
                return base + i
            base += len(b)
        return None

    def __contains__(self, word: str) -> bool:
        return self.index_of(word) is not None

    def patterns(self, word: str) -> tuple[np.ndarray, np.ndarray, int]:
        """``(non_edge_ids, edge_ids, c)`` of a dictionary word (as ``TrigramTokenizer.word_patterns``)."""
        i = self.index_of(word)
        if i is None:
            raise KeyError(f"{word!r} is not in the dictionary")
        for b in self._blocks:
            if i < len(b):
                s, e = b.offsets[i], b.offsets[i + 1]
                ids, edge = b.ids[s:e], b.edge[s:e]
                return ids[~edge], ids[edge], int(b.c[i])
            i -= len(b)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ scoring
    def score(self, logits: torch.Tensor, edge_weight: float = 1.0) -> torch.Tensor:
        """``[B, v]`` head logits -> ``[B, n_words]`` float32 scores (formula in the module docstring).

        With the ``cpp`` ops backend active and CPU logits (or CUDA logits with the CUDA kernels built),
        the native kernel scores the words (parallel over words, same formula and results); otherwise the
        torch sparse-matmul path below runs.
        """
        if logits.ndim != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"score expects logits [B, {self.vocab_size}], got {tuple(logits.shape)}")
        from .. import ops

        kernel = ops.native_decode_scores(logits.device)
        if kernel is not None:
            parts = [kernel(logits, *b.native(logits.device), self.vocab_population, edge_weight)
                     for b in self._blocks if len(b)]
            return torch.cat(parts, dim=1) if parts else logits.new_zeros(logits.shape[0], 0, dtype=torch.float32)
        out = [scoring.spec_scores(logits, b.matrix(edge_weight, logits.device, self.vocab_size),
                                   torch.from_numpy(b.c), self.vocab_population) for b in self._blocks if len(b)]
        return torch.cat(out, dim=1) if out else logits.new_zeros(logits.shape[0], 0, dtype=torch.float32)

    def log_probs(self, logits: torch.Tensor, edge_weight: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
        """Log-softmax over the dictionary of ``score / temperature`` (``[B, n_words]``)."""
        return torch.log_softmax(self.score(logits, edge_weight) / temperature, dim=1)

    def likelihood_log_probs(self, logits: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
        """``[B, v]`` logits -> ``[B, n_words]`` calibrated log p(word | dictionary).

        p(w) is proportional to the geometric mean of the head's probabilities of w's distinct ids,
        ``exp(mean_{i in ids(w)} log sigmoid(l_i - log pos_weight))``, renormalised over the
        dictionary (logits corrected for the training ``pos_weight``, which shifts the BCE optimum by
        log(pos_weight)). Why: if the next word is w_k with probability P_k and the words' id sets do
        not overlap, a calibrated head gives p_i = P_k on w_k's ids, so this recovers P_k exactly;
        the independent-Bernoulli product would give about P_k**|ids| (overconfident by the id count),
        and the softmax of the spec scores (a ranking in about [-1, 1]) stays nearly uniform. It is
        the log-space counterpart of the spec's mean-probability score, used for bits per byte.
        """
        if logits.ndim != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"likelihood_log_probs expects logits [B, {self.vocab_size}], got {tuple(logits.shape)}")
        out = [scoring.geometric_means(logits, b.matrix(1.0, logits.device, self.vocab_size), pos_weight)
               for b in self._blocks if len(b)]
        means = torch.cat(out, dim=1) if out else logits.new_zeros(logits.shape[0], 0, dtype=torch.float32)
        return torch.log_softmax(means, dim=1)

    # ------------------------------------------------------------------ storage
    def arrays(self) -> dict[str, np.ndarray]:
        """The patterns as CSR arrays over all words, in dictionary order: ``offsets [n + 1]`` (int64),
        distinct ``ids`` (int32), ``edge`` flags (uint8), ``c [n]`` (int32), ``counts [n]`` (int64)."""
        blk = self._merged()
        return {"offsets": blk.offsets, "ids": blk.ids, "edge": blk.edge.astype(np.uint8), "c": blk.c,
                "counts": blk.counts}

    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path`` as ``X.safetensors`` (arrays) + ``X.json`` (words, settings); returns both."""
        from safetensors.numpy import save_file

        tensors_path, meta_path = self._paths(path)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.arrays(), str(tensors_path))
        default_permissions(tensors_path)
        meta = {"format_version": FORMAT_VERSION, "vocab_size": self.vocab_size,
                "vocab_population": self.vocab_population, "tokenizer": self.tokenizer_config, "words": self.words}
        meta_path.write_text(json.dumps(meta, ensure_ascii=False))
        return tensors_path, meta_path

    @classmethod
    def load(cls, path: str | Path, tokenizer: Any = None) -> "DecodeDictionary":
        """Read what :meth:`save` wrote; with ``tokenizer``, check it matches and attach it."""
        from safetensors.numpy import load_file

        tensors_path, meta_path = cls._paths(path)
        for p in (tensors_path, meta_path):
            if not p.is_file():
                raise FileNotFoundError(f"decode dictionary file {p} does not exist")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_path}: not valid JSON: {e}") from None
        for key in ("format_version", "vocab_size", "vocab_population", "tokenizer", "words"):
            if key not in meta:
                raise ValueError(f"{meta_path}: missing key {key!r}")
        if meta["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta['format_version']} is not {FORMAT_VERSION}")
        arrays = load_file(str(tensors_path))
        for key in ("offsets", "ids", "edge", "c", "counts"):
            if key not in arrays:
                raise ValueError(f"{tensors_path}: missing tensor {key!r}")
        n = len(meta["words"])
        if len(arrays["offsets"]) != n + 1 or len(arrays["c"]) != n or int(arrays["offsets"][-1]) != len(arrays["ids"]):
            raise ValueError(f"{tensors_path}: array sizes do not match the {n} words of {meta_path}")
        return cls.from_arrays(meta["words"], arrays, int(meta["vocab_size"]), int(meta["vocab_population"]),
                               meta["tokenizer"], tokenizer)

    @classmethod
    def from_arrays(cls, words: Sequence[str], arrays: Mapping[str, np.ndarray], vocab_size: int, vocab_population: int,
                    tokenizer_config: dict[str, Any], tokenizer: Any = None) -> "DecodeDictionary":
        """A dictionary from :meth:`arrays` (``counts`` optional) of ``words``; with ``tokenizer``, checked
        and attached."""
        n = len(words)
        counts = np.asarray(arrays["counts"], np.int64) if "counts" in arrays else np.zeros(n, np.int64)
        blk = _Block(list(words), counts, np.asarray(arrays["offsets"], np.int64), np.asarray(arrays["ids"], np.int32),
                     np.asarray(arrays["edge"]).astype(bool), np.asarray(arrays["c"], np.int32))
        d = cls([blk], vocab_size, vocab_population, tokenizer_config)
        if tokenizer is not None:
            d.attach(tokenizer)
        return d


__all__ = ["DecodeDictionary", "read_word_counts", "write_word_counts", "END_OF_TEXT"]
