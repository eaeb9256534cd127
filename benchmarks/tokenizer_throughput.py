"""Throughput of raw text -> training-ready CSR ids: T-Free vs a byte-level BPE (HF ``tokenizers``).

Both tokenizers get the same corpus cut into the same ~20 KB pieces (the aligned item size of the
data pipeline) and must return a :class:`SparseIds` per piece. The BPE (vocab 32k by default) is
trained on the same corpus first (not timed). Everything runs on one thread: ``RAYON_NUM_THREADS=1``
and ``TOKENIZERS_PARALLELISM=false`` are set before ``tokenizers`` loads, and ``encode`` (not
``encode_batch``) is used.

T-Free is timed cold (empty word cache: every new word is hashed) and warm (the steady state of a
training run, where almost every word is cached), and split into its two stages (word split, ids).

    python benchmarks/tokenizer_throughput.py --corpus /path/to/texts --max-mb 5 --json out.json
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from megatron_tfree.tokenizer import ClassicTokenizer, SparseIds, TrigramTokenizer, text_to_words  # noqa: E402


def default_corpus_files() -> list[Path]:
    """Text files of the project's default corpus (megatron_tfree.data.corpus), if it is available."""
    try:
        from megatron_tfree.data import corpus
    except ImportError as e:
        raise SystemExit(f"no default corpus available ({e}); pass --corpus PATH") from e
    for name in ("default_corpus_text_files", "default_corpus_files", "text_files"):
        fn = getattr(corpus, name, None)
        if callable(fn):
            return [Path(p) for p in fn()]
    raise SystemExit("megatron_tfree.data.corpus has no text-file listing; pass --corpus PATH")


def load_corpus(path: str | None, max_mb: float) -> list[str]:
    """Texts of the corpus files (a file or a directory of *.txt), at most ``max_mb`` MB in all."""
    if path is None:
        files = default_corpus_files()
    else:
        p = Path(path)
        files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise SystemExit(f"no text files found at {path}")
    budget = int(max_mb * 1e6) if max_mb > 0 else None
    texts, used = [], 0
    for f in files:
        data = f.read_bytes()
        if budget is not None and used + len(data) > budget:
            data = data[: budget - used]
        texts.append(data.decode("utf-8", errors="ignore"))
        used += len(data)
        if budget is not None and used >= budget:
            break
    return texts


def pieces(texts: list[str], size: int = 20_000) -> list[str]:
    """Cut documents into ~``size``-character pieces at line ends (one piece never spans documents)."""
    out = []
    for t in texts:
        start = 0
        while start < len(t):
            end = t.find("\n", start + size)
            end = len(t) if end < 0 else end + 1
            out.append(t[start:end])
            start = end
    return out


def timed(fn, items, keep: bool = False) -> tuple[float, list]:
    """Seconds to map ``fn`` over ``items``; the results (``keep``) or just their lengths."""
    res = []
    t0 = time.perf_counter()
    for x in items:
        r = fn(x)
        res.append(r if keep else len(r))
    return time.perf_counter() - t0, res


def bpe_csr(tok: ClassicTokenizer):
    hf = tok.hf_tokenizer

    def run(text: str) -> SparseIds:
        ids = np.asarray(hf.encode(text, add_special_tokens=False).ids, dtype=np.int32)
        return SparseIds(np.arange(len(ids) + 1, dtype=np.int64), ids)

    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default=None, help="text file or directory of *.txt (default: the project corpus)")
    ap.add_argument("--max-mb", type=float, default=0.0, help="use at most this many MB of text (0 = all)")
    ap.add_argument("--bpe-vocab", type=int, default=32000)
    ap.add_argument("--vocab-size", type=int, default=8192, help="T-Free v")
    ap.add_argument("--vocab-population", type=int, default=10, help="T-Free m")
    ap.add_argument("--partial-lowercase", type=int, default=0, help="T-Free k")
    ap.add_argument("--initialize", default="hash", choices=["hash", "fast"])
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)

    texts = load_corpus(args.corpus, args.max_mb)
    items = pieces(texts)
    mb = sum(len(x.encode("utf-8")) for x in items) / 1e6
    ws_words = sum(len(x.split()) for x in items)
    print(f"corpus: {mb:.2f} MB, {len(items)} pieces, {ws_words} whitespace words", file=sys.stderr)

    t0 = time.perf_counter()
    bpe = ClassicTokenizer.train(texts, vocab_size=args.bpe_vocab)
    bpe_train_s = time.perf_counter() - t0

    tf = TrigramTokenizer(
        vocab_size=args.vocab_size,
        vocab_population=args.vocab_population,
        vocab_population_partial_lowercase=args.partial_lowercase,
        initialize=args.initialize,
    )
    enc_ids = lambda x: tf.encode(x).ids  # noqa: E731
    tf_cold_s, tf_out = timed(enc_ids, items)
    tf_warm_s, _ = timed(enc_ids, items)
    split_s, words = timed(text_to_words, items, keep=True)
    ids_s, _ = timed(tf.encode_units, words)
    bpe_s, bpe_out = timed(bpe_csr(bpe), items)
    bpe_s2, _ = timed(bpe_csr(bpe), items)
    bpe_s = min(bpe_s, bpe_s2)

    n_words = sum(tf_out)
    n_tokens = sum(bpe_out)
    rows = [
        ("BPE (HF tokenizers, 1 thread)", bpe_s, n_tokens),
        ("T-Free cold (empty cache)", tf_cold_s, n_words),
        ("T-Free warm (cached words)", tf_warm_s, n_words),
        ("  T-Free stage: text_to_words", split_s, n_words),
        ("  T-Free stage: words -> CSR ids", ids_s, n_words),
    ]
    result = {
        "corpus_mb": mb,
        "pieces": len(items),
        "whitespace_words": ws_words,
        "bpe_vocab_size": bpe.vocab_size,
        "bpe_train_s": bpe_train_s,
        "tfree": {k: getattr(tf, k) for k in ("vocab_size", "vocab_population", "vocab_population_partial_lowercase", "initialize")},
        "tfree_distinct_words": tf.cached_words,
        "rows": [
            {"name": n.strip(), "seconds": s, "mb_per_s": mb / s, "units": u, "units_per_ws_word": u / max(ws_words, 1), "speed_vs_bpe": bpe_s / s}
            for n, s, u in rows
        ],
    }
    print(f"{'path':34s} {'MB/s':>8s} {'units':>10s} {'fertility':>9s} {'x BPE':>7s}")
    for r, (n, _, _) in zip(result["rows"], rows):
        print(f"{n:34s} {r['mb_per_s']:8.2f} {r['units']:10d} {r['units_per_ws_word']:9.3f} {r['speed_vs_bpe']:7.2f}")
    print(f"(BPE vocab {bpe.vocab_size}, trained in {bpe_train_s:.1f}s; T-Free v={tf.vocab_size} m={tf.vocab_population}, "
          f"{tf.cached_words} distinct words)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
