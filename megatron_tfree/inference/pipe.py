"""InferencePipe: next-unit logits and text generation for T-Free and classic GPT models.

    pipe = InferencePipe.from_checkpoint("runs/tiny")           # save dir (with `latest`) or tag dir
    pipe = InferencePipe(model, tokenizer, dictionary=None)      # or from objects
    pipe.logits("Hello World")                                   # [n_units, v] head outputs
    pipe.generate("Hello", max_words=8)                          # -> " World!"
    pipe.generate(["Hello", "Once upon a"], max_words=8)         # batched -> list of completions

T-Free decoding (spec section 4): the head's ``[v]`` logits of the last position are scored against
the decode dictionary (:class:`~megatron_tfree.tokenizer.dictionary.DecodeDictionary`); the chosen
word is fed back as the next input. Per call, each prompt's own words and ``more_words`` join the
dictionary *of that row only* (a new extended dictionary; the base is never modified), so a batched
call equals row-by-row calls. Classic models choose over the vocabulary, with the same API.

Batching: prompts are left-padded (``padding="left"``, default) or right-padded. Padding positions get
document id -1, so the block-causal mask hides them from every real position, and each row's
positions run 0..L-1 over its own units; new positions continue per row. Greedy batched generation is
therefore exactly the row-by-row result. With ``use_kv_cache`` (default) the prompt is prefilled once
and each step runs one position per row; without it every step recomputes the whole sequence.

Sampling: ``temperature == 0`` is greedy (ties: the first word). Otherwise the choice is drawn from
``softmax(score / temperature)``, restricted to the ``top_k`` best when given, with a torch generator
seeded by ``seed``. Note the T-Free scores lie in about [-1, 1], so temperature 1 is close to uniform
over the dictionary; useful temperatures are small (e.g. 0.01-0.1).

Stopping: at ``<|endoftext|>`` (not part of the returned text) or after a stop word (included, like
the reference). Stop words are given as text; each must be a single unit (``"\\n"`` is the word
``<|\\n|>``). The returned text is the completion only: ``decode(prompt + new) - decode(prompt)``.
An empty prompt starts from ``<|endoftext|>`` (the context that precedes every document).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..checkpoint import CheckpointReader
from ..model.gpt import make_input_batch
from ..tokenizer.dictionary import DecodeDictionary
from . import loading

logger = logging.getLogger(__name__)
LONG_PROMPT_FACTOR = 4  # warn when a generation spans more than this many training lengths


class InferencePipe:
    """A model, its tokenizer and (T-Free) the base decode dictionary; see the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, dictionary: Optional[DecodeDictionary] = None,
                 word_counts=None, trained_length: Optional[int] = None):
        self.trained_length = trained_length  # the training sequence length (data.seq_len), when known
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.kind = tokenizer.kind
        self.device = next(model.parameters()).device
        self.dictionary: Optional[DecodeDictionary] = None
        if self.kind == "tfree":
            if dictionary is None:
                dictionary = DecodeDictionary.build(tokenizer, word_counts)  # special words at least
            if dictionary.vocab_size != tokenizer.vocab_size:
                raise ValueError(f"dictionary vocab_size {dictionary.vocab_size} != tokenizer {tokenizer.vocab_size}")
            self.dictionary = dictionary.attach(tokenizer)
        self._reduced: dict[int, DecodeDictionary] = {}
        self._eot = tokenizer.end_of_text

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", word_counts: Optional[str | Path] = None,
                        allow_pickle: bool = False) -> "InferencePipe":
        """Load config, tokenizer, weights (any layout, :class:`~megatron_tfree.checkpoint.CheckpointReader`)
        and the decode dictionary (stored one, else built from the checkpoint's ``word_counts.json`` plus
        ``word_counts``) of a run dir, tag dir or consolidated / imported directory."""
        reader = CheckpointReader(path)
        model = reader.load_model(device)
        dictionary = loading.checkpoint_dictionary(reader.tag_dir, reader.tokenizer, word_counts, allow_pickle)
        return cls(model, reader.tokenizer, dictionary, trained_length=reader.cfg.data.seq_len)

    # ------------------------------------------------------------------ units and forward
    def units(self, text: str) -> list[str]:
        """The units (words / token strings) of ``text``."""
        return self.tokenizer.encode(text).units

    def _unit_ids(self, units: Sequence[str]) -> list[np.ndarray]:
        ids = self.tokenizer.encode_units(list(units))
        return [ids.row(i) for i in range(len(ids))]

    def _forward(self, rows: list[list[np.ndarray]], positions: np.ndarray, documents: np.ndarray,
                 cache=None) -> torch.Tensor:
        """Logits ``[B, S, v]`` (float32) of ``rows[b][s]`` id arrays at the given positions/documents."""
        flat = [r for row in rows for r in row]
        offsets = np.zeros(len(flat) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in flat], out=offsets[1:])
        ids = np.concatenate(flat).astype(np.int64) if offsets[-1] else np.zeros(0, np.int64)
        dev = self.device
        batch = make_input_batch(torch.from_numpy(offsets).to(dev), torch.from_numpy(ids).to(dev),
                                 torch.from_numpy(positions).to(dev), torch.from_numpy(documents).to(dev))
        return self.model(batch, kv_cache=cache).float()

    @torch.no_grad()
    def logits(self, text: str) -> torch.Tensor:
        """Head outputs ``[n_units, v]`` (float32, CPU): row ``t`` predicts unit ``t + 1``."""
        units = self.units(text)
        if not units:
            raise ValueError("logits: the text has no units")
        return self.unit_logits(units)

    @torch.no_grad()
    def unit_logits(self, units: Sequence[str]) -> torch.Tensor:
        """Head outputs ``[len(units), v]`` (float32, CPU) of a unit sequence (one document, positions 0..)."""
        rows = self._unit_ids(units)
        n = len(rows)
        out = self._forward([rows], np.arange(n, dtype=np.int64)[None], np.zeros((1, n), dtype=np.int64))
        return out[0].cpu()

    def _padded(self, seqs: list[list[np.ndarray]], padding: str) -> tuple[list[list[np.ndarray]], np.ndarray, np.ndarray]:
        """Pad unit-id sequences to one length: pads get the end-of-text ids, document -1, position 0."""
        width = max(len(s) for s in seqs)
        pad = self._unit_ids([self._eot])[0]
        rows, pos, doc = [], np.zeros((len(seqs), width), np.int64), np.full((len(seqs), width), -1, np.int64)
        for b, s in enumerate(seqs):
            k = width - len(s)
            start = k if padding == "left" else 0
            rows.append([pad] * k + s if padding == "left" else s + [pad] * k)
            pos[b, start : start + len(s)] = np.arange(len(s))
            doc[b, start : start + len(s)] = 0
        return rows, pos, doc

    # ------------------------------------------------------------------ choosing
    def _row_dictionaries(self, base: DecodeDictionary, prompts_units: list[list[str]],
                          more_words) -> list[DecodeDictionary]:
        """Per row: the words ``base.add_words(prompt words + more_words)`` adds, as its own dictionary."""
        extra: list[str] = []
        if more_words:
            for text in [more_words] if isinstance(more_words, str) else more_words:
                extra.extend(self.units(text))
        return [base.add_words(list(u) + extra).added_since(base) for u in prompts_units]

    @staticmethod
    def _choose(scores: torch.Tensor, temperature: float, top_k: Optional[int], generator) -> int:
        """Index chosen from one row of scores (greedy, or sampled from the tempered softmax)."""
        if temperature == 0:
            return int(torch.argmax(scores))
        s = scores.double() / temperature
        if top_k is not None and top_k < s.numel():
            kth = torch.topk(s, top_k).values[-1]
            s = torch.where(s >= kth, s, torch.full_like(s, float("-inf")))
        probs = torch.softmax(s, dim=0)
        return int(torch.multinomial(probs, 1, generator=generator))

    def _stop_units(self, stop_words: Optional[Iterable[str]]) -> set:
        out = set()
        for text in stop_words or ():
            if self.kind == "classic":
                out.add(text)  # compared with each new token's decoded text
                continue
            units = self.units(text)
            if len(units) != 1:
                raise ValueError(f"stop word {text!r} is {len(units)} words {units}; give single words")
            out.add(units[0])
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt: str | Sequence[str], max_words: int = 16, more_words=None, reduce_to: Optional[int] = None,
                 edge_weight: float = 1.0, temperature: float = 0.0, top_k: Optional[int] = None,
                 seed: Optional[int] = None, stop_words: Optional[Iterable[str]] = None, padding: str = "left",
                 use_kv_cache: bool = True) -> str | list[str]:
        """Complete ``prompt`` (a str, or a list of str for a batch) by up to ``max_words`` units."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompt must be a str or a non-empty list of str")
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
        if temperature < 0 or not isinstance(max_words, int) or max_words < 0:
            raise ValueError("temperature must be >= 0 and max_words a non-negative int")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        units = [self.units(p) or [self._eot] for p in prompts]
        longest = max(len(u) for u in units) + max_words
        if self.trained_length and longest > LONG_PROMPT_FACTOR * self.trained_length:
            logger.warning("the prompt and completion span %d units, %.0fx the %d the model was trained on: later "
                           "positions were never trained, and every step attends to all of them (slow)",
                           longest, longest / self.trained_length, self.trained_length)
        base, row_dicts = None, None
        if self.kind == "tfree":
            base = self.dictionary
            if reduce_to is not None:
                if reduce_to not in self._reduced:
                    self._reduced[reduce_to] = base.reduce_to(reduce_to)
                base = self._reduced[reduce_to]
            row_dicts = self._row_dictionaries(base, units, more_words)
        stops = self._stop_units(stop_words)

        B = len(prompts)
        seqs = [self._unit_ids(u) for u in units]
        lengths = [len(s) for s in seqs]
        new: list[list[str | int]] = [[] for _ in range(B)]
        done = [False] * B
        cache = self.model.new_kv_cache() if use_kv_cache else None
        for step in range(max_words):
            if step == 0 or not use_kv_cache:
                rows, pos, doc = self._padded(seqs, padding)
                logits = self._forward(rows, pos, doc, cache)
                if padding == "left":
                    last = logits[:, -1]
                else:
                    last = logits[torch.arange(B), torch.as_tensor([len(s) - 1 for s in seqs])]
            else:
                pos = np.asarray([[len(s) - 1] for s in seqs], dtype=np.int64)
                last = self._forward([[s[-1]] for s in seqs], pos, np.zeros((B, 1), np.int64), cache)[:, -1]
            base_scores = base.score(last, edge_weight) if base is not None else None
            for b in range(B):
                if done[b]:
                    seqs[b].append(seqs[b][-1])  # keep rows aligned; ignored
                    continue
                if base is None:
                    j = self._choose(last[b], temperature, top_k, generator)
                    unit, ids = j, np.asarray([j], dtype=np.int32)
                    finished = self.tokenizer.hf_tokenizer.id_to_token(j) == self._eot
                    is_stop = self.tokenizer.decode_ids([j]) in stops
                else:
                    extra = row_dicts[b]
                    scores = torch.cat([base_scores[b], extra.score(last[b : b + 1], edge_weight)[0]])
                    j = self._choose(scores, temperature, top_k, generator)
                    unit = base.word(j) if j < len(base) else extra.word(j - len(base))
                    ids = self._unit_ids([unit])[0]
                    finished = unit == self._eot
                    is_stop = unit in stops
                seqs[b].append(ids)
                if finished:
                    done[b] = True
                    continue
                new[b].append(unit)
                done[b] = is_stop
            if all(done):
                break
        texts = [self._completion(units[b], new[b], lengths[b]) for b in range(B)]
        return texts[0] if single else texts

    def _completion(self, prompt_units: list[str], new: list, n_prompt: int) -> str:
        """The text the new units add after the prompt's text."""
        if not new:
            return ""
        if self.kind == "tfree":
            before, full = self.tokenizer.decode(prompt_units), self.tokenizer.decode(prompt_units + new)
        else:
            ids = self.tokenizer.encode_units(prompt_units).indices.tolist()
            before, full = self.tokenizer.decode_ids(ids), self.tokenizer.decode_ids(ids + list(new))
        if not full.startswith(before):  # cannot happen for T-Free; byte-level BPE mid-character
            return self.tokenizer.decode(new) if self.kind == "tfree" else self.tokenizer.decode_ids(list(new))
        return full[len(before):]


__all__ = ["InferencePipe"]
