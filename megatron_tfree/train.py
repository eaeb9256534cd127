"""Train a T-Free (or classic-tokenizer) model: ``python -m megatron_tfree.train --config CFG [overrides]``.

    python -m megatron_tfree.train --config configs/tiny.yaml training.train_iterations=50
    torchrun --nproc_per_node 2 -m megatron_tfree.train --config configs/tiny.yaml parallel.zero_stage=2
    deepspeed --num_gpus 2 megatron_tfree/train.py --config configs/tiny.yaml

Overrides are ``section.key=value`` (YAML values). The run resumes from ``training.load_dir`` or
``{training.save_dir}/latest`` when present. The process group is torn down before exit (barrier,
drop the engine, gc, destroy) so gloo does not abort the interpreter at shutdown.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file by the deepspeed launcher: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-tfree-train",
        description="Train a T-Free or classic-tokenizer GPT model with DeepSpeed.",
        epilog="Example: megatron-tfree-train --config configs/tiny.yaml training.train_iterations=20 "
               "model.hidden_size=128",
    )
    p.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. training.lr=3e-4 parallel.zero_stage=2")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher (LOCAL_RANK is read from the environment)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected error (a bad config, "
                   "a busy save dir, ...; also MEGATRON_TFREE_DEBUG=1) instead of one line")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.debug:
        os.environ["MEGATRON_TFREE_DEBUG"] = "1"

    from megatron_tfree.config import load_config
    from megatron_tfree.errors import EXPECTED_ERRORS, debug, report

    prog = "megatron-tfree-train"
    try:
        cfg = load_config(args.config, args.overrides)
    except EXPECTED_ERRORS as e:
        return report(prog, e)

    from megatron_tfree.training.engine import teardown
    from megatron_tfree.training.loop import CollectiveTimeout, train

    try:
        result = train(cfg)
    except BaseException as e:
        if isinstance(e, CollectiveTimeout):  # a peer is gone: no teardown collective would finish
            report(prog, e)
            sys.stderr.flush()
            os._exit(3)
        gc.collect()
        teardown(barrier=False)
        if isinstance(e, EXPECTED_ERRORS) and not debug():
            return report(prog, e)
        raise
    gc.collect()
    teardown()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.last_eval:
        print("final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in result.last_eval.items()))
    print(f"checkpoint: {result.save_dir}  (metrics.jsonl, loss.png beside it)")
    if cfg.training.sample_prompt:
        from megatron_tfree.inference import InferencePipe

        pipe = InferencePipe.from_checkpoint(result.save_dir)
        t = cfg.training
        text = pipe.generate(t.sample_prompt, max_words=t.sample_words, temperature=t.sample_temperature,
                             top_k=t.sample_top_k or None, seed=t.seed)
        how = f"temperature {t.sample_temperature}, top-k {t.sample_top_k}" if t.sample_temperature else "greedy"
        print(f"sample ({how}, {t.sample_words} words) from {t.sample_prompt!r}:")
        print(cfg.training.sample_prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
