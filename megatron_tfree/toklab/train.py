"""Train a byte-level BPE tokenizer: a vocabulary size, a pre-tokenisation preset, a data mix.

    tok = train_bpe(parse_corpus("default"), vocab_size=8192, preset="gpt4")
    tok.save("bpe-8k-gpt4.json")

The model is Hugging Face ``tokenizers``' BPE over the 256 byte symbols (so every text can be encoded),
without normaliser, with ``<|endoftext|>`` (and any extra special tokens) added; the decoder is
byte-level. After training, every document of the corpus is encoded and decoded again (in batches):
a tokenizer that does not give back the exact text is an error naming the first differing document.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from tqdm import tqdm

from .presets import pre_tokenizer
from .sources import Source, batches, mix

END_OF_TEXT = "<|endoftext|>"


def check_round_trip(tokenizer: Any, texts: Iterator[str], progress: bool = False) -> int:
    """Encode and decode every text (batched); raise ValueError naming the first text that does not come
    back exactly; returns the number checked."""
    n = 0
    for batch in tqdm(batches(texts, 16), desc="round trip", unit="batch", disable=not progress, leave=False):
        encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: several times faster
        encodings = encode(batch, add_special_tokens=False)
        decoded = tokenizer.decode_batch([e.ids for e in encodings], skip_special_tokens=False)
        for i, (text, back) in enumerate(zip(batch, decoded)):
            if text != back:
                at = next((j for j, (a, b) in enumerate(zip(text, back)) if a != b), min(len(text), len(back)))
                raise ValueError(f"the tokenizer does not round-trip document {n + i}: first difference at character "
                                 f"{at} ({text[max(0, at - 20):at + 20]!r} came back as {back[max(0, at - 20):at + 20]!r})")
        n += len(batch)
    return n


def train_bpe(sources: Sequence[Source], vocab_size: int, preset: Optional[str] = "gpt4", regex: Optional[str] = None,
              weights: Optional[Sequence[float]] = None, total_chars: Optional[int] = None,
              special_tokens: Sequence[str] = (), min_frequency: int = 2, progress: bool = False) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens (see the module docstring); ``weights`` / ``total_chars``:
    the data mix of ``sources`` by characters (:func:`.sources.mix`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [END_OF_TEXT] + [s for s in special_tokens if s != END_OF_TEXT]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"--vocab-size must cover the 256 bytes and {len(specials)} special tokens, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer(preset if regex is None else None, regex)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(mix(sources, weights, total_chars), trainer)
    check_round_trip(tok, mix(sources, weights, total_chars), progress)
    return tok
