"""The BPE arms' tokenizers: trained once on the train split with the tokenizer lab, then reused.

``RUNS_DIR/tokenizers/{arm}-{preset}-{asked size}.json`` is a byte-level BPE of
:func:`megatron_tfree.toklab.train.train_bpe` (its pre-tokenisation preset, round trip checked) on the
comparison's train split only. A corpus without enough merges gives fewer tokens than asked (the
Shakespeare corpus: about 50k for 64k): the real size is what the arms and the report use.
"""

from __future__ import annotations

import os
from pathlib import Path

from .corpus import Corpus


def bpe_path(runs_dir: str | Path, arm: str, preset: str, vocab_size: int) -> Path:
    return Path(runs_dir) / "tokenizers" / f"{arm}-{preset}-{vocab_size}.json"


def clear_unit_caches(corpus: Corpus) -> list[Path]:
    """Delete the trainer's unit-count caches beside the comparison's corpus: they are keyed on a classic
    tokenizer's vocabulary size, not its contents, so a retrained BPE of the same size would reuse them."""
    removed = []
    for prefix in (corpus.train, corpus.valid):
        p = Path(prefix)
        for cache in p.parent.glob(f"{p.name}.aligned_*.units-*.npy"):
            cache.unlink()
            removed.append(cache)
    return removed


def ensure_bpe(path: Path, corpus: Corpus, vocab_size: int, preset: str, min_frequency: int = 2,
               progress: bool = True) -> tuple[Path, bool]:
    """``path``, trained on ``corpus.train`` first when it does not exist; also returns whether it was trained."""
    if path.is_file():
        return path, False
    from megatron_tfree.toklab.sources import parse_corpus
    from megatron_tfree.toklab.train import train_bpe

    tok = train_bpe(parse_corpus(corpus.train), vocab_size, preset=preset, min_frequency=min_frequency,
                    progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    clear_unit_caches(corpus)
    return path, True
