"""Training throughput: a T-Free model vs a BPE model of the same non-embedding size, same text.

Both models use the same transformer (``--config``, default configs/tiny.yaml); they differ only in
tokenizer, embedding, head and loss. Each trains ``--steps`` optimizer steps (AdamW, fp32, after
``--warmup`` untimed steps) on micro-batches of ``seq_len`` units from the same corpus (the default
Shakespeare corpus, or ``--prefix`` MemoryMap). Reported per second:

- units/s: words (T-Free) or tokens (BPE) the model consumed,
- bytes/s: UTF-8 bytes of original text those units stand for (the fair comparison: a T-Free word
  covers more text than a BPE token),
- words/s: bytes/s divided by the corpus' bytes per whitespace word.

The T-Free model is measured once per ops path (``--variants``): the pure-PyTorch reference ops
with the logits formed (``reference``), the C++ kernels with the logits formed (``cpp``), and the C++
kernels with the fused head + loss, the default training path (``cpp+fused``); ``x ref`` is each
one's words/s over the ``reference`` row of the same run: the end-to-end gain of the kernels.

Also the embedding+head parameter counts at v=8k (T-Free) vs a 64k vocabulary, and of the two
models actually benchmarked, and (``--decode-sizes``, from benchmarks/decode_speed.py) the T-Free
decode time per generated word against dictionary size. Ratios are against the BPE model (training)
and the smallest dictionary (decoding) measured in the same run.

    python benchmarks/train_throughput.py [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from megatron_tfree import ops
from megatron_tfree.config import load_config
from megatron_tfree.data.aligned import ensure_aligned_index
from megatron_tfree.data.dataset import PretrainingDataset, collate
from megatron_tfree.data.sources import iter_documents, split_prefixes
from megatron_tfree.model import GPTModel, param_groups
from megatron_tfree.tokenizer import ClassicTokenizer, TrigramTokenizer


def embedding_head_params(vocab: int, hidden: int) -> int:
    return 2 * vocab * hidden


#: T-Free ops paths: name -> (ops backend, model.fused_head_loss)
VARIANTS = {"reference": ("reference", False), "cpp": ("cpp", False), "cpp+fused": ("cpp", True)}


def bench_model(kind: str, tokenizer, cfg, aligned, steps: int, warmup: int, variant: str = "") -> dict:
    """Train ``steps`` timed steps; ``variant`` (T-Free): a :data:`VARIANTS` key, else the configured path."""
    model_cfg = cfg.model
    if variant:
        backend, fused = VARIANTS[variant]
        ops.set_backend(backend)
        model_cfg = dataclasses.replace(cfg.model, fused_head_loss=fused)
    torch.manual_seed(cfg.training.seed)
    ds = PretrainingDataset(aligned, tokenizer, cfg.data.seq_len, seed=cfg.data.seed, progress=False)
    mb = cfg.training.micro_batch_size
    batches = [collate([ds[(i * mb + j) % len(ds)] for j in range(mb)]) for i in range(steps + warmup)]
    model = GPTModel(model_cfg, kind, tokenizer.vocab_size, seed=cfg.training.seed)
    opt = torch.optim.AdamW(param_groups(model, cfg.training.weight_decay), lr=cfg.training.lr)
    units = nbytes = 0
    t0 = 0.0
    for i, batch in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            units += int((batch.loss_weights > 0).sum())
            nbytes += int(batch.target_bytes.sum())
    dt = time.perf_counter() - t0
    total = sum(p.numel() for p in model.parameters())
    emb_head = model.embedding.weight.numel() + model.output.head.linear.weight.numel()
    return {"kind": kind, "variant": variant or ops.backend_name(), "vocab": tokenizer.vocab_size, "seconds": dt, "units_per_s": units / dt,
            "bytes_per_s": nbytes / dt, "params": total, "embedding_head_params": emb_head,
            "non_embedding_params": total - emb_head, "final_loss": float(loss.detach())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--prefix", default=None, help="MemoryMap prefix to train on (default: the default corpus)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bpe-vocab", type=int, default=32000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--decode-sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                   help="dictionary sizes for the decode timing (none: skip it)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="T-Free ops paths to measure (default: all; the C++ ones need the built extension)")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = load_config(args.config, args.overrides)
    prefix = args.prefix or split_prefixes(cfg, "train")[0]
    aligned = ensure_aligned_index(prefix, cfg.data.aligned_max_bytes)
    texts = list(iter_documents([prefix]))
    corpus_bytes = sum(len(t.encode("utf-8")) for t in texts)
    bytes_per_word = corpus_bytes / max(sum(len(t.split()) for t in texts), 1)

    tfree = TrigramTokenizer.from_config(cfg.tokenizer)
    bpe = ClassicTokenizer.train(texts, vocab_size=args.bpe_vocab, end_of_text=cfg.tokenizer.end_of_text)
    previous = ops.backend_name()
    rows = [bench_model("tfree", tfree, cfg, aligned, args.steps, args.warmup, v) for v in args.variants]
    ops.set_backend(previous)
    rows.append(bench_model("classic", bpe, cfg, aligned, args.steps, args.warmup))
    base = rows[-1]
    ref = next((r for r in rows if r["kind"] == "tfree" and r["variant"] == "reference"), None)
    for r in rows:
        r["words_per_s"] = r["bytes_per_s"] / bytes_per_word
    for r in rows:
        for k in ("units_per_s", "bytes_per_s", "words_per_s"):
            r[f"{k}_vs_bpe"] = r[k] / base[k]
        if ref is not None and r["kind"] == "tfree":
            r["words_per_s_vs_reference"] = r["words_per_s"] / ref["words_per_s"]

    h = cfg.model.hidden_size
    print(f"text: {prefix} ({corpus_bytes / 1e6:.1f} MB, {bytes_per_word:.2f} bytes per whitespace word); "
          f"model h={h} L={cfg.model.num_layers}, seq_len {cfg.data.seq_len}, micro batch "
          f"{cfg.training.micro_batch_size}, {args.steps} timed steps, {torch.get_num_threads()} threads")
    print(f"{'model':<22}{'vocab':>8}{'units/s':>10}{'bytes/s':>11}{'words/s':>10}{'x BPE':>8}{'x ref':>8}"
          f"{'non-emb params':>16}{'emb+head':>12}")
    for r in rows:
        name = f"T-Free ({r['variant']})" if r["kind"] == "tfree" else "BPE (HF tokenizers)"
        vs_ref = f"{r['words_per_s_vs_reference']:.2f}x" if "words_per_s_vs_reference" in r else ""
        print(f"{name:<22}{r['vocab']:>8,}{r['units_per_s']:>10,.0f}{r['bytes_per_s']:>11,.0f}"
              f"{r['words_per_s']:>10,.0f}{r['words_per_s_vs_bpe']:>7.2f}x{vs_ref:>8}{r['non_embedding_params']:>16,}"
              f"{r['embedding_head_params']:>12,}")
    paper = {"tfree_8k": embedding_head_params(8192, h), "classic_64k": embedding_head_params(65536, h)}
    paper["reduction"] = 1 - paper["tfree_8k"] / paper["classic_64k"]
    print(f"embedding+head parameters at h={h}: T-Free v=8k {paper['tfree_8k']:,} vs 64k vocabulary "
          f"{paper['classic_64k']:,}: {paper['reduction']:.1%} fewer (the paper: 87.5%)")
    decode = []
    if args.decode_sizes:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import decode_speed

        t = cfg.tokenizer
        decode = decode_speed.measure(args.decode_sizes, 20, t.vocab_size, t.vocab_population)
        decode_speed.print_table(decode, t.vocab_size, t.vocab_population)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "embedding_head": paper, "decode": decode,
                                               "bytes_per_word": bytes_per_word}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
