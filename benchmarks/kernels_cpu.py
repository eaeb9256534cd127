"""CPU benchmark of the C++ ops (``cpp`` backend, csrc/tfree_ops.cpp) against PyTorch baselines.

Three sections, ratios measured in the same run (median wall time of ``--repeat`` runs after a warm-up;
the embedding-bag kernel and ``F.embedding_bag``, and the two head + loss paths, are timed in alternating
rounds):

* embedding-bag forward + backward (T-Free input layer: ~10 trigrams x m=10 ids per word): the kernel
  vs ``F.embedding_bag(mode="sum")`` vs a gather + ``index_add_`` formulation;
* fused head + BCE loss (forward + backward) vs the reference (logits materialised): time and peak
  extra resident memory (VmHWM after resetting it through /proc/self/clear_refs);
* decode scoring of 100k / 1M-word dictionaries: the kernel vs the torch sparse-CSR matmul path of
  ``DecodeDictionary.score``.

    python benchmarks/kernels_cpu.py [--quick] [--json out.json]

Builds (or loads the cached) extension first; ~25 s the first time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tfree import ops  # noqa: E402
from megatron_tfree.ops import extension, reference  # noqa: E402
from megatron_tfree.tokenizer.dictionary import DecodeDictionary, _Block  # noqa: E402


def timeit(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds of each ``fns`` value, timed in alternating rounds (one run of each per round, after
    one warm-up each), so a slow phase of a shared machine hits every implementation alike."""
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_extra_mb(fn) -> float | None:
    """Peak resident memory above the current level while running ``fn`` (Linux; None elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _status_kb("VmRSS")
        fn()
        return (_status_kb("VmHWM") - base) / 1024
    except (OSError, KeyError):
        return None


def csr(n: int, per_row: int, v: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(n + 1, dtype=torch.long) * per_row
    return offsets, torch.randint(0, v, (n * per_row,), generator=gen)


def bench_embedding_bag(words: int, hs: list[int], v: int, repeat: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    offsets, ids = csr(words, 100, v, gen)  # 10 trigrams x m = 10 ids per word
    rows = torch.repeat_interleave(torch.arange(words), 100)
    out = []
    for h in hs:
        w = torch.randn(v, h, generator=gen).requires_grad_(True)
        g = torch.randn(words, h, generator=gen)

        def run(f):
            def step():
                w.grad = None
                f().backward(g)
            return step

        impls = {
            "cpp": run(lambda: extension.embedding_bag(w, offsets, ids)),
            "F.embedding_bag": run(lambda: F.embedding_bag(ids, w, offsets, mode="sum", include_last_offset=True)),
            "gather+index_add": run(lambda: torch.zeros(words, h).index_add(0, rows, w[ids])),
        }
        if words * 100 * h * 4 > 4e9:  # the gather materialises [nnz, h] (and its gradient): too big here
            del impls["gather+index_add"]
        gather = impls.pop("gather+index_add", None)  # its [nnz, h] temporaries would slow the rounds after it
        times = timeit_interleaved(impls, repeat)
        if gather is not None:
            times["gather+index_add"] = timeit(gather, repeat)
        for k, t in times.items():
            out.append({"section": "embedding_bag fwd+bwd", "shape": f"{words} words x 100 ids, h={h}, v={v}",
                        "impl": k, "ms": 1e3 * t, "speedup_of_cpp": t / times["cpp"]})
        del w
    return out


def bench_head_loss(n: int, h: int, vs: list[int], chunk: int, repeat: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for v in vs:
        t_off, t_ids = csr(n, 60, v, gen)
        weights = torch.ones(n)
        hid = torch.randn(n, h, generator=gen).requires_grad_(True)
        w = (torch.randn(v, h, generator=gen) * 0.02).requires_grad_(True)

        def run(fn):
            def step():
                hid.grad = w.grad = None
                fn(hid, w, t_off, t_ids, weights, 300.0, 100.0, 0, v, chunk).backward()
            return step

        steps = {"cpp fused": run(extension.tfree_head_loss), "reference": run(reference.tfree_head_loss)}
        times = timeit_interleaved(steps, repeat)
        res = {name: (times[name], peak_extra_mb(step)) for name, step in steps.items()}
        for name, (t, mb) in res.items():
            out.append({"section": "head+loss fwd+bwd", "shape": f"N={n}, h={h}, v={v}, chunk={chunk}", "impl": name,
                        "ms": 1e3 * t, "speedup_of_cpp": t / res["cpp fused"][0], "peak_extra_mb": mb})
    return out


def synthetic_dictionary(n_words: int, v: int, m: int, gen: np.random.Generator) -> DecodeDictionary:
    """``n_words`` words of ~6 trigrams (m ids each) with random ids, first/last trigram edge (the flags in
    random order within a word, as in a real dictionary)."""
    trigrams = gen.integers(3, 10, n_words)
    lengths = trigrams * m
    offsets = np.zeros(n_words + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = gen.integers(0, v, int(offsets[-1]), dtype=np.int32)
    local = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    edge = (local < m) | (local >= np.repeat(lengths, lengths) - m)
    # a real word's ids are its distinct ids in id order, so its edge flags are scattered: shuffle within words
    order = np.argsort(np.repeat(np.arange(n_words), lengths) + gen.random(int(offsets[-1])) * 0.5, kind="stable")
    edge = edge[order]
    blk = _Block([f"w{i}" for i in range(n_words)], np.zeros(n_words, np.int64), offsets, ids, edge,
                 trigrams.astype(np.int32))
    return DecodeDictionary([blk], v, m, {})


def bench_decode(sizes: list[int], v: int, batch: int, repeat: int) -> list[dict]:
    gen = np.random.default_rng(2)
    out = []
    logits = torch.randn(batch, v)
    for n in sizes:
        d = synthetic_dictionary(n, v, 10, gen)
        res = {}
        for name in ("cpp", "reference"):
            ops.set_backend(name)
            res[name] = timeit(lambda: d.score(logits, 0.5), repeat)
        for name, t in res.items():
            out.append({"section": "decode score", "shape": f"{n} words (~60 ids each), v={v}, B={batch}",
                        "impl": "cpp" if name == "cpp" else "torch sparse CSR", "ms": 1e3 * t,
                        "speedup_of_cpp": t / res["cpp"]})
        del d
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    extension.load(build=True)
    previous = ops.backend_name()
    q = args.quick
    rows = bench_embedding_bag(256 if q else 4096, [256] if q else [2048, 4096], 32768, args.repeat)
    rows += bench_head_loss(128 if q else 1024, 256 if q else 1024, [8192] if q else [8192, 16384, 32768],
                            2048, args.repeat)
    rows += bench_decode([10_000] if q else [100_000, 1_000_000], 32768, 1, args.repeat)
    ops.set_backend(previous)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, extension: {extension.describe()}")
    print(f"{'section':<22} {'shape':<42} {'impl':<18} {'ms':>10} {'x cpp':>7} {'peak MB':>8}")
    for r in rows:
        mb = r.get("peak_extra_mb")
        print(f"{r['section']:<22} {r['shape']:<42} {r['impl']:<18} {r['ms']:>10.1f} {r['speedup_of_cpp']:>7.2f} "
              f"{'' if mb is None else f'{mb:.0f}':>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
