"""Export a megatron_tfree checkpoint as a Hugging Face model folder (thin CLI over megatron_tfree.hf.export).

    python tools/convert2hf.py --checkpoint runs/tiny --out hf/tiny                 # run dir: its latest
    python tools/convert2hf.py --checkpoint runs/7b/step_1000 --out hf/7b --dtype bf16 --max-shard-size 5GB
    megatron-tfree-convert2hf ... / python -m megatron_tfree.convert2hf ...        # the same

Any layout (TP, PP, DP, ZeRO 0-3; a consolidated or imported directory) is read directly, one layer
at a time. Classic-tokenizer models become a standard LlamaForCausalLM folder; T-Free models a folder
with its own code (load with trust_remote_code=True). The folder is written to a temporary sibling
and renamed when complete; an existing one is replaced only with --force.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert2hf", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--checkpoint", required=True, help="run dir (with 'latest'), tag dir, or consolidated/imported dir")
    p.add_argument("--out", required=True, help="the Hugging Face folder to write")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="weight dtype (default fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size "
                   "(e.g. 5GB, 500MB; default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--reduce-to", type=int, default=None, help="T-Free: keep the special words plus the N most "
                   "frequent words of the decode dictionary")
    p.add_argument("--word-counts", default=None, help="T-Free: extra word counts (JSON or TSV) for the dictionary")
    p.add_argument("--logit-scale", type=float, default=20.0, help="T-Free: exported logits = decode scores x this "
                   "(default 20: generate(temperature=t) samples like InferencePipe at t/20)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from megatron_tfree.checkpoint.memory import return_freed_memory
    from megatron_tfree.cli import run_tool
    from megatron_tfree.hf.export import export

    return_freed_memory()  # large buffers go back to the OS when freed: memory stays about one tensor
    return run_tool("convert2hf", lambda: "wrote " + str(export(
        args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force,
        progress=True, reduce_to=args.reduce_to, word_counts=args.word_counts, logit_scale=args.logit_scale)))


if __name__ == "__main__":
    sys.exit(main())
