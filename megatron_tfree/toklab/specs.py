"""Tokenizers to measure, named by a SPEC: a Hugging Face ``tokenizer.json`` path, or a T-Free setting.

* ``PATH`` (a ``tokenizer.json``, or a folder holding one, e.g. a checkpoint's ``tokenizer/`` or an HF
  export): units are its tokens. A byte-level BPE whose pre-tokenizer is a regex split (the presets of
  :mod:`.presets`, a custom regex, GPT-2's) is measured through its pre-tokens: the corpus is cut with
  the same regex once (:func:`pretoken_counts`, shared by every tokenizer with that regex) and each
  distinct pre-token is encoded once, with the batch encoder of ``tokenizers`` (BPE never merges across
  pre-tokens, so the counts are exact). This path is checked against encoding whole documents on the
  bundled multilingual probe when the tokenizer is loaded; any other tokenizer encodes whole documents.
* ``tfree:v=8192,m=10[,k=0,init=hash,lowercase=0]``: a T-Free tokenizer (``k`` = ids shared with the
  lower-case trigram); units are words (with the whitespace marker words), ids the trigram ids.

Each has ``name``, ``kind`` (``bpe`` / ``tfree``), ``vocab_size``, ``preset`` and ``tally(texts)``
returning a :class:`~.metrics.Tally`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from .metrics import Tally, near_duplicate_share
from .presets import GPT2, identify
from .sources import batches


def pretoken_counts(texts: Iterable[str], pattern: str, specials: Sequence[str] = ()) -> tuple[Counter, Tally]:
    """The pre-tokens of ``texts`` cut by ``pattern`` (Python ``regex`` syntax, as the Rust one for these
    patterns) with their counts, and the texts' words/bytes/characters. Occurrences of the ``specials``
    (added tokens) are cut out first and counted whole, as ``tokenizers`` does."""
    import regex

    rx = regex.compile(pattern)
    cut = regex.compile("(" + "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")") \
        if specials else None
    counts: Counter = Counter()
    stats = Tally()
    for text in texts:
        stats.add_text(text)
        if cut is None:
            counts.update(rx.findall(text))
            continue
        for i, part in enumerate(cut.split(text)):
            if i % 2:
                counts[part] += 1
            elif part:
                counts.update(rx.findall(part))
    return counts, stats


def _split_pattern(config: dict[str, Any]) -> Optional[str]:
    """The regex a byte-level BPE's pre-tokenizer cuts with, when that is all it does before the byte
    mapping (no normaliser, no other pre-tokenizer); None otherwise."""
    if config.get("normalizer") or (config.get("model") or {}).get("type") != "BPE":
        return None
    pt = config.get("pre_tokenizer") or {}
    if pt.get("type") == "ByteLevel":
        return GPT2 if pt.get("use_regex", True) and not pt.get("add_prefix_space") else None
    parts = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("behavior") == "Isolated"
            and not parts[0].get("invert") and "Regex" in (parts[0].get("pattern") or {})
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)
            and not parts[1].get("add_prefix_space")):
        return parts[0]["pattern"]["Regex"]
    return None


class BpeSpec:
    kind = "bpe"

    def __init__(self, path: str | Path, name: str | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist (a SPEC is a tokenizer.json or tfree:...)")
        self.path = path
        self.tokenizer = Tokenizer.from_file(str(path))
        self.config = json.loads(path.read_text(encoding="utf-8"))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.preset = identify(self.config)
        self.name = name or (path.stem if path.name != "tokenizer.json" else path.parent.name)
        self.specials = {a["id"] for a in self.config.get("added_tokens", []) if a.get("special")}
        self.special_texts = [a["content"] for a in self.config.get("added_tokens", [])]  # cut out before splitting
        self.pattern = _split_pattern(self.config)  # the pre-token path when not None
        if self.pattern is not None:
            self._pieces_tok = self._byte_level_only()
            problem = self._check_pretoken_path()
            if problem is not None:
                import warnings

                warnings.warn(f"{path}: measuring through pre-tokens disagrees with encoding documents on the "
                              f"probe ({problem}); encoding whole documents instead (slower)")
                self.pattern = None

    def _byte_level_only(self) -> Any:
        """This tokenizer with its pre-tokenizer reduced to the byte mapping (pre-tokens come cut)."""
        from tokenizers import Tokenizer, pre_tokenizers

        tok = Tokenizer.from_str(self.tokenizer.to_str())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return tok

    def tally(self, texts: Iterable[str]) -> Tally:
        """Encode whole documents (any tokenizer)."""
        t = Tally(id_counts=np.zeros(self.vocab_size, dtype=np.int64))
        for batch in batches(texts, 64):
            for text, enc in zip(batch, self.tokenizer.encode_batch_fast(batch, add_special_tokens=False)):
                t.add_text(text)
                t.units += len(enc.ids)
                if enc.ids:
                    t.id_counts += np.bincount(enc.ids, minlength=self.vocab_size)[: self.vocab_size]
        return t

    def measure(self, texts: Iterable[str]) -> Tally:
        """The tally of ``texts`` the fastest exact way: through pre-tokens when :attr:`pattern` is known."""
        if self.pattern is None:
            return self.tally(texts)
        return self.tally_pretokens(*pretoken_counts(texts, self.pattern, self.special_texts))

    def tally_pretokens(self, counts: Counter, stats: Tally) -> Tally:
        """The tally from pre-token counts of this tokenizer's ``pattern`` (see the module docstring)."""
        t = Tally(words=stats.words, bytes=stats.bytes, chars=stats.chars,
                  id_counts=np.zeros(self.vocab_size, dtype=np.int64))
        pieces = list(counts)
        if not pieces:
            return t
        freq = np.fromiter((counts[p] for p in pieces), dtype=np.int64, count=len(pieces))
        ids = [e.ids for e in self._pieces_tok.encode_batch_fast(pieces, add_special_tokens=False)]
        lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((x for i in ids for x in i), dtype=np.int64, count=int(lengths.sum()))
        t.units = int((lengths * freq).sum())
        t.id_counts += np.bincount(flat, weights=np.repeat(freq, lengths), minlength=self.vocab_size)[
            : self.vocab_size].astype(np.int64)
        return t

    def _check_pretoken_path(self) -> Optional[str]:
        """Why the pre-token path disagrees with whole-document encoding on the probe (None: it agrees)."""
        from .sources import parse_corpus

        docs = [d for source in parse_corpus("multilingual") for d in source.documents()]
        docs.append(f"a{self.special_texts[0]}b {self.special_texts[0]} c" if self.special_texts else "")
        whole = self.tally(docs)
        fast = self.tally_pretokens(*pretoken_counts(docs, self.pattern, self.special_texts))
        if whole.units != fast.units or not np.array_equal(whole.id_counts, fast.id_counts):
            return f"{whole.units} tokens encoding documents, {fast.units} through pre-tokens"
        return None

    def token_bytes(self) -> list[bytes]:
        """The bytes of every non-special vocabulary entry (:func:`vocab_bytes` without the specials)."""
        return [b for i, b in enumerate(vocab_bytes(self.tokenizer)) if i not in self.specials]

    def near_duplicate_share(self) -> float:
        return near_duplicate_share(self.token_bytes(), self.vocab_size)


