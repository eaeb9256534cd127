"""What an arm was trained on and how fast: text bytes per step, and throughput.

* :func:`consumed` replays the arm's training batches (the trainer's own data loader, same sample order:
  ``data.seed``, single data-parallel rank) for the steps trained and sums, per step, the UTF-8 bytes
  and the units of the weighted targets (``Batch.target_bytes``: exact per-unit bytes, see
  :mod:`megatron_tfree.data.unit_bytes`). The cumulative bytes are the x axis of the held-out curve.
* :func:`throughput`: the median of the trainer's per-step ``words_per_s`` (``metrics.jsonl``; units per
  second: T-Free words, BPE tokens), converted to bytes per second with the arm's measured bytes per
  trained unit and to whitespace words per second with the corpus's bytes per whitespace word, so arms
  with different units compare. Step 1 (warm-up) is left out.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np

from megatron_tfree.training.metrics import METRICS_FILE, read_metrics


def consumed(cfg: Any, tokenizer: Any, steps: int) -> dict[str, list[int]]:
    """``{"bytes": [...], "units": [...]}``: cumulative target bytes / units after step ``0..steps``."""
    from megatron_tfree.data.dataset import build_dataloader
    from megatron_tfree.training.engine import gradient_accumulation_steps

    micro = steps * gradient_accumulation_steps(cfg, 1)
    nbytes, units = np.zeros(steps + 1, np.int64), np.zeros(steps + 1, np.int64)
    if steps:
        loader = build_dataloader(cfg, tokenizer, 0, 1, 0, split="train", progress=False)
        per_step = micro // steps
        for i, batch in zip(range(micro), loader):
            mask = batch.loss_weights > 0
            s = i // per_step + 1
            nbytes[s] += int(batch.target_bytes[mask].sum())
            units[s] += int(mask.sum())
    return {"bytes": np.cumsum(nbytes).tolist(), "units": np.cumsum(units).tolist()}


def throughput(run_dir: str | Path, bytes_per_unit: float, bytes_per_word: float) -> dict[str, Any]:
    """``units_per_s`` (median over steps >= 2), ``bytes_per_s``, ``words_per_s`` (whitespace words)."""
    records = read_metrics(Path(run_dir) / METRICS_FILE)
    rates = [r["words_per_s"] for r in records if r.get("step", 0) >= 2 and r.get("words_per_s")]
    if not rates:
        rates = [r["words_per_s"] for r in records if r.get("words_per_s")]
    if not rates:
        return {"units_per_s": None, "bytes_per_s": None, "words_per_s": None, "steps_timed": 0}
    units = statistics.median(rates)
    return {"units_per_s": units, "bytes_per_s": units * bytes_per_unit,
            "words_per_s": units * bytes_per_unit / bytes_per_word, "steps_timed": len(rates)}
