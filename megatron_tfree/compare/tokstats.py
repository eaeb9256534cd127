"""Tokenizer statistics of every arm, measured by the tokenizer lab (:func:`megatron_tfree.toklab.report.report`).

One call measures every arm's tokenizer on the comparison's train split and on the multilingual probe:
fertility, bytes / characters per unit, NSL (against the reference arm), Rényi / Shannon efficiency,
near-duplicate and unused shares, and for T-Free ids per word and id-set collisions among the train
split's most frequent words. The train-split rows give the bytes per unit that equalise the arms'
sequence lengths (:mod:`.arms`) and the corpus words per byte behind words/s. The rows are cached in
``RUNS_DIR/tokenizer_stats.json``, keyed on the tokenizer files' contents, the corpus and the settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from megatron_tfree.config import ConfigError, TokenizerConfig

CACHE_FILE = "tokenizer_stats.json"


def spec_of(tokenizer: TokenizerConfig, tokenizer_file: str = "") -> str:
    """The toklab tokenizer SPEC of an arm's tokenizer section (a BPE: its file)."""
    if tokenizer.kind == "classic":
        return tokenizer_file or tokenizer.tokenizer_file
    if tokenizer.entire_words:
        raise ConfigError("tokenizer.entire_words=true: the tokenizer lab cannot measure it; leave it false in "
                          "compare arms")
    t = tokenizer
    return (f"tfree:v={t.vocab_size},m={t.vocab_population},k={t.vocab_population_partial_lowercase},"
            f"init={t.initialize},lowercase={int(t.lowercase)},seed={t.seed}")


def spec_name(spec: str) -> str:
    """The name toklab gives the tokenizer of ``spec`` in its rows."""
    if spec.startswith("tfree:"):
        from megatron_tfree.toklab.specs import TFreeSpec

        return TFreeSpec(spec).name
    path = Path(spec)
    return path.parent.name if path.name == "tokenizer.json" else path.stem


def _key(specs: list[str], corpora: list[str], collision_words: int) -> str:
    from megatron_tfree.data.memory_map import MemoryMap

    h = hashlib.sha256()
    for spec in specs:
        h.update(spec.encode())
        if not spec.startswith("tfree:"):
            h.update(Path(spec).read_bytes())
    for corpus in corpora:
        h.update(corpus.encode())
        if Path(f"{corpus}.meta.json").is_file():
            h.update(MemoryMap(corpus).fingerprint.encode())
    h.update(str(collision_words).encode())
    return h.hexdigest()


def measure(specs: dict[str, str], train_prefix: str, probe: str, runs_dir: str | Path, collision_words: int,
            progress: bool = True) -> dict[str, Any]:
    """``{"rows": toklab rows, "names": {arm: toklab name}, "train": corpus name of the train split,
    "probe": [probe corpus names]}`` for ``specs`` (``{arm: SPEC}``, the reference arm first)."""
    from megatron_tfree.toklab.report import report
    from megatron_tfree.toklab.sources import parse_corpus

    arms, spec_list = list(specs), list(specs.values())
    corpora = [train_prefix, probe]
    key = _key(spec_list, corpora, collision_words)
    cache = Path(runs_dir) / CACHE_FILE
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["stats"]
    rows = report(spec_list, corpora, out=None, collision_words=collision_words, progress=progress)
    stats = {"rows": rows, "names": {arm: spec_name(s) for arm, s in zip(arms, spec_list)},
             "train": parse_corpus(train_prefix)[0].name, "probe": [s.name for s in parse_corpus(probe)]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps({"key": key, "stats": stats}, indent=1))
    tmp.replace(cache)
    return stats


def row(stats: dict[str, Any], arm: str, corpus: str) -> dict[str, Any]:
    """The toklab row of ``arm`` on ``corpus`` (a source name)."""
    name = stats["names"][arm]
    for r in stats["rows"]:
        if r["tokenizer"] == name and r["corpus"] == corpus:
            return r
    raise KeyError(f"no tokenizer statistics for {arm} ({name}) on {corpus}")
