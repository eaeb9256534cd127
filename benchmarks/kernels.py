"""GPU benchmark of the CUDA ops (csrc/*_kernels.cu via csrc/tfree_ops_cuda.cpp) against PyTorch baselines.

Three sections, all ratios measured in the same run (median of ``--repeat`` timings with CUDA events,
after warm-up; every input is random data, never zeros):

* embedding-bag forward + backward (T-Free input layer: ~10 trigrams x m=10 ids per word, 4096 words x
  ``--batch``, h = 2048 / 4096): the kernel (deterministic and atomic backward) vs
  ``F.embedding_bag(mode="sum")`` vs a gather + ``index_add_`` formulation;
* fused head + BCE loss (forward + backward) at v = 8k / 16k / 32k: the chunked kernel vs the reference
  (logits materialised): time and peak extra device memory (``torch.cuda.max_memory_allocated`` above
  the level before the step);
* decode scoring of 100k / 1M-word dictionaries (~60 ids per word): the kernel vs the torch sparse-CSR
  matmul path of ``DecodeDictionary.score``, in ms and ns per word.

    python benchmarks/kernels.py [--quick] [--batch 4] [--dtype bf16] [--repeat 20] [--json out.json]

Needs a CUDA GPU; the module is the prebuilt ``megatron_tfree._tfree_ops_cuda`` or a JIT build of csrc/
(``MEGATRON_TFREE_CUDA_JIT=1`` forces it; cached in ``$TORCH_EXTENSIONS_DIR``). CPU numbers:
``benchmarks/kernels_cpu.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_tfree import ops  # noqa: E402
from megatron_tfree.ops import reference  # noqa: E402
from megatron_tfree.tokenizer.dictionary import DecodeDictionary, _Block  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_cuda_ops() -> tuple:
    """The compiled CUDA module (:func:`megatron_tfree.ops.cuda.load`: prebuilt, or a JIT build when none is
    installed or MEGATRON_TFREE_CUDA_JIT=1) and where it came from."""
    from megatron_tfree.ops import cuda  # noqa: PLC0415

    forced = os.environ.get(cuda.JIT_ENV) == "1"
    mod = cuda.load(jit=True if forced else False) or cuda.load(jit=True)
    return mod, cuda.describe()


def time_ms(fn, repeat: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_extra_mb(fn) -> float:
    """Peak device memory allocated above the current level while running ``fn``."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def csr(n: int, per_row: int, v: int, gen: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(n + 1, dtype=torch.long) * per_row
    return offsets.to(device), torch.randint(0, v, (n * per_row,), generator=gen).to(device)


class CudaEmbeddingBag(torch.autograd.Function):
    """The kernel pair as an autograd op (the benchmark's own wrapper; see csrc/README.md for the ops wiring)."""

    @staticmethod
    def forward(ctx, weight, offsets, ids, cu, deterministic):
        ctx.save_for_backward(offsets, ids)
        ctx.cu, ctx.det, ctx.v = cu, deterministic, weight.shape[0]
        return cu.embedding_bag_forward(weight.detach(), offsets, ids, 0)

    @staticmethod
    def backward(ctx, grad):
        offsets, ids = ctx.saved_tensors
        return ctx.cu.embedding_bag_backward(grad.contiguous(), offsets, ids, 0, ctx.v, ctx.det), None, None, None, None


