"""Word-level next-word accuracy: the same figure for T-Free and BPE models.

A *word* is a whitespace-separated word of the text (as the tokenizer lab counts words), with the single
space before it when there is one (`` king``). Word ``w`` of a passage (not the first; followed by
whitespace) counts as predicted when greedy decoding from the text before it (after ``<|endoftext|>``, the
boundary every training document follows, as bits per byte and lm-eval score a text) reproduces it and
then ends it:

* every unit that covers a byte of ``w`` is the model's top choice given the true units before it (the
  units are the tokenizer's encoding of the passage, each unit's bytes as
  :func:`megatron_tfree.data.unit_bytes.unit_byte_counts` counts them: a T-Free word carries the space
  before it, a BPE token its own bytes), and
* the word ends there: the last of those units reaches past ``w`` into the whitespace after it, or the
  model's top choice for the unit after it starts with whitespace (or ends the text).

Top choice: BPE, the arg-max of the logits; T-Free, the arg-max of the decode scores (spec section 4,
:meth:`~megatron_tfree.tokenizer.dictionary.DecodeDictionary.score`) over the checkpoint's decode
dictionary plus the passage's words that occur before the word, exactly what
:meth:`InferencePipe.generate` chooses from after that prompt (ties: the dictionary's word first).
Teacher forcing with all units right is the same as greedy decoding reproducing them, so one forward
pass per passage scores all its words; where the top choice differs from the true unit but its text is a
prefix of the word's remaining text (another segmentation of the same text), the word is decoded
greedily (:meth:`InferencePipe.generate`) to decide.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np
import torch

from megatron_tfree.data.unit_bytes import unit_byte_counts

_WORD = re.compile(r"\S+")


def _byte_offsets(text: str) -> np.ndarray:
    """UTF-8 byte offset of every character position ``0..len(text)``."""
    lengths = np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64, count=len(text))
    return np.concatenate([[0], np.cumsum(lengths)])


class _TFreeChooser:
    """The top word of a row given the words the prompt had: the base dictionary's best, unless a passage
    word first seen before the prompt's end scores higher (a tie goes to the base, as in generation)."""

    def __init__(self, pipe: Any, logits: torch.Tensor, units: list[str]):
        base = pipe.dictionary
        self.base_words = base.words
        best = base.score(logits).max(dim=1)
        self.base_value, self.base_index = best.values, best.indices
        ext = base.add_words(units)
        self.extra = ext.added_since(base) if ext is not base else None
        if self.extra is not None:
            seen: dict[str, int] = {}
            for i, u in enumerate(units):
                seen.setdefault(u, i)
            self.extra_words = self.extra.words
            self.first = torch.as_tensor([seen.get(w, len(units)) for w in self.extra_words])
            self.extra_scores = self.extra.score(logits)

    def __call__(self, row: int, prompt_units: int) -> str:
        word = self.base_words[int(self.base_index[row])]
        if self.extra is None:
            return word
        allowed = self.first < prompt_units
        if bool(allowed.any()):
            scores = self.extra_scores[row].masked_fill(~allowed, float("-inf"))
            j = int(scores.argmax())
            if scores[j] > self.base_value[row]:
                return self.extra_words[j]
        return word


def greedy_reproduces(pipe: Any, prompt: str, target: str, units: int) -> bool:
    """Whether greedy decoding after ``<|endoftext|>`` + ``prompt`` produces ``target`` and then ends the word
    (within ``units`` units)."""
    gen = pipe.generate(pipe.tokenizer.end_of_text + prompt, max_words=units, temperature=0.0)
    return gen.startswith(target) and (len(gen) == len(target) or gen[len(target)].isspace())


@torch.no_grad()
def passage_hits(pipe: Any, text: str) -> tuple[int, int]:
    """``(words predicted, words scored)`` of one passage (see the module docstring)."""
    tok = pipe.tokenizer
    units = tok.encode(text).units
    n = len(units)
    if n == 0:
        return 0, 0
    eot = tok.end_of_text
    logits = pipe.unit_logits([eot] + units)  # row j predicts units[j]; row n the unit after the passage
    sizes = unit_byte_counts(tok, units, [None] + units[:-1])
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if tok.kind == "tfree":
        choose = _TFreeChooser(pipe, logits, units)

        def right(j: int, prompt: int) -> bool:  # the top choice after units[:j] is units[j]
            return choose(j, prompt) == units[j]

        def added(j: int, prompt: int) -> Optional[bytes]:  # the text the top choice after units[:j] adds
            w = choose(j, prompt)
            if w == eot:
                return None
            before = tok.decode(units[j - 1:j]) if j else ""
            return tok.decode(units[j - 1:j] + [w])[len(before):].encode("utf-8")
    else:
        from megatron_tfree.toklab.specs import vocab_bytes

        top = logits.argmax(dim=1).tolist()
        ids = tok.encode_units(units).indices.tolist()
        eot_id = tok.hf_tokenizer.token_to_id(eot)
        token_bytes = vocab_bytes(tok.hf_tokenizer)

        def right(j: int, prompt: int) -> bool:
            return top[j] == ids[j]

        def added(j: int, prompt: int) -> Optional[bytes]:
            return None if top[j] == eot_id else token_bytes[top[j]]

    data = text.encode("utf-8")
    at = _byte_offsets(text)
    hits = scored = 0
    for k, m in enumerate(_WORD.finditer(text)):
        start, end = int(at[m.start()]), int(at[m.end()])
        if k == 0 or end >= len(data):
            continue  # the first word has no text before it, the last none after it
        if m.start() and text[m.start() - 1] == " ":
            start -= 1  # " word": the space before the word is predicted with it
        a = int(np.searchsorted(ends, start, side="right"))  # first unit reaching past the word's start
        b = int(np.searchsorted(ends, end, side="left"))  # the unit holding the word's last byte
        if b >= n:
            continue
        scored += 1
        wrong = next((j for j in range(a, b + 1) if not right(j, a)), None)
        if wrong is None:  # teacher forcing = greedy decoding: every unit reproduced; does the word end?
            after = added(b + 1, a)
            hits += bool(ends[b] > end or after is None or after[:1].isspace())
            continue
        choice = added(wrong, a)
        if choice is not None and data[starts[wrong]:end + 1].startswith(choice):
            # another segmentation of the same text (a non-canonical BPE split, a zero-width marker): decode it
            try:
                prompt, target = data[:starts[a]].decode("utf-8"), data[starts[a]:end].decode("utf-8")
            except UnicodeDecodeError:
                continue
            hits += greedy_reproduces(pipe, prompt, target, 3 * (b - a + 1) + 3)
    return hits, scored


def next_word_accuracy(pipe: Any, texts: list[str]) -> dict[str, Any]:
    """``{"accuracy", "words"}`` over ``texts``."""
    hits = scored = 0
    for text in texts:
        h, s = passage_hits(pipe, text)
        hits, scored = hits + h, scored + s
    return {"accuracy": hits / scored if scored else None, "words": scored, "hits": hits}
