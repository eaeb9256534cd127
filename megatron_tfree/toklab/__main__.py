"""``python -m megatron_tfree.toklab VERB ...`` (also ``megatron-tfree-toklab``): see the package docstring.

    toklab train  --corpus default --preset gpt4 --vocab-size 8192 --out bpe-8k.json
    toklab report --tokenizer bpe-8k.json --tokenizer tfree:v=8192,m=10 --corpus default --out report/
    toklab count  --tokenizer bpe-8k.json --corpus default --out counts.json
    toklab prune  --tokenizer bpe-8k.json --counts counts.json --size 4096 --out bpe-4k.json \\
                  [--checkpoint runs/bpe --out-checkpoint runs/bpe-4k-init]
    toklab swap   --checkpoint runs/bpe --tokenizer new.json --out runs/bpe-new-init [--method fvt|random]
    toklab swap   --checkpoint runs/bpe --tfree v=8192,m=10 --corpus default --out runs/tfree-from-bpe
    toklab soft   --checkpoint runs/bpe --out soft/ [--loss mse,retrieval]
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from megatron_tfree.cli import add_debug_flag, apply_debug, run_tool

VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], str]]]] = {}


def verb(name: str, help: str):
    def register(fn):
        VERBS[name] = (help, fn)
        return fn
    return register


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights expects comma-separated numbers, got {text!r}") from None


@verb("train", "train a byte-level BPE tokenizer (writes a tokenizer.json)")
def _train(p: argparse.ArgumentParser):
    from .presets import PRESETS

    p.add_argument("--corpus", action="append", required=True, metavar="SPEC",
                   help="default | multilingual | [NAME=]PATH (a .txt, a folder of .txt, a MemoryMap prefix); repeat "
                        "for a data mix")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--preset", choices=list(PRESETS), help="pre-tokenisation preset (default gpt4)")
    group.add_argument("--regex", help="a custom pre-tokenisation regex")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--weights", type=_weights, help="character share per --corpus source, e.g. 0.7,0.3")
    p.add_argument("--total-chars", type=int, help="characters of the mix in all (default: all the scarcest allows)")
    p.add_argument("--special", action="append", default=[], help="extra special tokens (<|endoftext|> always)")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--out", required=True, help="the tokenizer.json to write")

    def run(a: argparse.Namespace) -> str:
        from pathlib import Path

        from megatron_tfree.checkpoint.files import write_atomic

        from .sources import parse_corpus
        from .train import train_bpe

        sources = [s for c in a.corpus for s in parse_corpus(c)]
        preset = a.preset if a.regex is None else None
        tok = train_bpe(sources, a.vocab_size, preset=preset or ("gpt4" if a.regex is None else None), regex=a.regex,
                        weights=a.weights, total_chars=a.total_chars, special_tokens=a.special,
                        min_frequency=a.min_frequency, progress=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(a.out, tok.to_str(pretty=True))
        size = tok.get_vocab_size(with_added_tokens=True)
        note = f" (the corpus has no more merges: {a.vocab_size} asked)" if size < a.vocab_size else ""
        return f"wrote {a.out}: {size} tokens{note}; round trip checked on the corpus"
    return run


@verb("report", "compare tokenizers on corpora (report.md, report.json, PNG plots)")
def _report(p: argparse.ArgumentParser):
    p.add_argument("--tokenizer", action="append", required=True, metavar="SPEC",
                   help="a tokenizer.json (or a folder with one) or a T-Free setting tfree:v=8192,m=10[,k=..]; repeat")
    p.add_argument("--corpus", action="append", required=True, metavar="SPEC",
                   help="default | multilingual | [NAME=]PATH; repeat")
    p.add_argument("--base", metavar="SPEC", help="the NSL base (default: the first --tokenizer)")
    p.add_argument("--renyi-order", type=float, default=2.5)
    p.add_argument("--collision-words", type=int, default=2000, help="T-Free: most frequent words checked")
    p.add_argument("--collision-threshold", type=float, default=0.9, help="T-Free: Jaccard overlap counted")
    p.add_argument("--out", required=True, help="the report folder")

    def run(a: argparse.Namespace) -> str:
        from .report import report

        rows = report(a.tokenizer, a.corpus, a.out, base=a.base, renyi_order=a.renyi_order,
                      collision_words=a.collision_words, collision_threshold=a.collision_threshold)
        return f"wrote {a.out}/report.md, report.json and plots ({len(rows)} rows)"
    return run


@verb("count", "count a BPE tokenizer's token frequencies on corpora (parallel, resumable; or merge counts)")
def _count(p: argparse.ArgumentParser):
    p.add_argument("--tokenizer", help="the tokenizer.json (or a folder with one) whose ids are counted")
    p.add_argument("--corpus", action="append", default=[], metavar="SPEC",
                   help="default | multilingual | [NAME=]PATH (text, a folder of .txt, a MemoryMap of text or of ids)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, one shard (file / ~8 MB) each at a time")
    p.add_argument("--merge", nargs="+", metavar="COUNTS", help="add up these counts files instead of counting")
    p.add_argument("--out", required=True, help="the counts JSON to write (a rerun resumes from OUT.progress.json)")

    def run(a: argparse.Namespace) -> str:
        from .count import count_tokens, merge_counts

        if a.merge:
            c = merge_counts(a.merge, a.out)
            return f"wrote {a.out}: {c.tokens:,} tokens of {len(a.merge)} counts files"
        if not a.tokenizer or not a.corpus:
            raise ValueError("toklab count needs --tokenizer and --corpus (or --merge)")
        c = count_tokens(a.tokenizer, a.corpus, a.out, workers=a.workers)
        used = int((c.counts > 0).sum())
        return (f"wrote {a.out}: {c.tokens:,} tokens in {c.documents:,} documents ({c.shards} shards); "
                f"{used:,} of {c.vocab_size:,} ids used")
    return run


@verb("prune", "a smaller BPE keeping the most frequent tokens (merges stay valid); optionally remap a checkpoint")
def _prune(p: argparse.ArgumentParser):
    p.add_argument("--tokenizer", required=True, help="the tokenizer.json to prune (or a folder with one)")
    p.add_argument("--counts", required=True, help="its token counts (toklab count)")
    p.add_argument("--size", type=int, required=True, help="ids in the pruned tokenizer")
    p.add_argument("--out", required=True, help="the pruned tokenizer.json")
    p.add_argument("--corpus", action="append", metavar="SPEC",
                   help="check the round trip and measure the NSL change here (default: the counted corpora)")
    p.add_argument("--checkpoint", help="a classic checkpoint of --tokenizer whose embedding/head rows to remap")
    p.add_argument("--out-checkpoint", help="where the remapped checkpoint goes (for training.init_from)")
    p.add_argument("--force", action="store_true", help="replace an existing --out-checkpoint")

    def run(a: argparse.Namespace) -> str:
        import json
        from pathlib import Path

        from megatron_tfree.checkpoint.files import write_atomic

        from .count import Counts, file_sha256
        from .prune import evaluate, prune_bpe, remap_checkpoint
        from .sources import parse_corpus
        from .specs import BpeSpec

        if (a.checkpoint is None) != (a.out_checkpoint is None):
            raise ValueError("--checkpoint and --out-checkpoint go together")
        spec = BpeSpec(a.tokenizer)
        counts = Counts.read(a.counts)
        if counts.tokenizer_sha256 != file_sha256(spec.path):
            raise ValueError(f"{a.counts} counts {counts.tokenizer}, not {spec.path} (the files differ)")
        pruned = prune_bpe(spec.config, counts.counts, a.size)
        texts = (d for c in (a.corpus or counts.corpora) for s in parse_corpus(c) for d in s.documents())
        rep = evaluate(spec, pruned, counts.counts, texts, progress=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(a.out, json.dumps(pruned.tokenizer_json, ensure_ascii=False, indent=2))
        lines = [f"wrote {a.out}: {rep.size:,} of {rep.old_size:,} tokens ({pruned.protected} special/byte tokens "
                 f"kept); coverage {rep.coverage:.2%} of the counted tokens; NSL {rep.nsl:.4f} (tokens after / "
                 f"before) on {rep.documents:,} documents, round trip exact"]
        if a.checkpoint:
            remap_checkpoint(a.checkpoint, pruned, a.out_checkpoint, original_vocab=spec.tokenizer.get_vocab(True),
                             overwrite=a.force, progress=True)
            lines.append(f"wrote {a.out_checkpoint}: embedding and head rows of the kept tokens "
                         f"(training.init_from={a.out_checkpoint})")
        return "\n".join(lines)
    return run


@verb("swap", "a new tokenizer for a trained model: FVT (classic -> classic) or classic -> T-Free")
def _swap(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, help="the trained classic model (any layout)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--tokenizer", help="the new classic tokenizer.json (FVT)")
    target.add_argument("--tfree", metavar="SETTING", help="a T-Free tokenizer, e.g. v=8192,m=10[,k=..] (least squares)")
    p.add_argument("--method", choices=["fvt", "random"], default="fvt",
                   help="FVT: rows of new tokens not in the old vocabulary: mean of their old pieces, or random")
    p.add_argument("--corpus", action="append", metavar="SPEC", help="--tfree: the words to fit on (default: default)")
    p.add_argument("--words", type=int, default=20000, help="--tfree: the most frequent words fitted")
    p.add_argument("--heldout", type=float, default=0.1, help="--tfree: share of those words held out")
    p.add_argument("--ridge", type=float, default=0.05, help="--tfree: pull towards the random init")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the checkpoint to write (for training.init_from)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    def run(a: argparse.Namespace) -> str:
        import json

        from megatron_tfree.checkpoint import CheckpointReader
        from megatron_tfree.checkpoint.files import WORD_COUNTS_FILE

        from .rewrite import write_checkpoint
        from .swap import fvt_rows, tfree_rows

        reader = CheckpointReader(a.checkpoint)
        if a.tokenizer:
            from megatron_tfree.tokenizer.classic import ClassicTokenizer

            from .specs import BpeSpec

            new = ClassicTokenizer(BpeSpec(a.tokenizer).tokenizer, end_of_text=reader.tokenizer.end_of_text)
            rows, stats = fvt_rows(reader, new.hf_tokenizer, a.method, a.seed)
            write_checkpoint(reader, a.out, new, rows, {"toklab": "swap", "method": a.method, **stats.to_dict()},
                             overwrite=a.force, progress=True)
            return (f"wrote {a.out}: {new.vocab_size:,} tokens: {stats.copied:,} copied, {stats.averaged:,} averaged, "
                    f"{stats.random:,} random")
        from .sources import parse_corpus
        from .specs import TFreeSpec

        tfree = TFreeSpec("tfree:" + a.tfree).tokenizer
        texts = (d for c in (a.corpus or ["default"]) for s in parse_corpus(c) for d in s.documents())
        rows, fit, counts = tfree_rows(reader, tfree, texts, a.words, a.heldout, a.ridge, a.seed)
        write_checkpoint(reader, a.out, tfree, rows, {"toklab": "swap", "method": "least-squares", **fit.to_dict()},
                         extra_json={WORD_COUNTS_FILE: dict(counts.most_common())}, overwrite=a.force, progress=True)
        res = ", ".join(f"{n.split('.')[0]} {fit.heldout_residual.get(n, fit.residual[n]):.3f} "
                        f"(random init {fit.heldout_residual_init.get(n, fit.residual_init[n]):.3f})"
                        for n in fit.residual)
        return (f"wrote {a.out}: T-Free v={tfree.vocab_size} m={tfree.vocab_population} fitted on {fit.words:,} "
                f"words; held-out relative residual {res}; blocks copied\n" + json.dumps(fit.to_dict()))
    return run


@verb("soft", "learn a byte transformer that predicts a classic model's embedding rows (held-out retrieval, bpb)")
def _soft(p: argparse.ArgumentParser):
    p.add_argument("--checkpoint", required=True, help="a classic model (any layout)")
    p.add_argument("--out", required=True, help="folder for soft_encoder.safetensors, soft.json and report.json")
    p.add_argument("--loss", default="mse,retrieval", help="comma list of mse, l1, retrieval (summed)")
    p.add_argument("--loss-weights", type=_weights, help="one weight per --loss, e.g. 1,0.5")
    p.add_argument("--temperature", type=float, default=0.1, help="retrieval: logits = p . E_j / (h * temperature)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--holdout", type=float, default=0.1, help="share of the vocabulary never trained on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-corpus", action="append", metavar="SPEC",
                   help="also report bits per byte with the predicted embedding on these texts")
    p.add_argument("--eval-docs", type=int, default=8, help="documents of --eval-corpus used (the first ones)")
    p.add_argument("--device", default="cpu")

    def run(a: argparse.Namespace) -> str:
        import itertools
        import json
        from pathlib import Path

        from megatron_tfree.checkpoint.files import write_atomic

        from .soft import SoftConfig, save, soft_from_checkpoint
        from .sources import parse_corpus

        cfg = SoftConfig(hidden=a.hidden, layers=a.layers, heads=a.heads, losses=tuple(a.loss.split(",")),
                         weights=a.loss_weights, temperature=a.temperature, steps=a.steps, batch_size=a.batch_size,
                         lr=a.lr, holdout=a.holdout, seed=a.seed)
        texts = None
        if a.eval_corpus:
            docs = (d for c in a.eval_corpus for s in parse_corpus(c) for d in s.documents())
            texts = list(itertools.islice(docs, a.eval_docs))
        result, rep = soft_from_checkpoint(a.checkpoint, cfg, texts, progress=True, device=a.device)
        save(result, a.out)
        write_atomic(Path(a.out) / "report.json", json.dumps(rep, indent=1) + "\n")
        line = (f"wrote {a.out}: retrieval accuracy {rep['train_accuracy']:.3f} on training tokens, "
                f"{rep['heldout_accuracy']:.3f} on {len(result.heldout_ids):,} held-out tokens (chance "
                f"{1 / rep['vocab_size']:.5f})")
        if texts:
            line += (f"; bits per byte {rep['bpb_original']:.4f} -> {rep['bpb_soft']:.4f} with every row predicted, "
                     f"{rep['bpb_soft_heldout_rows']:.4f} with the held-out rows predicted")
        return line
    return run


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_tfree.toklab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    runners = {}
    for name, (help, make) in VERBS.items():
        runners[name] = make(sub.add_parser(name, help=help, description=help))
    args = parser.parse_args(argv)
    apply_debug(args)
    return run_tool(f"toklab {args.verb}", lambda: runners[args.verb](args))


if __name__ == "__main__":
    sys.exit(main())