def bench_embedding_bag(cu, words: int, hs: list[int], v: int, dtype, repeat: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    offsets, ids = csr(words, 100, v, gen, "cuda")  # 10 trigrams x m = 10 ids per word
    rows = torch.repeat_interleave(torch.arange(words, device="cuda"), 100)
    out = []
    for h in hs:
        w = torch.randn(v, h, generator=gen).to("cuda", dtype).requires_grad_(True)
        g = torch.randn(words, h, generator=gen).to("cuda", dtype)

        def run(f):
            def step():
                w.grad = None
                f().backward(g)
            return step

        impls = {
            "cuda (det. bwd)": run(lambda: CudaEmbeddingBag.apply(w, offsets, ids, cu, True)),
            "cuda (atomic bwd)": run(lambda: CudaEmbeddingBag.apply(w, offsets, ids, cu, False)),
            "F.embedding_bag": run(lambda: F.embedding_bag(ids, w, offsets, mode="sum", include_last_offset=True)),
            "gather+index_add": run(lambda: torch.zeros(words, h, device="cuda", dtype=dtype).index_add(0, rows, w[ids])),
        }
        if 2 * ids.numel() * h * w.element_size() > 24e9:  # gathered [nnz, h] and its gradient
            del impls["gather+index_add"]
        fwd = time_ms(lambda: cu.embedding_bag_forward(w.detach(), offsets, ids, 0), repeat)
        times = {k: time_ms(f, repeat) for k, f in impls.items()}
        base = times["cuda (det. bwd)"]
        shape = f"{words} words x 100 ids, h={h}, v={v}, {str(dtype)[6:]}"
        for k, t in times.items():
            out.append({"section": "embedding_bag fwd+bwd", "shape": shape, "impl": k, "ms": t,
                        "ratio_to_cuda": t / base})
        # forward alone: bytes of the gathered rows (+ output) over time = achieved bandwidth
        gb = (ids.numel() + words) * h * w.element_size() / 1e9
        out.append({"section": "embedding_bag fwd", "shape": shape, "impl": "cuda fwd only", "ms": fwd,
                    "ratio_to_cuda": None, "gb_per_s": gb / (fwd / 1e3)})
        w = g = None  # free before the next width
        torch.cuda.empty_cache()
    return out


def bench_head_loss(cu, n: int, h: int, vs: list[int], chunk: int, dtype, repeat: int) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for v in vs:
        t_off, t_ids = csr(n, 60, v, gen, "cuda")
        weights = torch.ones(n, device="cuda")
        hid = torch.randn(n, h, generator=gen).to("cuda", dtype).requires_grad_(True)
        w = (torch.randn(v, h, generator=gen) * 0.02).to("cuda", dtype).requires_grad_(True)

        def fused():
            loss, gh, gw = cu.head_loss(hid.detach(), w.detach(), t_off, t_ids, weights, 300.0, 100.0, 0, v, chunk, True)
            hid.grad, w.grad = gh, gw  # as the autograd wrapper would hand them out
            return loss

        def ref():
            hid.grad = w.grad = None
            reference.tfree_head_loss(hid, w, t_off, t_ids, weights, 300.0, 100.0, 0, v, chunk).backward()

        res = {}
        for name, step in (("cuda fused", fused), ("reference", ref)):
            hid.grad = w.grad = None
            mb = peak_extra_mb(step)
            res[name] = (time_ms(step, repeat), mb)
        for name, (t, mb) in res.items():
            out.append({"section": "head+loss fwd+bwd", "shape": f"N={n}, h={h}, v={v}, chunk={chunk}, {str(dtype)[6:]}",
                        "impl": name, "ms": t, "ratio_to_cuda": t / res["cuda fused"][0], "peak_extra_mb": mb})
        hid = w = None
        torch.cuda.empty_cache()
    return out


def synthetic_dictionary(n_words: int, v: int, m: int, gen: np.random.Generator) -> DecodeDictionary:
    """``n_words`` words of 3..9 trigrams (m ids each, ~60 on average) with random ids, first/last trigram edge."""
    trigrams = gen.integers(3, 10, n_words)
    lengths = trigrams * m
    offsets = np.zeros(n_words + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = gen.integers(0, v, int(offsets[-1]), dtype=np.int32)
    local = np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
    edge = (local < m) | (local >= np.repeat(lengths, lengths) - m)
    blk = _Block([f"w{i}" for i in range(n_words)], np.zeros(n_words, np.int64), offsets, ids, edge,
                 trigrams.astype(np.int32))
    return DecodeDictionary([blk], v, m, {})


def bench_decode(cu, sizes: list[int], v: int, batch: int, repeat: int) -> list[dict]:
    gen = np.random.default_rng(2)
    out = []
    logits = torch.randn(batch, v, device="cuda")
    ops.set_backend("reference")  # DecodeDictionary.score on CUDA logits = the torch sparse CSR path
    for n in sizes:
        d = synthetic_dictionary(n, v, 10, gen)
        pattern = tuple(t.cuda() for t in d._blocks[0].native())
        res = {
            "cuda": time_ms(lambda: cu.decode_scores(logits, *pattern, d.vocab_population, 0.5), repeat),
            "torch sparse CSR": time_ms(lambda: d.score(logits, 0.5), repeat),
        }
        err = (cu.decode_scores(logits, *pattern, d.vocab_population, 0.5) - d.score(logits, 0.5)).abs().max().item()
        for name, t in res.items():
            out.append({"section": "decode score", "shape": f"{n} words (~60 ids each), v={v}, B={batch}",
                        "impl": name, "ms": t, "ratio_to_cuda": t / res["cuda"], "ns_per_word": 1e6 * t / n,
                        "max_abs_diff": err})
        d = pattern = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    ap.add_argument("--batch", type=int, default=4, help="sequences of 4096 words in the embedding-bag section")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=4096, help="vocabulary rows per chunk of the fused head")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False). For the CPU kernels run "
              "`python benchmarks/kernels_cpu.py`; for this one use a GPU machine (csrc/README.md, 'CUDA kernels').",
              file=sys.stderr)
        return 2
    cu, origin = load_cuda_ops()
    dtype, q = DTYPES[args.dtype], args.quick
    previous = ops.backend_name()
    rows = bench_embedding_bag(cu, 256 if q else 4096 * args.batch, [256] if q else [2048, 4096], 32768, dtype,
                               args.repeat)
    rows += bench_head_loss(cu, 512 if q else 4096 * max(1, args.batch // 2), 256 if q else 4096,
                            [8192] if q else [8192, 16384, 32768], args.chunk, dtype, args.repeat)
    rows += bench_decode(cu, [10_000] if q else [100_000, 1_000_000], 32768, 1, args.repeat)
    ops.set_backend(previous)
    dev = torch.cuda.get_device_name()
    print(f"{dev}, torch {torch.__version__}, CUDA {torch.version.cuda}, module: {origin}")
    print(f"{'section':<22} {'shape':<48} {'impl':<18} {'ms':>9} {'x cuda':>7} {'peak MB':>8} {'other':>14}")
    for r in rows:
        mb, ratio = r.get("peak_extra_mb"), r.get("ratio_to_cuda")
        other = (f"{r['gb_per_s']:.0f} GB/s" if "gb_per_s" in r else
                 f"{r['ns_per_word']:.2f} ns/word" if "ns_per_word" in r else "")
        print(f"{r['section']:<22} {r['shape']:<48} {r['impl']:<18} {r['ms']:>9.3f} "
              f"{'' if ratio is None else f'{ratio:.2f}':>7} {'' if mb is None else f'{mb:.0f}':>8} {other:>14}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda,
                                               "module": origin, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
