"""``python -m megatron_tfree.generate``: complete a prompt with a trained checkpoint.

Thin entry point: parses the options and calls :class:`megatron_tfree.inference.InferencePipe`.
Example::

    python -m megatron_tfree.generate --checkpoint runs/tiny --prompt "Hello" --max-words 16
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_tfree.generate",
                                description="Generate text with a megatron_tfree checkpoint (T-Free or classic).")
    p.add_argument("--checkpoint", required=True, help="save dir (with a 'latest' file) or a checkpoint tag dir")
    p.add_argument("--prompt", required=True, help="the text to complete")
    p.add_argument("--max-words", type=int, default=32, help="most units (words/tokens) to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); T-Free scores are in "
                   "about [-1, 1], so useful values are small (0.01-0.1)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k best units")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--reduce-to", type=int, default=None, help="T-Free: keep the special words plus the N most "
                   "frequent dictionary words")
    p.add_argument("--more-words", action="append", default=None, metavar="TEXT",
                   help="T-Free: extra text whose words join the dictionary for this call (repeatable)")
    p.add_argument("--edge-weight", type=float, default=1.0, help="T-Free: weight of word-edge trigram ids (default 1)")
    p.add_argument("--word-counts", default=None, help="T-Free: extra word counts (JSON {word: count} or word<TAB>count "
                   "TSV) added to the checkpoint's; forces building the dictionary")
    p.add_argument("--allow-pickle", action="store_true", help="accept a pickled --word-counts file (unsafe for "
                   "untrusted files)")
    p.add_argument("--stop-word", action="append", default=None, help="stop after this word (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .errors import EXPECTED_ERRORS, report
    from .inference import InferencePipe

    try:
        pipe = InferencePipe.from_checkpoint(args.checkpoint, device=args.device, word_counts=args.word_counts,
                                             allow_pickle=args.allow_pickle)
        text = pipe.generate(args.prompt, max_words=args.max_words, more_words=args.more_words,
                             reduce_to=args.reduce_to, edge_weight=args.edge_weight, temperature=args.temperature,
                             top_k=args.top_k, seed=args.seed, stop_words=args.stop_word)
    except EXPECTED_ERRORS + (ValueError,) as e:  # a missing or unreadable checkpoint, a bad option value
        return report("megatron-tfree-generate", e)
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
