#!/usr/bin/env python
"""T-Free decode speed vs decode-dictionary size (10k, 100k, 1M random words by default).

For every size: build the dictionary (reported), then greedy-generate ``--words`` words with a tiny
GPTModel through :class:`InferencePipe` (KV cache, batch 1) and report the wall time per generated
word, and separately the time of one dictionary scoring ([1, v] logits -> [1, n] scores). Ratios are
against the first (smallest) row. The model is deliberately tiny, so the table isolates the cost of
the dictionary (scoring is one sparse CSR x dense matmul, O(total ids)).

    python benchmarks/decode_speed.py [--sizes 10000 100000 1000000] [--words 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time

import torch

from megatron_tfree.config import ModelConfig
from megatron_tfree.inference import InferencePipe
from megatron_tfree.model import GPTModel
from megatron_tfree.tokenizer import TrigramTokenizer
from megatron_tfree.tokenizer.dictionary import DecodeDictionary


def random_words(n: int, seed: int) -> dict[str, int]:
    """``n`` distinct random words (3-10 letters, some capitalised) with Zipf-like counts."""
    rng = random.Random(seed)
    out: dict[str, int] = {}
    while len(out) < n:
        w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 10)))
        if rng.random() < 0.2:
            w = w.capitalize()
        out.setdefault(w, max(1, int(1e6 / (len(out) + 1))))
    return out


def measure(sizes, words: int = 20, vocab_size: int = 8192, vocab_population: int = 10) -> list[dict]:
    """Build each dictionary size and time scoring and greedy generation; one row per size."""
    tok = TrigramTokenizer(vocab_size=vocab_size, vocab_population=vocab_population)
    cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, attention="sdpa")
    model = GPTModel(cfg, "tfree", vocab_size, seed=0)
    logits = torch.randn(1, vocab_size, generator=torch.Generator().manual_seed(0))
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        d = DecodeDictionary.build(tok, random_words(n, seed=n), progress=False)
        build_s = time.perf_counter() - t0
        d.score(logits)  # warm the cached CSR matrix
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            d.score(logits)
        score_ms = (time.perf_counter() - t0) / reps * 1e3

        pipe = InferencePipe(model, tok, d)
        steps = {"n": 0}
        score = d.score

        def counted(*a, **k):
            steps["n"] += 1
            return score(*a, **k)

        d.score = counted  # instance attribute: counts the generation steps actually taken
        pipe.generate("the quick brown fox", max_words=2)  # warm-up
        steps["n"] = 0
        t0 = time.perf_counter()
        pipe.generate("the quick brown fox", max_words=words)
        gen_s = time.perf_counter() - t0
        rows.append({"words": len(d), "ids": int(sum(len(b.ids) for b in d._blocks)), "build_s": build_s,
                     "score_ms": score_ms, "ms_per_word": gen_s / max(1, steps["n"]) * 1e3, "steps": steps["n"]})
        del d.score
    base = rows[0]
    for r in rows:
        r["score_ratio"] = r["score_ms"] / base["score_ms"]
        r["word_ratio"] = r["ms_per_word"] / base["ms_per_word"]
    return rows


def print_table(rows: list[dict], vocab_size: int, vocab_population: int) -> None:
    header = f"{'dictionary words':>16} {'ids (nnz)':>11} {'build s':>8} {'score ms':>9} {'x':>6} {'ms/word':>8} {'x':>6}"
    print(f"T-Free decode speed (v={vocab_size}, m={vocab_population}, torch threads={torch.get_num_threads()}, "
          f"tiny model, batch 1, KV cache)")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['words']:>16,} {r['ids']:>11,} {r['build_s']:>8.2f} {r['score_ms']:>9.2f} {r['score_ratio']:>6.1f} "
              f"{r['ms_per_word']:>8.2f} {r['word_ratio']:>6.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--words", type=int, default=20, help="words generated per size")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--vocab-population", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.sizes, args.words, args.vocab_size, args.vocab_population)
    print_table(rows, args.vocab_size, args.vocab_population)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"vocab_size": args.vocab_size, "vocab_population": args.vocab_population,
                       "threads": args.threads, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
