"""``python -m megatron_tfree.multiround VERB ...`` (also ``python tools/multiround.py``): see the package docstring.

    multiround score  --checkpoint CKPT [--config cfg.yaml] [section.key=value ...] --out INDEX_DIR
                      [--batches N] [--batch-size B] [--micro-batch-size M] [--epoch E] [--flush-every K]
    torchrun --nproc_per_node 8 -m megatron_tfree.multiround score --checkpoint CKPT --out INDEX_DIR
    multiround sample --scores INDEX_DIR --temperature T --batches N0 --seed S --out round2.npy [--order shuffle|draw]

then train the next round with ``data.sample_index=round2.npy`` (e.g. and ``training.init_from=CKPT``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from megatron_tfree.cli import add_debug_flag, apply_debug, run_tool


def _score_parser(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], str]:
    p.add_argument("--checkpoint", required=True, help="the frozen model: a run dir (its latest) or any checkpoint dir")
    p.add_argument("--config", help="YAML for the data and batch options (default: the checkpoint's config.yaml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. data.prefix_paths=[a,b] training.micro_batch_size=16")
    p.add_argument("--out", required=True, help="the scores directory (INDEX_DIR); a rerun continues it")
    p.add_argument("--batches", type=int, help="score only the first N batches of the epoch (default: all)")
    p.add_argument("--batch-size", type=int, help="samples per batch (default: training.global_batch_size, else "
                   "micro_batch_size * gradient_accumulation_steps * the checkpoint's data-parallel size)")
    p.add_argument("--micro-batch-size", type=int, help="samples per forward pass (default training.micro_batch_size)")
    p.add_argument("--epoch", type=int, default=0, help="which epoch of the trainer's sample order (default 0)")
    p.add_argument("--flush-every", type=int, default=32, help="save partial results every K batches (default 32)")
    p.add_argument("--flush-seconds", type=float, default=60.0, help="... or every this many seconds (default 60)")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK if there is a GPU, else cpu")

    def run(a: argparse.Namespace) -> str:
        from megatron_tfree.checkpoint.files import CONFIG_FILE
        from megatron_tfree.checkpoint.reader import CheckpointReader
        from megatron_tfree.config import load_config

        from .score import init_distributed_from_env, score_checkpoint

        created = init_distributed_from_env()
        try:
            reader = CheckpointReader(a.checkpoint)
            cfg = reader.cfg
            if a.config or a.overrides:
                cfg = load_config(a.config or reader.tag_dir / CONFIG_FILE, a.overrides)
            r = score_checkpoint(a.checkpoint, a.out, cfg=cfg, batch_size=a.batch_size,
                                 micro_batch_size=a.micro_batch_size, num_batches=a.batches, epoch=a.epoch,
                                 flush_every=a.flush_every, flush_seconds=a.flush_seconds, device=a.device,
                                 progress=True, reader=reader)
        finally:
            if created:
                import torch.distributed as dist

                dist.destroy_process_group()
        if r.already_done:
            return f"{r.out_dir} already holds the scores of this job ({r.num_batches} batches of {r.batch_size})"
        return (f"scored {r.num_batches} batches of {r.batch_size} samples ({r.scored_here} by this process): "
                f"{r.out_dir}/scores.json, scores.npy, batches.npy")
    return run


def _sample_parser(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], str]:
    from .sample import ORDERS

    p.add_argument("--scores", required=True, help="a complete scores directory (INDEX_DIR of `score`)")
    p.add_argument("--temperature", type=float, required=True, help="T in p_i = softmax(l_i / T)")
    p.add_argument("--batches", type=int, required=True, help="N0: how many batches to draw (without replacement)")
    p.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    p.add_argument("--order", choices=ORDERS, default="shuffle",
                   help="the chosen batches in a seeded random order (default) or in draw order")
    p.add_argument("--out", required=True, help="the sample index to write (NAME.npy, plus NAME.json)")

    def run(a: argparse.Namespace) -> str:
        from ..data.round_index import sidecar_path
        from .sample import make_sample_index

        path, info = make_sample_index(a.scores, a.temperature, a.batches, a.seed, a.out, order=a.order)
        s = info["stats"]
        return (f"wrote {path} ({a.batches} batches of {info['batch_size']} = {a.batches * info['batch_size']} "
                f"samples) and {sidecar_path(path)}; p is worth {s['effective_batches']:.1f} of "
                f"{info['scored_batches']} batches (p_max {s['p_max']:.3g}); mean loss {s['mean_loss_chosen']:.4f} "
                f"chosen, {s['mean_loss_all']:.4f} all. Train on it with data.sample_index={path}")
    return run


VERBS = {"score": ("one loss per training batch of an epoch with a frozen checkpoint", _score_parser),
         "sample": ("draw the next round's batches from the scores (softmax(l / T), without replacement)",
                    _sample_parser)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_tfree.multiround", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    runners = {name: make(sub.add_parser(name, help=help, description=help)) for name, (help, make) in VERBS.items()}
    args = parser.parse_args(argv)
    apply_debug(args)
    return run_tool(f"multiround {args.verb}", lambda: runners[args.verb](args))


if __name__ == "__main__":
    sys.exit(main())
