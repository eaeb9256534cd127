"""Token frequencies of a corpus under one BPE tokenizer (``toklab count``), parallel and resumable.

    counts = count_tokens("bpe-8k.json", ["default"], "counts.json", workers=2)
    merged = merge_counts(["part1.json", "part2.json"], "counts.json")

The corpus is cut into shards (:class:`~.sources.Shard`: a text file, or about 8 MB of a MemoryMap's
documents); worker processes count shards independently (text: encoded the fast exact way of
:meth:`~.specs.BpeSpec.measure`; a MemoryMap of token ids: its ids counted directly, checked against
the vocabulary). After each shard the running totals and the finished shard keys are written
atomically to ``OUT.progress.json``; a rerun with the same tokenizer and corpora skips the finished
shards (a different tokenizer or corpus is an error naming both). The result, ``OUT``:

    {"format": "megatron_tfree.toklab.counts", "version": 1, "tokenizer": path, "tokenizer_sha256": ...,
     "vocab_size": V, "corpora": [...], "shards": n, "documents": ..., "bytes": ..., "tokens": ...,
     "counts": [V integers]}

Counts of the same tokenizer merge by addition (:func:`merge_counts`, ``toklab count --merge``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from megatron_tfree.checkpoint.files import write_atomic

from .sources import Shard, parse_corpus

FORMAT = "megatron_tfree.toklab.counts"
VERSION = 1


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class Counts:
    """Token counts of a corpus (see the module docstring for the file)."""

    tokenizer: str
    tokenizer_sha256: str
    vocab_size: int
    corpora: list[str] = field(default_factory=list)
    shards: int = 0
    documents: int = 0
    bytes: int = 0
    tokens: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "tokenizer": self.tokenizer,
                "tokenizer_sha256": self.tokenizer_sha256, "vocab_size": self.vocab_size, "corpora": self.corpora,
                "shards": self.shards, "documents": self.documents, "bytes": self.bytes, "tokens": self.tokens,
                "counts": self.counts.tolist()}

    @classmethod
    def read(cls, path: str | os.PathLike) -> "Counts":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"counts file {path} does not exist (write one with `toklab count`)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a toklab counts file ('format' is not {FORMAT!r})")
        counts = np.asarray(data["counts"], dtype=np.int64)
        if counts.shape != (data["vocab_size"],) or (counts < 0).any():
            raise ValueError(f"{path}: 'counts' must be {data['vocab_size']} non-negative integers")
        return cls(data["tokenizer"], data["tokenizer_sha256"], data["vocab_size"], list(data["corpora"]),
                   data["shards"], data["documents"], data["bytes"], data["tokens"], counts)

    def add(self, other: "Counts") -> None:
        self.shards += other.shards
        self.documents += other.documents
        self.bytes += other.bytes
        self.tokens += other.tokens
        self.counts = self.counts + other.counts


# ---------------------------------------------------------------------------------------- workers
_SPEC: Any = None  # the worker process's tokenizer


def _init_worker(tokenizer_path: str) -> None:
    global _SPEC
    import warnings

    from .specs import BpeSpec

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the parent already warned about a slow tokenizer once
        _SPEC = BpeSpec(tokenizer_path)


def _count_shard(shard: Shard) -> tuple[str, int, int, int, np.ndarray]:
    """(key, documents, bytes, tokens, counts) of one shard, in a worker."""
    V = _SPEC.vocab_size
    if shard.tokenised():
        counts = np.zeros(V, dtype=np.int64)
        docs = 0
        for i, ids in enumerate(shard.ids(), start=shard.start):
            if len(ids) and int(ids.max()) >= V:
                raise ValueError(f"{shard.path}: document {i} holds id {int(ids.max())}, outside the tokenizer's "
                                 f"{V} ids ({_SPEC.path}); counted with another tokenizer?")
            counts += np.bincount(ids.astype(np.int64), minlength=V)
            docs += 1
        return shard.key, docs, 0, int(counts.sum()), counts  # the text's bytes are unknown
    documents = 0

    def docs() -> Iterator[str]:
        nonlocal documents
        for d in shard.documents():
            documents += 1
            yield d

    tally = _SPEC.measure(docs())
    return shard.key, documents, tally.bytes, tally.units, tally.id_counts


# ---------------------------------------------------------------------------------------- driver
def _progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.json")


def count_tokens(tokenizer: str | os.PathLike, corpora: Sequence[str], out: str | os.PathLike,
                 workers: int = 1, progress: bool = True) -> Counts:
    """Count ``tokenizer``'s ids over ``corpora`` (corpus SPECs) into ``out`` (see the module docstring)."""
    from tqdm import tqdm

    from .specs import BpeSpec

    out = Path(out)
    spec = BpeSpec(tokenizer)  # validates the file (and warns once if measuring is slow)
    sha = file_sha256(spec.path)
    shards = [shard for c in corpora for source in parse_corpus(c) for shard in source.shards]
    total = Counts(str(spec.path), sha, spec.vocab_size, list(corpora),
                   counts=np.zeros(spec.vocab_size, dtype=np.int64))
    done: set[str] = set()
    state = _progress_path(out)
    if state.is_file():
        saved = json.loads(state.read_text(encoding="utf-8"))
        if saved.get("tokenizer_sha256") != sha or saved.get("corpora") != list(corpora):
            raise ValueError(f"{state}: an unfinished count of another tokenizer or corpus ({saved.get('tokenizer')}, "
                             f"{saved.get('corpora')}); remove it to start over")
        done = set(saved["done"])
        total.shards, total.documents, total.bytes, total.tokens = (saved["shards"], saved["documents"],
                                                                     saved["bytes"], saved["tokens"])
        total.counts = np.asarray(saved["counts"], dtype=np.int64)
    todo = [s for s in shards if s.key not in done]
    out.parent.mkdir(parents=True, exist_ok=True)

    def checkpoint() -> None:
        write_atomic(state, json.dumps({**total.to_json(), "done": sorted(done)}))

    bar = tqdm(total=len(shards), initial=len(shards) - len(todo), desc="counting", unit="shard",
               disable=not progress, dynamic_ncols=True)
    last = time.monotonic()
    with _pool(workers, spec) as imap:
        for key, docs, nbytes, tokens, counts in imap(_count_shard, todo):
            total.add(Counts("", "", 0, [], 1, docs, nbytes, tokens, counts))
            done.add(key)
            bar.update(1)
            if time.monotonic() - last > 5.0:
                checkpoint()
                last = time.monotonic()
    bar.close()
    write_atomic(out, json.dumps(total.to_json()) + "\n")
    state.unlink(missing_ok=True)
    return total


