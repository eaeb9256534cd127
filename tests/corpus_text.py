"""The generated text the trainer tests train and evaluate on (deterministic per seed; no download)."""

from __future__ import annotations

import random

WORDS = ("the a king queen sword crown night day love death speak hear come go now never ever "
         "lord lady castle ghost blood storm rain sea ship fair foul heart mind soul fire").split()


def generated_docs(seed: int, n_docs: int, words_per_doc: int) -> list[str]:
    """``n_docs`` documents of about ``words_per_doc`` words: capitalised sentences of 4-10 random WORDS."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences, n = [], 0
        while n < words_per_doc:
            k = rng.randint(4, 10)
            sentences.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
            n += k
        docs.append(" ".join(sentences))
    return docs


def memory_map(directory, name: str, docs: list[str]) -> str:
    """``docs`` (one text file each) converted to the MemoryMap prefix ``directory/name`` with an aligned index."""
    from megatron_tfree.data.convert import align_memory_map, convert_text_files

    src = directory / f"{name}_txt"
    src.mkdir()
    for i, doc in enumerate(docs):
        (src / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    prefix = directory / name
    convert_text_files([src], prefix, split="file", progress=False)
    align_memory_map(prefix, max_bytes=2000, progress=False)
    return str(prefix)
