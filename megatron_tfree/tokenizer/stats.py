"""Tokenizer statistics on a corpus: fertility, units, ids per unit, embedding+head size.

Fertility is units per whitespace-separated word (the paper's measure): T-Free units are words
(plus whitespace/punctuation words), classic units are tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from .base import Tokenizer


@dataclass
class TokenizerStats:
    kind: str
    vocab_size: int
    documents: int
    bytes: int
    whitespace_words: int
    units: int
    distinct_units: int
    ids: int  # CSR entries (T-Free: trigram ids incl. repeats; classic: == units)

    @property
    def fertility(self) -> float:
        return self.units / max(self.whitespace_words, 1)

    @property
    def ids_per_unit(self) -> float:
        return self.ids / max(self.units, 1)

    @property
    def bytes_per_unit(self) -> float:
        return self.bytes / max(self.units, 1)

    def embedding_head_params(self, hidden_size: int) -> int:
        """Parameters of the input embedding plus the (untied) output head."""
        return 2 * self.vocab_size * hidden_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(fertility=self.fertility, ids_per_unit=self.ids_per_unit, bytes_per_unit=self.bytes_per_unit)
        return d


def measure(tokenizer: Tokenizer, texts: Iterable[str]) -> TokenizerStats:
    """Encode every text once and count (each text is one document)."""
    docs = nbytes = ws_words = units = ids = 0
    distinct: set[str] = set()
    for text in texts:
        enc = tokenizer.encode(text)
        docs += 1
        nbytes += len(text.encode("utf-8"))
        ws_words += len(text.split())
        units += len(enc)
        ids += len(enc.ids.indices)
        distinct.update(enc.units)
    return TokenizerStats(tokenizer.kind, tokenizer.vocab_size, docs, nbytes, ws_words, units, len(distinct), ids)


def format_stats(s: TokenizerStats, hidden_size: int, baseline_vocab: int = 65536) -> str:
    """A small table; the last line compares embedding+head size with a ``baseline_vocab`` vocabulary."""
    rows = [
        ("tokenizer", f"{s.kind} (vocab {s.vocab_size:,})"),
        ("documents", f"{s.documents:,}"),
        ("text", f"{s.bytes / 1e6:,.2f} MB"),
        ("whitespace words", f"{s.whitespace_words:,}"),
        ("units (words/tokens)", f"{s.units:,}"),
        ("fertility (units / ws word)", f"{s.fertility:.3f}"),
        ("distinct units", f"{s.distinct_units:,}"),
        ("ids per unit", f"{s.ids_per_unit:.2f}"),
        ("bytes per unit", f"{s.bytes_per_unit:.2f}"),
    ]
    ours = s.embedding_head_params(hidden_size)
    base = 2 * baseline_vocab * hidden_size
    rows.append((f"embedding+head params (h={hidden_size})",
                 f"{ours:,} = {ours / base:.1%} of a {baseline_vocab // 1024}k vocabulary's {base:,}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