class _pool:
    """``imap_unordered`` over worker processes (``workers > 1``, fork) or in this process."""

    def __init__(self, workers: int, spec: Any):
        self.workers, self.spec, self._pool = workers, spec, None

    def __enter__(self):
        global _SPEC
        if self.workers <= 1:
            _SPEC = self.spec
            return lambda fn, items: map(fn, items)
        import multiprocessing

        self._pool = multiprocessing.get_context("fork").Pool(self.workers, _init_worker, (str(self.spec.path),))
        return lambda fn, items: self._pool.imap_unordered(fn, items)

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate() if exc[0] is not None else self._pool.close()
            self._pool.join()


def merge_counts(paths: Sequence[str | os.PathLike], out: Optional[str | os.PathLike] = None) -> Counts:
    """The sum of counts files of one tokenizer (written to ``out`` if given); another tokenizer is an error
    naming both files."""
    if not paths:
        raise ValueError("merge_counts: no counts files given")
    first = Counts.read(paths[0])
    merged = Counts(first.tokenizer, first.tokenizer_sha256, first.vocab_size,
                    counts=np.zeros(first.vocab_size, dtype=np.int64))
    for path in paths:
        part = Counts.read(path)
        if part.tokenizer_sha256 != first.tokenizer_sha256:
            raise ValueError(f"{path} counts tokenizer {part.tokenizer}, {paths[0]} counts {first.tokenizer}: "
                             f"counts of different tokenizers do not add up")
        merged.corpora += [c for c in part.corpora if c not in merged.corpora]
        merged.add(part)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(merged.to_json()) + "\n")
    return merged
