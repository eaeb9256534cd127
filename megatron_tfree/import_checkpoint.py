"""Import a model trained elsewhere: ``python -m megatron_tfree.import_checkpoint SRC OUT [overrides]``.

    python tools/import_checkpoint.py hf/llama-tiny runs/llama-tiny            # a Hugging Face Llama folder
    python tools/import_checkpoint.py trigrams/checkpoints runs/tfree-7b \\
        model.loss_pos_weight=300 model.loss_scale=100 --word-counts words.json  # a T-Free reference checkpoint
    python tools/import_checkpoint.py hf/llama-tiny runs/llama-tp2 --layout 2,1,1   # a DeepSpeed checkpoint

SRC is detected: a Hugging Face Llama folder (config.json + safetensors + tokenizer.json) or a T-Free
reference checkpoint (a save dir with 'latest', or one iteration dir with transformer/ and tokenizer/).
OUT is a checkpoint that InferencePipe.from_checkpoint, `python -m megatron_tfree.generate --checkpoint OUT`
and training.init_from=OUT accept (weights only: a fresh optimizer when training starts from it).
Overrides (section.key=value) adjust the imported config (e.g. loss settings the source does not record).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from megatron_tfree.cli import layout_arg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="import_checkpoint", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("src", help="a Hugging Face Llama folder or a T-Free reference checkpoint")
    p.add_argument("out", help="the checkpoint directory to write (atomically)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="changes to the imported config")
    p.add_argument("--layout", type=layout_arg, default=None, metavar="TP,PP,DP",
                   help="write a DeepSpeed checkpoint of this layout instead of a layout-free one")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage for --layout")
    p.add_argument("--word-counts", default=None, help="word counts (JSON or TSV) for the T-Free decode dictionary")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from megatron_tfree.checkpoint.memory import return_freed_memory
    from megatron_tfree.cli import run_tool
    from megatron_tfree.hf.importing import detect, import_checkpoint

    return_freed_memory()  # large buffers go back to the OS when freed: memory stays about one tensor

    def body() -> str:
        kind = detect(args.src).kind
        out = import_checkpoint(args.src, args.out, layout=args.layout, zero_stage=args.zero_stage, force=args.force,
                                overrides=args.overrides, word_counts=args.word_counts, progress=True)
        return f"imported {kind} checkpoint {args.src} -> {out}"

    return run_tool("import_checkpoint", body)


if __name__ == "__main__":
    sys.exit(main())
