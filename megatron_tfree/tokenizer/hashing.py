"""T-Free trigram hashing: words -> sparse vocabulary ids (spec section 2), standalone.

This module imports only the standard library and numpy, so it is also the hashing code of a
Hugging Face export (copied there verbatim as ``tfree_hashing.py``); :class:`TrigramTokenizer`
(:mod:`.trigram`) puts the tokenizer interface around :class:`TrigramHasher`.

A word is padded with one space on each side, its UTF-8 bytes are cut into every 3-byte window and
the distinct windows ("trigrams", first-seen order) each map to a *row* of ``m = vocab_population``
ids in ``[0, vocab_size)``. The ids of a word are its trigram rows back to back; an id shared by two
trigrams occurs twice, because the model's embedding-bag sums with multiplicity exactly like the
reference. The multi-hot target of a word is the set of those ids (:meth:`word_ids`).

Two hash families pick the rows:

``hash`` (reference-compatible, default)
    Trigram integer ``i = b0 + 256*b1 + 65536*b2``. For slot ``s`` in ``0..m-1`` draw
    ``int(md5(f"{i}_{s}_{j}")) % v`` for ``j = 0, 1, ...`` until the row's set grows by one; the row
    is the set sorted ascending. Rows are computed on demand and cached instead of materialising the
    reference's 16.7M-row table; the ids are identical.

``fast`` (new models only, seeded)
    A splitmix64 stream per trigram: ``state = mix64(mix64(seed) ^ (i * G2))`` and candidates
    ``mix64(state + (j+1) * G) % v`` for ``j = 0, 1, ...``; the row is the first ``m`` distinct
    candidates, sorted ascending. ``mix64`` is the splitmix64 finaliser, ``G`` the golden-ratio gamma
    ``0x9E3779B97F4A7C15`` and ``G2 = 0xD6E8FEB86659FD93``. Vectorised with numpy over all new
    trigrams of a call. Whole words use ``blake2b(digest_size=8, key=seed)`` in the md5 scheme below.

Partial lowercase (``k > 0``): a trigram made only of ASCII letters/spaces that contains an upper-case
letter keeps the first ``m - k`` entries of its own row and takes the last ``k`` entries of its
lower-cased trigram's row (as the reference does: the result is not re-sorted).

Special words (containing ``<|``), or every word when ``entire_words`` is set, are hashed whole:
ids ``i < m-k`` are ``H(f"{w}_{i}") % v`` and the last ``k`` are ``H(f"{w.lower()}_lower_{i}") % v``.

Caching: trigram rows and word id arrays are kept in dicts holding at most ``cache_size`` entries
each; a full cache is emptied and refilled (cheap, and no per-lookup LRU bookkeeping on the hot path).
A cached word is its int32 ids as raw bytes, so the CSR indices of a text are one ``join`` of them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

ID_DTYPE = np.int32  # vocabulary ids (v < 2**31)
OFFSET_DTYPE = np.int64
_INITIALIZE = ("hash", "fast")
_LETTERS_SPACE = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ "
_M64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_GAMMA2 = np.uint64(0xD6E8FEB86659FD93)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)


def _md5_int(text: str) -> int:
    """``int(md5(text).hexdigest(), 16)`` without the hex round trip."""
    return int.from_bytes(hashlib.md5(text.encode("utf-8")).digest(), "big")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _C1
    x = (x ^ (x >> np.uint64(27))) * _C2
    return x ^ (x >> np.uint64(31))


def trigram_to_id(trigram: bytes) -> int:
    """Integer id of a 3-byte trigram: ``b0 + 256*b1 + 65536*b2``."""
    if len(trigram) != 3:
        raise ValueError(f"a trigram has exactly 3 bytes, got {trigram!r}")
    return trigram[0] | (trigram[1] << 8) | (trigram[2] << 16)


def word_trigrams(word: str) -> list[bytes]:
    """Distinct byte trigrams of ``" " + word + " "`` in first-seen order (a 1-char word has one)."""
    if not isinstance(word, str):
        raise TypeError(f"word must be str, got {type(word).__name__}")
    if not word:
        raise ValueError("the empty string is not a word")
    data = f" {word} ".encode("utf-8")
    seen: dict[bytes, None] = {}
    for i in range(len(data) - 2):
        seen.setdefault(data[i : i + 3], None)
    return list(seen)


def is_edge(trigram: bytes | str) -> bool:
    """True for a trigram that begins or ends with a space (touches a word boundary)."""
    if isinstance(trigram, str):
        trigram = trigram.encode("utf-8")
    return trigram[:1] == b" " or trigram[-1:] == b" "


def is_hashed_whole(word: str, entire_words: bool) -> bool:
    """Whether ``word`` is hashed as a whole (special words, or every word with entire_words)."""
    return entire_words or "<|" in word


class TrigramHasher:
    """Words -> trigram ids (see the module docstring for the exact scheme), with caches."""

    def __init__(
        self,
        vocab_size: int = 8192,
        vocab_population: int = 10,
        vocab_population_partial_lowercase: int = 0,
        initialize: str = "hash",
        seed: int = 42,
        lowercase: bool = False,
        entire_words: bool = False,
        cache_size: int = 1_000_000,
    ):
        if not isinstance(vocab_size, int) or vocab_size < 1 or vocab_size >= 2**31:
            raise ValueError(f"vocab_size must be an int in [1, 2**31), got {vocab_size!r}")
        if not isinstance(vocab_population, int) or not 1 <= vocab_population <= vocab_size:
            raise ValueError(f"vocab_population must be in [1, vocab_size], got {vocab_population!r}")
        k = vocab_population_partial_lowercase
        if not isinstance(k, int) or not 0 <= k <= vocab_population:
            raise ValueError(f"vocab_population_partial_lowercase must be in [0, vocab_population], got {k!r}")
        if initialize not in _INITIALIZE:
            raise ValueError(f"initialize must be one of {_INITIALIZE}, got {initialize!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size must be a positive int, got {cache_size!r}")
        self._v = vocab_size
        self.vocab_population = vocab_population
        self.vocab_population_partial_lowercase = k
        self.initialize = initialize
        self.seed = seed
        self.lowercase = bool(lowercase)
        self.entire_words = bool(entire_words)
        self.cache_size = cache_size
        self._seed_key = _mix64(np.array([seed & _M64], dtype=np.uint64))[0]
        self._blake_key = (seed & _M64).to_bytes(8, "little")
        self._reset_caches()

    def settings(self) -> dict[str, Any]:
        """The settings the ids depend on (plus the cache size)."""
        return {
            "vocab_size": self._v,
            "vocab_population": self.vocab_population,
            "vocab_population_partial_lowercase": self.vocab_population_partial_lowercase,
            "initialize": self.initialize,
            "seed": self.seed,
            "lowercase": self.lowercase,
            "entire_words": self.entire_words,
            "cache_size": self.cache_size,
        }

    @property
    def vocab_size(self) -> int:
        return self._v

    # ------------------------------------------------------------------ trigram rows
    def _base_rows_hash(self, tids: Sequence[int]) -> np.ndarray:
        """Reference md5 rows (sorted, m distinct ids) of trigram integer ids."""
        m, v = self.vocab_population, self._v
        out = np.empty((len(tids), m), dtype=np.int64)
        for r, tid in enumerate(tids):
            row: set[int] = set()
            for s in range(m):
                j = 0
                size = len(row)
                while len(row) == size:
                    row.add(_md5_int(f"{tid}_{s}_{j}") % v)
                    j += 1
            out[r] = sorted(row)
        return out

    def _base_rows_fast(self, tids: Sequence[int]) -> np.ndarray:
        """Seeded splitmix64 rows (first m distinct candidates, sorted) of trigram ids, vectorised."""
        m, v = self.vocab_population, self._v
        n = len(tids)
        out = np.empty((n, m), dtype=np.int64)
        todo = np.arange(n)
        state = _mix64(self._seed_key ^ (np.asarray(tids, dtype=np.uint64) * _GAMMA2))
        width = m + 8
        while len(todo):
            steps = np.arange(1, width + 1, dtype=np.uint64) * _GAMMA
            cand = (_mix64(state[todo, None] + steps[None, :]) % np.uint64(v)).astype(np.int64)
            order = np.argsort(cand, axis=1, kind="stable")
            srt = np.take_along_axis(cand, order, axis=1)
            first_sorted = np.ones_like(srt, dtype=bool)
            first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
            first = np.empty_like(first_sorted)
            np.put_along_axis(first, order, first_sorted, axis=1)
            chosen = first & (np.cumsum(first, axis=1) <= m)
            ok = chosen.sum(axis=1) == m
            if ok.any():
                rows = cand[ok][chosen[ok]].reshape(-1, m)
                out[todo[ok]] = np.sort(rows, axis=1)
            todo = todo[~ok]
            width *= 2
        return out

    def _rows(self, trigrams: Sequence[bytes]) -> list[np.ndarray]:
        """Final rows (partial lowercase applied) of distinct trigrams, through the trigram cache."""
        cache = self._trigram_cache
        missing = [t for t in trigrams if t not in cache]
        if missing:
            k, m = self.vocab_population_partial_lowercase, self.vocab_population
            lowered = {}
            if k:
                for t in missing:
                    if t != t.lower() and not t.translate(None, _LETTERS_SPACE):
                        lowered[t] = t.lower()
            wanted = list(dict.fromkeys(missing + list(lowered.values())))
            base_fn = self._base_rows_hash if self.initialize == "hash" else self._base_rows_fast
            base = base_fn([trigram_to_id(t) for t in wanted]).astype(ID_DTYPE)
            by_tri = dict(zip(wanted, base))
            final: dict[bytes, np.ndarray] = {}
            for t in missing:
                row = by_tri[t]
                if t in lowered:
                    row = row.copy()
                    row[m - k :] = by_tri[lowered[t]][m - k :]
                final[t] = row
            out = [final[t] if t in final else cache[t] for t in trigrams]
            if len(cache) + len(final) > self.cache_size:
                cache.clear()
            if len(final) <= self.cache_size:
                cache.update(final)
            return out
        return [cache[t] for t in trigrams]

    def trigram_ids(self, trigram: str | bytes) -> list[int]:
        """The row of ``m`` ids of one trigram (3 UTF-8 bytes, or a str encoding to 3 bytes)."""
        if isinstance(trigram, str):
            trigram = trigram.encode("utf-8")
        if not isinstance(trigram, (bytes, bytearray)) or len(trigram) != 3:
            raise ValueError(f"a trigram is 3 bytes, got {trigram!r}")
        return self._rows([bytes(trigram)])[0].tolist()

    # ------------------------------------------------------------------ whole words
    def _whole_word_row(self, word: str) -> np.ndarray:
        """Ids of a word hashed whole (special word or entire_words): m ids, order kept."""
        m, k, v = self.vocab_population, self.vocab_population_partial_lowercase, self._v
        keys = [f"{word}_{i}" for i in range(m - k)]
        keys += [f"{word.lower()}_lower_{i}" for i in range(k)]
        if self.initialize == "hash":
            ids = [_md5_int(key) % v for key in keys]
        else:
            ids = [
                int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=self._blake_key).digest(), "little") % v
                for key in keys
            ]
        return np.asarray(ids, dtype=ID_DTYPE)

    def _compute_word_rows(self, words: Sequence[str]) -> list[np.ndarray]:
        """Uncached id arrays of distinct words (trigram rows concatenated, or the whole-word row)."""
        tri_lists: list[list[bytes] | None] = []
        all_tri: dict[bytes, None] = {}
        for w in words:
            if not isinstance(w, str):
                raise TypeError(f"words must be str, got {type(w).__name__}: {w!r}")
            if self.lowercase:
                w = w.lower()
            if is_hashed_whole(w, self.entire_words):
                tri_lists.append(None)
            else:
                tris = word_trigrams(w)
                tri_lists.append(tris)
                all_tri.update(dict.fromkeys(tris))
        tri_row = dict(zip(all_tri, self._rows(list(all_tri))))
        out = []
        for w, tris in zip(words, tri_lists):
            if tris is None:
                out.append(self._whole_word_row(w.lower() if self.lowercase else w))
            else:
                out.append(np.concatenate([tri_row[t] for t in tris]))
        return out

    # ------------------------------------------------------------------ caches
    def _reset_caches(self) -> None:
        self._trigram_cache: dict[bytes, np.ndarray] = {}
        self._word_cache: dict[str, bytes] = {}  # word -> its int32 ids as raw bytes

    def clear_cache(self) -> None:
        """Forget all cached trigram rows and word arrays."""
        self._reset_caches()

    @property
    def cached_words(self) -> int:
        return len(self._word_cache)

    @property
    def cached_trigrams(self) -> int:
        return len(self._trigram_cache)

    # ------------------------------------------------------------------ encoding
    def encode_words(self, units: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """CSR ``(offsets int64 [n + 1], indices int32)`` of words (row i = word i's trigram rows back to back).

        Hot path: one dict lookup per word for its cached raw int32 bytes, one ``bytearray.join``
        for the indices and a cumulative sum for the offsets.
        """
        if isinstance(units, str):
            raise TypeError("encode_units takes a list of words, not a str (use encode for text)")
        if not isinstance(units, (list, tuple)):
            units = list(units)
        cache = self._word_cache
        rows = list(map(cache.get, units))
        if None in rows:
            missing = list(dict.fromkeys(w for w, r in zip(units, rows) if r is None))
            new = {w: r.tobytes() for w, r in zip(missing, self._compute_word_rows(missing))}
            rows = [new[w] if r is None else r for w, r in zip(units, rows)]
            if len(cache) + len(new) > self.cache_size:
                cache.clear()
            if len(new) <= self.cache_size:
                cache.update(new)
        offsets = np.zeros(len(rows) + 1, dtype=OFFSET_DTYPE)
        np.cumsum(np.fromiter(map(len, rows), dtype=OFFSET_DTYPE, count=len(rows)), out=offsets[1:])
        offsets >>= 2  # bytes -> int32 ids
        return offsets, np.frombuffer(bytearray().join(rows), dtype=ID_DTYPE)

    def word_row(self, word: str) -> np.ndarray:
        """A word's CSR row: its trigram rows back to back (shared ids repeated), int32."""
        return self.encode_words([word])[1].copy()

    def word_ids(self, word: str) -> list[int]:
        """The word's sorted distinct ids (its multi-hot target)."""
        return np.unique(self.word_row(word)).tolist()

    def word_patterns(self, word: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Decode-dictionary pattern ``(non_edge_ids, edge_ids, c)`` of a word (spec section 4).

        ``edge_ids``: distinct ids of trigrams that begin or end with a space; ``non_edge_ids``: the
        other distinct ids (an id in both goes to edge, as the reference weights it); ``c``: number of
        distinct trigrams. Words hashed whole give their ids as non-edge and ``c = 1``.
        """
        w = word.lower() if self.lowercase else word
        if is_hashed_whole(w, self.entire_words):
            return np.unique(self._whole_word_row(w)), np.zeros(0, dtype=ID_DTYPE), 1
        tris = word_trigrams(w)
        rows = self._rows(tris)
        edge_rows = [r for t, r in zip(tris, rows) if is_edge(t)]
        inner_rows = [r for t, r in zip(tris, rows) if not is_edge(t)]
        edge = np.unique(np.concatenate(edge_rows)).astype(ID_DTYPE)
        inner = np.unique(np.concatenate(inner_rows)).astype(ID_DTYPE) if inner_rows else np.zeros(0, ID_DTYPE)
        return np.setdiff1d(inner, edge).astype(ID_DTYPE), edge, len(tris)

