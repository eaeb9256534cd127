"""How many bytes of the original text each unit stands for (the denominator of bits per byte).

The rule must be exact: for every encoded text segment, the counts of its units sum to the
segment's UTF-8 length, separators included, so ``sum(loss) / sum(target_bytes)`` is a true
bits-per-byte figure that compares T-Free and BPE models on equal terms.

T-Free words (``kind == "tfree"``)
    The word -> text inverse (spec section 1.7) is *local*: the separator between two neighbouring
    words depends only on those two words. Hence ``text(w[:k+1]) == text(w[:k]) + sep(w[k-1], w[k])
    + surface(w[k])`` and word ``k`` is charged ``len(utf8(decode([w[k-1], w[k]]))) -
    len(utf8(decode([w[k-1]])))`` bytes: its own surface text plus the whitespace between it and the
    word before. The first word of a segment is charged ``len(utf8(decode([w[0]])))``. The counts
    telescope to the segment's exact UTF-8 length, and a window of units needs only its own words and
    one word of left context, never the whole document.

Byte-level BPE tokens (``kind == "classic"``, as trained by :class:`ClassicTokenizer`)
    A token string in the byte-level alphabet has one character per byte, so the count is the
    token's length; any other unit (an added special token typed in the text) counts its UTF-8 length.

End of text: the ``<|endoftext|>`` the dataset appends is not in the original text and counts
**0 bytes** (:data:`END_OF_TEXT_BYTES`); its loss is part of coding the document it ends. Padding
counts 0 bytes as well.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from ..tokenizer.base import Tokenizer

END_OF_TEXT_BYTES = 0


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> frozenset[str]:
    """The 256 characters of the GPT-2 byte-level alphabet (one per byte value)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return frozenset(chr(c) for c in cs)


def _byte_level_length(unit: str) -> int:
    alphabet = _byte_level_alphabet()
    if all(ch in alphabet for ch in unit):
        return len(unit)
    return len(unit.encode("utf-8"))


def unit_byte_counts(tokenizer: Tokenizer, units: Sequence[str], left_context: Sequence[str | None]) -> np.ndarray:
    """Bytes of original text that each of ``units`` stands for (int64).

    Args:
        tokenizer: the tokenizer that produced the units.
        units: consecutive units of one or more segments.
        left_context: for each unit, the unit before it *in the same segment*, or ``None`` when it is
            the first unit of its segment (T-Free charges the separator to the right-hand word).
    """
    out = np.zeros(len(units), dtype=np.int64)
    if tokenizer.kind == "tfree":
        decode = tokenizer.decode
        for k, (unit, prev) in enumerate(zip(units, left_context)):
            if prev is None:
                out[k] = len(decode([unit]).encode("utf-8"))
            else:
                out[k] = len(decode([prev, unit]).encode("utf-8")) - len(decode([prev]).encode("utf-8"))
    else:
        for k, unit in enumerate(units):
            out[k] = _byte_level_length(unit)
    return out
