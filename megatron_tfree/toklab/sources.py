"""Corpora for the tokenizer lab: named sources of documents.

A corpus SPEC (``--corpus``) is one of

* ``default``: the built-in corpus (the complete works of Shakespeare, fetched once; :mod:`megatron_tfree.data.corpus`);
* ``multilingual``: the bundled probe, one source per language: ``en``, ``de``, ``ru``, ``vi``, ``ar``,
  ``zh`` and ``code`` (``probe/*.txt``: the same 25 everyday sentences, written for this project, in each
  language, and a page of Python, C, SQL and JavaScript);
* ``[NAME=]PATH``: a ``.txt`` file, a directory (its ``*.txt`` files, recursively) or a MemoryMap prefix
  (``PATH.meta.json`` exists); the name defaults to the file or directory name.

:func:`mix` draws documents from several sources up to a character budget per source (a data mix such
as 70% text / 30% code).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

PROBE_DIR = Path(__file__).resolve().parent / "probe"
PROBE_LANGUAGES = ("en", "de", "ru", "vi", "ar", "zh", "code")


SHARD_BYTES = 8 << 20  # a MemoryMap is read in parts of about this many bytes of documents


@dataclass(frozen=True)
class Shard:
    """A part of a source that can be read on its own (picklable, for worker processes): a text file, or
    documents ``[start, stop)`` of a MemoryMap."""

    path: str
    start: int = 0
    stop: int = -1  # MemoryMap: one past the last document; -1: a text file

    @property
    def key(self) -> str:
        return self.path if self.stop < 0 else f"{self.path}[{self.start}:{self.stop}]"

    def documents(self) -> Iterator[str]:
        if self.stop < 0:
            yield Path(self.path).read_text(encoding="utf-8", errors="replace")
            return
        if self.tokenised():
            raise ValueError(f"{self.path}: a MemoryMap of token ids, not of text (only `toklab count` reads ids)")
        for doc in self.ids():
            yield doc.tobytes().decode("utf-8", errors="replace")

    def ids(self) -> Iterator[Any]:
        """The MemoryMap's documents as arrays (token ids when its dtype is wider than a byte)."""
        from megatron_tfree.data.memory_map import MemoryMap

        mm = MemoryMap(self.path)
        for i in range(self.start, self.stop):
            yield mm[i]

    def tokenised(self) -> bool:
        """Whether this is a MemoryMap of token ids (not of UTF-8 bytes)."""
        if self.stop < 0:
            return False
        from megatron_tfree.data.memory_map import MemoryMap

        return MemoryMap(self.path).dtype.itemsize > 1


@dataclass
class Source:
    """A named source of documents: ``documents()`` yields str (it can be called again), from its
    ``shards`` in order."""

    name: str
    shards: list[Shard]

    def documents(self) -> Iterator[str]:
        for shard in self.shards:
            yield from shard.documents()

    def chars(self) -> int:
        return sum(len(d) for d in self.documents())


def _files(paths: Sequence[Path]) -> list[Shard]:
    return [Shard(str(p)) for p in paths]


def _memory_map(prefix: str) -> list[Shard]:
    from megatron_tfree.data.memory_map import MemoryMap

    mm = MemoryMap(prefix)
    sizes = mm.sizes * mm.dtype.itemsize
    shards, start, size = [], 0, 0
    for i, n in enumerate(sizes):
        size += int(n)
        if size >= SHARD_BYTES:
            shards.append(Shard(prefix, start, i + 1))
            start, size = i + 1, 0
    if start < len(mm):
        shards.append(Shard(prefix, start, len(mm)))
    return shards


def parse_corpus(spec: str) -> list[Source]:
    """The sources of one corpus SPEC (see the module docstring); errors name the path."""
    if spec == "default":
        from megatron_tfree.data.corpus import default_corpus_text_files

        return [Source("default", _files([Path(p) for p in default_corpus_text_files(split="all")]))]
    if spec == "multilingual":
        return [Source(lang, _files([PROBE_DIR / f"{lang}.txt"])) for lang in PROBE_LANGUAGES]
    name, sep, path_text = spec.partition("=")
    if not sep:
        name, path_text = "", spec
    path = Path(path_text)
    if Path(f"{path_text}.meta.json").is_file():
        return [Source(name or path.name, _memory_map(path_text))]
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise FileNotFoundError(f"corpus {path}: no *.txt files below it")
        return [Source(name or path.name, _files(files))]
    if path.is_file():
        return [Source(name or path.stem, _files([path]))]
    raise FileNotFoundError(f"corpus {spec!r}: {path} is neither a file, a directory nor a MemoryMap prefix "
                            f"(nor 'default' / 'multilingual')")


def mix(sources: Sequence[Source], weights: Sequence[float] | None = None, total_chars: int | None = None) -> Iterator[str]:
    """Documents of ``sources`` with source ``i`` contributing ``weights[i]`` of the characters (normalised;
    default: equal shares) up to ``total_chars`` in all (default: as many as the scarcest source allows). A
    source's last document is cut at its budget."""
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources) or any(w <= 0 for w in weights):
        raise ValueError(f"--weights must give one positive weight per source ({len(sources)}), got {weights}")
    shares = [w / sum(weights) for w in weights]
    if total_chars is None:
        total_chars = int(min(s.chars() / share for s, share in zip(sources, shares)))
    for source, share in zip(sources, shares):
        budget = round(total_chars * share)
        for doc in source.documents():
            if budget <= 0:
                break
            yield doc[:budget]
            budget -= len(doc)


def batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """``texts`` in lists of ``size`` (the last one shorter), for the batch encoders of ``tokenizers``."""
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
