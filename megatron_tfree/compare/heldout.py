"""Held-out evaluation of one trained arm on fixed passages of the held-out split.

:func:`passages`: ``count`` passages of at most ``max_bytes`` bytes (whole lines; a line that alone is
longer is left out), evenly spread over the held-out documents, the same for every arm.

:func:`evaluate`, for one checkpoint (:class:`megatron_tfree.inference.InferencePipe`):

* ``bits_per_byte``: :func:`megatron_tfree.inference.bpb.bits_per_byte` of the passages (each passage
  one document after ``<|endoftext|>``; every byte predicted once). For T-Free, p(word) is the calibrated
  softmax over a decode dictionary: here the checkpoint's dictionary (every word seen in training) plus
  each passage's own words, as generation and lm-eval use it. ``bits_per_byte_heldout_dictionary`` uses
  only the passages' words instead, the convention of the trainer's held-out curve (fewer candidates,
  so lower); for BPE both are the plain cross-entropy.
* ``next_word``: :mod:`.next_word` (greedy exact-match of the next whitespace word).
* ``generations``: greedy completions of the prompts (``words`` units; see :meth:`InferencePipe.generate`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from megatron_tfree.data.memory_map import MemoryMap


def passages(valid_prefix: str, count: int, max_bytes: int) -> list[str]:
    """Fixed held-out passages (see the module docstring)."""
    mm = MemoryMap(valid_prefix)
    chunks: list[str] = []
    for i in range(len(mm)):
        lines = mm.document_bytes(i).decode("utf-8", errors="replace").splitlines(keepends=True)
        current, size = [], 0
        for line in lines + [None]:
            n = len(line.encode("utf-8")) if line is not None else 0
            if line is None or size + n > max_bytes:
                text = "".join(current).strip()
                if len(text.split()) >= 8:  # at least a few words: headers and blank stretches are left out
                    chunks.append(text)
                current, size = [], 0
            if line is not None and n <= max_bytes:
                current.append(line)
                size += n
    if not chunks:
        raise ValueError(f"{valid_prefix}: no held-out passage of at most {max_bytes} bytes with 8 words or more")
    if len(chunks) <= count:
        return chunks
    return [chunks[round(i * (len(chunks) - 1) / max(1, count - 1))] for i in range(count)]


def evaluate(run_dir: str | Path, texts: list[str], prompts: list[str], words: int) -> dict[str, Any]:
    """The held-out figures of the checkpoint in ``run_dir`` (see the module docstring)."""
    from megatron_tfree.inference import InferencePipe
    from megatron_tfree.inference.bpb import bits_per_byte
    from megatron_tfree.tokenizer.dictionary import DecodeDictionary

    from .next_word import next_word_accuracy

    pipe = InferencePipe.from_checkpoint(run_dir)
    tok, model = pipe.tokenizer, pipe.model
    lengths = [len(tok.encode(t).units) for t in texts]
    bpb, details = bits_per_byte(model, tok, texts, dictionary=pipe.dictionary)
    out: dict[str, Any] = {"bits_per_byte": bpb, "bytes": details["bytes"], "units": details["units"],
                           "passages": len(texts), "longest_passage_units": max(lengths),
                           "seq_len": pipe.trained_length}
    if tok.kind == "tfree":
        held = DecodeDictionary.build(tok, Counter(u for t in texts for u in tok.encode(t).units))
        out["bits_per_byte_heldout_dictionary"] = bits_per_byte(model, tok, texts, dictionary=held)[0]
        out["dictionary_words"] = details["dictionary_words"]
    else:
        out["bits_per_byte_heldout_dictionary"] = bpb
    out["next_word"] = next_word_accuracy(pipe, texts)
    completions = pipe.generate(list(prompts), max_words=words, temperature=0.0) if prompts else []
    out["generations"] = dict(zip(prompts, completions))
    out["generation_units"] = words
    return out
