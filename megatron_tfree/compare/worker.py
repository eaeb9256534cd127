"""Train one arm and measure it: ``python -m megatron_tfree.compare.worker ARM.yaml RESULT.json [--threads N]``.

The comparison starts one such process per arm (:mod:`.runner`), so the peak resident memory it reports
is that arm's training alone; :func:`train_and_measure` is also called in-process (``compare.isolate:
false``, tests). The training is :func:`megatron_tfree.training.loop.train` (it resumes from the arm's
``latest`` checkpoint); the result JSON holds the measured figures of this process:

``peak_rss_bytes`` (high-water mark of resident memory; in-process: since the reset before training
when the kernel allows it, see ``peak_rss_scope``), ``rss_before_bytes`` (resident memory just before
training: interpreter, torch, DeepSpeed), ``cuda_peak_bytes`` (``torch.cuda.max_memory_allocated``,
null on CPU), ``device``, ``threads``, ``wall_s``, ``step`` (the last step trained) and ``skipped_steps``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from . import memory


def train_and_measure(cfg: Any, isolated: bool, threads: int = 0) -> dict[str, Any]:
    """Train ``cfg`` (resuming its save dir) and return the figures measured (see the module docstring)."""
    import torch

    from megatron_tfree.training.loop import train

    if threads:
        torch.set_num_threads(threads)
    before = memory.current_rss_bytes()
    scope = "process" if isolated else ("training" if memory.reset_peak_rss() else "process (reset refused)")
    memory.reset_cuda_peak()
    start = time.perf_counter()
    result = train(cfg)
    return {"peak_rss_bytes": memory.peak_rss_bytes(), "peak_rss_scope": scope, "rss_before_bytes": before,
            "cuda_peak_bytes": memory.cuda_peak_bytes(), "device": "cuda" if memory.cuda_available() else "cpu",
            "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - start, "step": result.step,
            "skipped_steps": result.skipped_steps, "pid": os.getpid()}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_tfree.compare.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the arm's resolved config (YAML)")
    p.add_argument("result", help="where to write the measured figures (JSON)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)

    from megatron_tfree.config import load_config
    from megatron_tfree.errors import EXPECTED_ERRORS, debug, report
    from megatron_tfree.training.engine import teardown

    prog = "megatron-tfree-compare (training)"
    try:
        cfg = load_config(args.config)
        measured = train_and_measure(cfg, isolated=True, threads=args.threads)
    except BaseException as e:
        teardown(barrier=False)
        if isinstance(e, EXPECTED_ERRORS) and not debug():
            return report(prog, e)
        raise
    teardown()
    out = Path(args.result)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(measured, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