def vocab_bytes(tokenizer: Any) -> list[bytes]:
    """The bytes of EVERY id ``0..V-1`` of a Hugging Face ``tokenizers.Tokenizer`` (e.g. a
    ``ClassicTokenizer.hf_tokenizer``, a :class:`BpeSpec`'s ``tokenizer``), aligned with an
    embedding table: byte-level symbols mapped back to bytes; added (special) tokens the UTF-8 of their
    content; other entries the UTF-8 of their decoded text. An id without an entry is an error."""
    config = json.loads(tokenizer.to_str())
    vocab = {i: t for t, i in tokenizer.get_vocab(with_added_tokens=True).items()}
    added = {a["id"]: a["content"] for a in config.get("added_tokens", [])}
    byte_level = "ByteLevel" in json.dumps(config.get("decoder") or {})
    inverse = {c: b for b, c in byte_symbols().items()}
    out = []
    for i in range(max(vocab, default=-1) + 1):
        if i in added:
            out.append(added[i].encode("utf-8"))
        elif i not in vocab:
            raise ValueError(f"the tokenizer has no entry for id {i} (ids must be 0..{len(vocab) - 1})")
        elif byte_level and all(c in inverse for c in vocab[i]):
            out.append(bytes(inverse[c] for c in vocab[i]))
        else:
            out.append(tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


def byte_symbols() -> dict[int, str]:
    """Byte-level BPE's printable symbol for each byte: printable Latin-1 bytes stand for themselves, the
    others (control characters, space, ...) take the code points from 256 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return symbols


class TFreeSpec:
    kind = "tfree"
    preset = "tfree"

    KEYS = {"v": "vocab_size", "m": "vocab_population", "k": "vocab_population_partial_lowercase",
            "init": "initialize", "lowercase": "lowercase", "seed": "seed"}

    def __init__(self, spec: str):
        from megatron_tfree.tokenizer import TrigramTokenizer

        settings: dict[str, Any] = {}
        for part in filter(None, spec.split(":", 1)[1].split(",")):
            key, sep, value = part.partition("=")
            if not sep or key not in self.KEYS:
                raise ValueError(f"T-Free SPEC {spec!r}: expected key=value with keys {', '.join(self.KEYS)}, got {part!r}")
            name = self.KEYS[key]
            settings[name] = value if name == "initialize" else bool(int(value)) if name == "lowercase" else int(value)
        self.tokenizer = TrigramTokenizer(**settings)
        self.vocab_size = self.tokenizer.vocab_size
        self.name = f"tfree v={self.vocab_size} m={self.tokenizer.vocab_population}"
        if self.tokenizer.vocab_population_partial_lowercase:
            self.name += f" k={self.tokenizer.vocab_population_partial_lowercase}"

    def tally(self, texts: Iterable[str]) -> Tally:
        t = Tally(id_counts=np.zeros(self.vocab_size, dtype=np.int64), word_freq=Counter())
        for text in texts:
            t.add_text(text)
            enc = self.tokenizer.encode(text)
            t.units += len(enc.units)
            t.word_freq.update(enc.units)
            if len(enc.ids.indices):
                t.id_counts += np.bincount(enc.ids.indices, minlength=self.vocab_size)
        t.word_ids = sum(n * len(self.tokenizer.word_ids(w)) for w, n in t.word_freq.items())
        return t

    def near_duplicate_share(self) -> float:
        return 0.0  # words are not vocabulary entries: nothing to duplicate


def load_spec(spec: str) -> Any:
    """The measured tokenizer of a SPEC (see the module docstring)."""
    if spec.startswith("tfree:"):
        return TFreeSpec(spec)
    return BpeSpec(spec)
