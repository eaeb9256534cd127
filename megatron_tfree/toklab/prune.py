"""A compact BPE (after Tang et al. 2024, arXiv 2402.02791): keep the frequent tokens, prune the rest.

    pruned = prune_bpe(config, counts.counts, size=4096)        # config: a tokenizer.json as a dict
    pruned.tokenizer_json                                        # the smaller tokenizer.json (a dict)
    pruned.old_ids                                               # new id -> old id (kept ids in old order)
    remap_checkpoint("runs/bpe", pruned, "runs/bpe-4k-init")     # embedding/head rows follow the ids

Every token of a byte-level BPE except the 256 byte symbols (and the unknown token) is made by one
merge of two others. The kept set must stay closed under that: a kept token's two parts are kept, or
the tokenizer could never produce it. So tokens are pruned as *leaves* of the merge tree: repeatedly
the least frequent token (in the counts of ``toklab count``; ties: the later merge first) that no kept
token is made from. Special (added) tokens, the byte symbols and the unknown token are always kept.
The new tokenizer keeps the kept tokens in their old order (ids renumbered from 0), their merges in
their old order, and everything else of the file (pre-tokenizer, decoder, ...); ids named by a
post-processor are renumbered. Any text still encodes (the bytes are all there) and decodes back
exactly; :func:`evaluate` checks the round trip on a corpus and measures coverage (share of the
corpus's tokens that are kept tokens) and the NSL change (tokens after / tokens before).

:func:`remap_checkpoint` writes a checkpoint whose embedding and head rows are the old rows of the
kept tokens (``row new = row old_ids[new]``, exactly), ready for ``training.init_from``.
"""

from __future__ import annotations

import copy
import heapq
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np


@dataclass
class Pruned:
    tokenizer_json: dict[str, Any]
    old_ids: np.ndarray  # [size] new id -> old id
    protected: int  # specials + byte symbols (+ unk) kept whatever their counts

    @property
    def size(self) -> int:
        return len(self.old_ids)

    def hf_tokenizer(self) -> Any:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(json.dumps(self.tokenizer_json))


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def prune_bpe(config: dict[str, Any], counts: np.ndarray, size: int) -> Pruned:
    """Prune the BPE ``config`` (a ``tokenizer.json`` as a dict) to ``size`` ids using the token ``counts``
    (indexed by old id; see the module docstring). Errors say what is wrong with the file or the size."""
    model = config.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"pruning needs a BPE tokenizer, this one's model is {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["content"]: a["id"] for a in config.get("added_tokens", [])}
    V = max([*vocab.values(), *added.values()]) + 1
    if len(counts) != V:
        raise ValueError(f"the counts cover {len(counts)} ids, the tokenizer has {V}: counted with another tokenizer?")
    from .specs import byte_symbols

    symbols = set(byte_symbols().values())
    missing = sorted(symbols - set(vocab))
    if missing:
        raise ValueError(f"not a byte-level BPE: {len(missing)} of the 256 byte symbols are not in the vocabulary "
                         f"(e.g. {missing[0]!r}); pruning could leave texts it cannot encode")
    made_of: dict[int, tuple[int, int]] = {}  # merged token id -> its two parts
    for a, b in _merge_pairs(model):
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ValueError(f"merge {a!r} + {b!r} names a token that is not in the vocabulary")
        made_of.setdefault(vocab[a + b], (vocab[a], vocab[b]))
    protected = set(added.values()) | {vocab[s] for s in symbols}
    if model.get("unk_token") in vocab:
        protected.add(vocab[model["unk_token"]])
    alive = set(range(V))
    unreachable = alive - protected - set(made_of) - set(vocab.values())  # ids in no table: holes
    alive -= unreachable
    if size < len(protected):
        raise ValueError(f"--size {size} is below the {len(protected)} tokens that are always kept (special tokens "
                         f"and the 256 byte symbols)")
    children = np.zeros(V, dtype=np.int64)  # kept tokens made from each token
    for t, (a, b) in made_of.items():
        children[a] += 1
        children[b] += 1
    heap = [(int(counts[t]), -t) for t in alive if t not in protected and children[t] == 0]
    heapq.heapify(heap)
    while len(alive) > size and heap:
        _, neg = heapq.heappop(heap)
        t = -neg
        alive.discard(t)
        for part in set(made_of.get(t, ())):
            children[part] -= 1 if made_of[t].count(part) == 1 else 2
            if children[part] == 0 and part not in protected and part in alive:
                heapq.heappush(heap, (int(counts[part]), -part))
    if len(alive) > size:
        raise ValueError(f"cannot prune to {size}: {len(alive)} tokens remain that others are made of")
    old_ids = np.array(sorted(alive), dtype=np.int64)
    new_id = {int(old): new for new, old in enumerate(old_ids)}
    out = copy.deepcopy(config)
    by_id = {i: t for t, i in vocab.items()}
    out["model"]["vocab"] = {by_id[int(o)]: new_id[int(o)] for o in old_ids if int(o) in by_id}
    out["model"]["merges"] = [m for m, (a, b) in zip(model.get("merges", []), _merge_pairs(model))
                              if vocab[a + b] in alive]
    out["added_tokens"] = [{**a, "id": new_id[a["id"]]} for a in config.get("added_tokens", [])]
    _renumber_post_processor(out.get("post_processor"), new_id)
    return Pruned(out, old_ids, len(protected))


