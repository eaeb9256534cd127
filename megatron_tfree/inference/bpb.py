"""Bits per byte: a tokenizer-agnostic score of held-out text (spec section 3), T-Free and classic.

``bpb = sum over predicted units of -log2 p(unit | context) / UTF-8 bytes of the text``.

* T-Free: ``p(word)`` is a softmax over the decode dictionary. By default (``scoring="likelihood"``)
  it is the normalised geometric mean of the head's (pos_weight-corrected) probabilities of the
  word's ids (:meth:`DecodeDictionary.likelihood_log_probs`, which explains why this is calibrated). ``scoring="score"`` uses the spec-4 decode scores instead
  (:meth:`DecodeDictionary.log_probs`); those lie in about [-1, 1], so their softmax is nearly flat
  and the figure is dominated by ``log2(dictionary size)``: fine for ranking, useless as a measure.
  The evaluated text's own words join the dictionary (per text, or per Batch: the words of its
  ``target_units``), otherwise an unseen word would have probability 0; the returned details say so
  (``"text_words_added"``) and a log line repeats it. The figure depends on the dictionary: compare
  T-Free runs only with the same dictionary (the training loop fixes one per run).
* classic: ``p(token)`` is the softmax of the logits (cross-entropy).

Batches (the training loop's held-out iterator): every position with ``loss_weight > 0`` counts; bits
are weighted by the loss weight; bytes are ``batch.target_bytes`` of those positions (exact per-unit
bytes, end of text 0, see :mod:`megatron_tfree.data.unit_bytes`).

Texts, defined to match the pretraining stream: a text is one document ``w_0 .. w_{n-1}`` followed by
``<|endoftext|>``. The input is ``<|endoftext|> w_0 .. w_{n-1}`` (the end of text in a document of its
own, position 0, then the words at positions 0..n-1 of the next document), the targets
``w_0 .. w_{n-1} <|endoftext|>``. So every byte of the text is predicted once, the end of text costs
bits but 0 bytes, and the byte total equals ``len(text.encode("utf-8"))`` exactly. A text is one
forward, so it must fit the model's context.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch

from ..data.batch import Batch
from ..data.unit_bytes import unit_byte_counts
from ..model.gpt import make_input_batch
from ..tokenizer.dictionary import DecodeDictionary

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)
_MAX_SCORE_ELEMENTS = 1 << 24  # positions x dictionary words scored at once


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _text_batch(tokenizer: Any, text: str) -> tuple[Batch, list[str], int]:
    """The one-document batch of ``text`` (see the module docstring), its target units and its bytes."""
    units = tokenizer.encode(text).units
    eot = tokenizer.end_of_text
    n = len(units)
    ids = tokenizer.encode_units([eot] + units)
    positions = torch.as_tensor(np.concatenate([[0], np.arange(n)]), dtype=torch.long)[None]
    documents = torch.as_tensor([0] + [1] * n, dtype=torch.long)[None]
    batch = make_input_batch(torch.from_numpy(ids.offsets.astype(np.int64)), torch.from_numpy(ids.indices.astype(np.int64)),
                             positions, documents)
    nbytes = unit_byte_counts(tokenizer, units, [None] + units[:-1]) if n else np.zeros(0, np.int64)
    batch.target_bytes = torch.as_tensor(np.concatenate([nbytes, [0]]), dtype=torch.long)[None]
    batch.loss_weights = torch.ones(1, n + 1)
    batch.target_units = [units + [eot]]
    tgt = tokenizer.encode_units(units + [eot])
    batch.target_offsets = torch.from_numpy(tgt.offsets.astype(np.int64))
    batch.target_ids = torch.from_numpy(tgt.indices.astype(np.int64))
    total = int(nbytes.sum())
    if total != len(text.encode("utf-8")):  # unit_bytes guarantees it; keep the figure honest
        raise AssertionError(f"unit bytes {total} != text bytes {len(text.encode('utf-8'))}")
    return batch, units + [eot], total


def _tfree_bits(logits: torch.Tensor, targets: list[str], weights: torch.Tensor, dictionary: DecodeDictionary,
                edge_weight: float, temperature: float, scoring: str = "likelihood",
                pos_weight: float = 1.0) -> tuple[float, int]:
    """Weighted -log2 p of ``targets`` (one per row of ``logits [N, v]``); also returns words added."""
    ext = dictionary.add_words([w for w in dict.fromkeys(targets)])
    index = torch.as_tensor([ext.index_of(w) for w in targets], dtype=torch.long, device=logits.device)
    chunk = max(1, _MAX_SCORE_ELEMENTS // max(1, len(ext)))
    bits = 0.0
    for s in range(0, len(targets), chunk):
        if scoring == "likelihood":
            lp = ext.likelihood_log_probs(logits[s : s + chunk], pos_weight)
        else:
            lp = ext.log_probs(logits[s : s + chunk], edge_weight, temperature)
        picked = lp.gather(1, index[s : s + chunk, None])[:, 0]
        bits += float(-(picked.double() * weights[s : s + chunk].double()).sum()) / LN2
    return bits, len(ext) - len(dictionary)


def _batch_bits(model: torch.nn.Module, tokenizer: Any, batch: Batch, dictionary: Optional[DecodeDictionary],
                edge_weight: float, temperature: float, logits: Optional[torch.Tensor] = None,
                scoring: str = "likelihood") -> tuple[float, int, int, int]:
    """(bits, bytes, predicted units, dictionary words added) of one Batch (``logits``: the model's
    output for it when already computed)."""
    if batch.target_bytes is None:
        raise ValueError("bits per byte needs Batch.target_bytes (the UTF-8 bytes of each target unit)")
    if logits is None:
        batch = batch.to(_device(model))
        logits = model(batch)
    logits = logits.float()
    v = logits.shape[-1]
    w = batch.loss_weights.reshape(-1).float()
    sel = torch.nonzero(w > 0).squeeze(1)
    nbytes = int(batch.target_bytes.reshape(-1)[sel].sum())
    flat = logits.reshape(-1, v)[sel]
    if tokenizer.kind == "tfree":
        if dictionary is None:
            raise ValueError("T-Free bits per byte needs a decode dictionary")
        if batch.target_units is None:
            raise ValueError("T-Free bits per byte needs Batch.target_units (the target words)")
        units = [u for row in batch.target_units for u in row]
        S = batch.shape[1]
        if len(units) != w.numel() or any(len(row) != S for row in batch.target_units):
            raise ValueError(f"Batch.target_units must be [B][S] = {list(batch.shape)}")
        targets = [units[i] for i in sel.tolist()]
        if any(not t for t in targets):
            raise ValueError("Batch.target_units is empty at a position with loss weight > 0")
        pos_weight = float(getattr(getattr(getattr(model, "output", None), "head", None), "pos_weight", 1.0))
        bits, added = _tfree_bits(flat, targets, w[sel], dictionary, edge_weight, temperature, scoring, pos_weight)
    else:
        offs = batch.target_offsets
        if batch.target_ids.numel() != w.numel() or not torch.equal(offs[1:] - offs[:-1], torch.ones_like(offs[1:])):
            raise ValueError("classic bits per byte needs exactly one target id per position")
        tgt = batch.target_ids.long()[sel]
        lp = torch.log_softmax(flat / temperature, dim=1).gather(1, tgt[:, None])[:, 0]
        bits, added = float(-(lp.double() * w[sel].double()).sum()) / LN2, 0
    return bits, nbytes, int(sel.numel()), added


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, tokenizer: Any, data: Any, dictionary: Optional[DecodeDictionary] = None,
                  edge_weight: float = 1.0, temperature: float = 1.0,
                  scoring: str = "likelihood") -> tuple[float, dict[str, Any]]:
    """Bits per byte of ``data``: a text, a :class:`Batch`, or an iterable of texts and/or Batches.

    ``dictionary`` (T-Free): the base decode dictionary; default: the special words only (the texts'
    own words are always added). Returns ``(bpb, details)`` with ``bits``, ``bytes``, ``units`` (units
    predicted), ``dictionary_words``, ``text_words_added`` and ``note``."""
    if scoring not in ("likelihood", "score"):
        raise ValueError(f"scoring must be 'likelihood' or 'score', got {scoring!r}")
    if isinstance(data, (str, Batch)):
        data = [data]
    if tokenizer.kind == "tfree" and dictionary is None:
        dictionary = DecodeDictionary.build(tokenizer)
    bits = 0.0
    nbytes = units = added = 0
    for item in data:
        if isinstance(item, str):
            batch, _, _ = _text_batch(tokenizer, item)
        elif isinstance(item, Batch):
            batch = item
        else:
            raise TypeError(f"bits_per_byte takes texts or Batches, got {type(item).__name__}")
        b, n, u, a = _batch_bits(model, tokenizer, batch, dictionary, edge_weight, temperature, scoring=scoring)
        bits, nbytes, units, added = bits + b, nbytes + n, units + u, added + a
    if nbytes == 0:
        raise ValueError("bits per byte: the data has no bytes to predict")
    details: dict[str, Any] = {"bits": bits, "bytes": nbytes, "units": units, "kind": tokenizer.kind}
    if tokenizer.kind == "tfree":
        details.update(dictionary_words=len(dictionary), text_words_added=added, edge_weight=edge_weight,
                       temperature=temperature, scoring=scoring,
                       note="T-Free: p(word) is a softmax over the decode dictionary "
                            f"({scoring}); the evaluated text's own words were added to the dictionary")
        logger.info("bits per byte: %d text words added to the %d-word decode dictionary", added, len(dictionary))
    return bits / nbytes, details


def make_bits_fn(tokenizer: Any, word_counts: Optional[Mapping[str, int]] = None,
                 dictionary: Optional[DecodeDictionary] = None, reduce_to: Optional[int] = None):
    """A ``(model, batch, logits) -> (bits, bytes)`` estimator for the training loop's evaluation (the
    ``BitsFn`` of :mod:`megatron_tfree.training.loop`), for both tokenizer kinds. T-Free: the decode
    dictionary is built once here from ``word_counts`` (optionally reduced to the special words plus
    the ``reduce_to`` most frequent) unless ``dictionary`` is given; each batch's words are added."""
    if tokenizer.kind == "tfree" and dictionary is None:
        dictionary = DecodeDictionary.build(tokenizer, word_counts)
        if reduce_to is not None:
            dictionary = dictionary.reduce_to(reduce_to)

    def bits_fn(model: torch.nn.Module, batch: Batch, logits: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            bits, nbytes, _, _ = _batch_bits(model, tokenizer, batch, dictionary, 1.0, 1.0, logits=logits)
        return bits, float(nbytes)

    return bits_fn


def evaluate_bits_per_byte(model: torch.nn.Module, tokenizer: Any, batches: Iterable[Batch],
                           word_counts: Optional[Mapping[str, int]] = None,
                           dictionary: Optional[DecodeDictionary] = None) -> float:
    """Bits per byte of held-out ``batches`` for the training loop (model put in eval mode for the
    call, its mode restored). T-Free: the dictionary is ``dictionary``, else built from
    ``word_counts`` (training word counts), else the special words; batch words are always added."""
    if tokenizer.kind == "tfree" and dictionary is None:
        dictionary = DecodeDictionary.build(tokenizer, word_counts)
    was_training = model.training
    model.eval()
    try:
        bpb, _ = bits_per_byte(model, tokenizer, batches, dictionary)
    finally:
        model.train(was_training)
    return bpb


__all__ = ["bits_per_byte", "evaluate_bits_per_byte", "make_bits_fn"]
