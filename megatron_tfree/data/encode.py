"""A batch of texts -> a model-ready :class:`Batch` (CSR input ids, next-unit targets, weights).

The convenience path for code that has plain strings instead of a MemoryMap (evaluation scripts,
notebooks, tests). Each text is one document laid out as in the packed pretraining stream:

    input units   <|endoftext|>  w_0  w_1 ... w_{n-1}
    target units  w_0  w_1  ...  w_{n-1}  <|endoftext|>

The leading end-of-text is the separator that ends the previous document in the stream (document 0,
position 0), so the first word is predicted too; the words are document 1 with positions 0..n-1.
Rows are padded (end-of-text ids, weight 0, 0 bytes, "" strings) to the longest text, or to
``seq_len``, which also truncates. ``target_bytes`` are the exact UTF-8 bytes each target stands
for (they sum to the text's length when nothing is truncated).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..tokenizer.base import SparseIds, Tokenizer
from .batch import Batch
from .dataset import Sample, collate, positions_and_documents
from .unit_bytes import END_OF_TEXT_BYTES, unit_byte_counts


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], seq_len: Optional[int] = None,
                 loss_weights: Optional[Sequence[float]] = None) -> Batch:
    """``texts`` -> a :class:`Batch` of ``len(texts)`` rows of ``seq_len`` positions (default: the
    longest text's units + 1). ``loss_weights``: one weight per text (default 1)."""
    if isinstance(texts, str) or not len(texts):
        raise ValueError("texts must be a non-empty sequence of strings")
    if loss_weights is not None and len(loss_weights) != len(texts):
        raise ValueError(f"loss_weights has {len(loss_weights)} entries for {len(texts)} texts")
    if seq_len is not None and seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    eot = tokenizer.end_of_text
    eot_ids = tokenizer.eot_ids()
    encoded = [tokenizer.encode(t) for t in texts]
    S = seq_len if seq_len is not None else max(len(e) for e in encoded) + 1
    samples = []
    for i, enc in enumerate(encoded):
        words = enc.units
        units = [eot] + words + [eot]
        ids = SparseIds.concat([eot_ids, enc.ids, eot_ids])
        nbytes = np.concatenate([unit_byte_counts(tokenizer, words, [None] + words[:-1]) if words
                                 else np.zeros(0, np.int64), [END_OF_TEXT_BYTES]]).astype(np.int64)
        real = min(len(units), S + 1)  # units kept (inputs + the last target)
        units, ids, nbytes = units[:real], ids.slice(0, real), nbytes[: real - 1]
        pad = S + 1 - real
        is_eot = np.zeros(S + 1, dtype=bool)
        is_eot[0] = True
        is_eot[len(words) + 1:] = True  # the closing end of text and the padding
        if pad:
            ids = SparseIds.concat([ids] + [eot_ids] * pad)
            units = units + [""] * pad
        weights = np.zeros(S, dtype=np.float32)
        weights[: real - 1] = 1.0 if loss_weights is None else float(loss_weights[i])
        target_bytes = np.zeros(S, dtype=np.int64)
        target_bytes[: real - 1] = nbytes
        pos, doc = positions_and_documents(is_eot[:S])
        samples.append(Sample(ids, units, pos, doc, weights, target_bytes))
    return collate(samples)