def _renumber_post_processor(pp: Any, new_id: dict[int, int]) -> None:
    """Renumber the ids a post-processor names (TemplateProcessing's special tokens; nested sequences)."""
    if not isinstance(pp, dict):
        return
    for child in pp.get("processors", []) or []:
        _renumber_post_processor(child, new_id)
    for token in (pp.get("special_tokens") or {}).values():
        token["ids"] = [new_id[i] for i in token.get("ids", [])]
    for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
        if isinstance(pp.get(key), list) and len(pp[key]) == 2:
            pp[key][1] = new_id[pp[key][1]]


@dataclass
class PruneReport:
    size: int
    old_size: int
    coverage: float  # share of the counted corpus tokens that are kept tokens
    nsl: float  # tokens with the pruned tokenizer / tokens with the original, on the corpus
    documents: int  # round trip checked on these

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate(original: Any, pruned: Pruned, counts: np.ndarray, texts: Sequence[str] | Any,
             progress: bool = False) -> PruneReport:
    """Coverage, NSL change and the round trip of ``pruned`` on ``texts`` (``original``: a BpeSpec)."""
    import tempfile

    from .specs import BpeSpec
    from .train import check_round_trip

    texts = list(texts)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        path.write_text(json.dumps(pruned.tokenizer_json), encoding="utf-8")
        new = BpeSpec(path)
        n = check_round_trip(new.tokenizer, iter(texts), progress)
        after = new.measure(texts).units
    before = original.measure(texts).units
    coverage = float(counts[pruned.old_ids].sum() / max(counts.sum(), 1))
    return PruneReport(pruned.size, len(counts), coverage, after / max(before, 1), n)


def remap_checkpoint(checkpoint: str | os.PathLike, pruned: Pruned, out: str | os.PathLike,
                     original_vocab: Optional[dict[str, int]] = None, overwrite: bool = False,
                     progress: bool = False) -> Path:
    """``checkpoint`` (a classic model of the unpruned tokenizer, any layout) with its embedding and head
    reduced to the kept rows, and the pruned tokenizer: a checkpoint for ``training.init_from``.
    ``original_vocab``: the unpruned tokenizer's vocabulary, checked against the checkpoint's."""
    from megatron_tfree.checkpoint import CheckpointReader
    from megatron_tfree.tokenizer.classic import ClassicTokenizer

    from .rewrite import vocab_rows, write_checkpoint

    reader = CheckpointReader(checkpoint)
    if reader.kind != "classic":
        raise ValueError(f"{reader.tag_dir}: a {reader.kind} model; pruning remaps a classic model's rows")
    theirs = reader.tokenizer.hf_tokenizer.get_vocab(with_added_tokens=True)
    if original_vocab is not None and theirs != original_vocab:
        raise ValueError(f"{reader.tag_dir}: the checkpoint's tokenizer is not the one that was pruned (their "
                         f"vocabularies differ: {len(theirs)} vs {len(original_vocab)} entries)")
    if reader.tokenizer.vocab_size <= int(pruned.old_ids.max()):
        raise ValueError(f"{reader.tag_dir}: the model has {reader.tokenizer.vocab_size} rows, the pruned tokenizer "
                         f"keeps old id {int(pruned.old_ids.max())}")
    tokenizer = ClassicTokenizer(pruned.hf_tokenizer(), end_of_text=reader.tokenizer.end_of_text)
    index = np.asarray(pruned.old_ids)
    rows = {name: t[index] for name, t in vocab_rows(reader).items()}
    return write_checkpoint(reader, out, tokenizer, rows, {"toklab": "prune", "kept": pruned.size,
                                                           "of": reader.tokenizer.vocab_size},
                            overwrite=overwrite, progress=progress)
