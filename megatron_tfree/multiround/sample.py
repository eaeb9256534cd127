"""The batches of the next round: ``p_i = softmax(l_i / T)``, ``N0`` batches drawn without replacement.

``l_i`` is the loss of batch ``i`` in a scores directory (:mod:`.score`), ``T > 0`` the temperature:
a large ``T`` approaches uniform sampling of batches, a small one picks the highest-loss batches.

The draw is *successive sampling without replacement*: the first batch is ``i`` with probability
``p_i``, every further draw picks among the batches not drawn yet with probability proportional to
their ``p`` (what ``numpy.random.Generator.choice(n, N0, replace=False, p=p)`` does). It is computed
with the Gumbel-top-k trick: with ``G_i`` independent standard Gumbel variables from
``numpy.random.default_rng(seed)``, the batches of the ``N0`` largest keys ``l_i / T + G_i``, in
descending order of key, are distributed exactly as ``N0`` successive draws (Yellott 1977; Kool et al.
2019). Working with ``l_i / T`` instead of ``p_i`` keeps small temperatures exact: where ``p`` would
underflow to 0 for all but the largest loss (and ``choice`` would refuse), the draw still returns
``N0`` distinct batches, in the ``T -> 0`` limit the ``N0`` highest losses in descending order.

The sample index (:func:`megatron_tfree.data.round_index.write_sample_index`) holds the sample ids
of the chosen batches, flattened, each batch's ids together and in the trainer's order. The batches
come in a seeded random order (``order="shuffle"``, the default; the same generator, after the draw):
draw order puts the high-loss batches first and would make the round a curriculum. ``order="draw"``
keeps the draw order. Trained with the same global batch size as the scores, step ``k`` of the next
round trains on exactly chosen batch ``k``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..data.round_index import read_scores, write_sample_index

ORDERS = ("shuffle", "draw")


def _check(losses: np.ndarray, temperature: float) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or losses.size == 0:
        raise ValueError(f"need a non-empty 1-D array of batch losses, got shape {losses.shape}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0, got {temperature!r}")
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise ValueError(f"batch {int(bad[0])} has a non-finite loss ({losses[bad[0]]}; {bad.size} such batches): "
                         f"the scores cannot define a distribution")
    with np.errstate(over="ignore"):
        logits = losses / temperature
    if not np.isfinite(logits).all():
        raise ValueError(f"--temperature {temperature:g} is too small for losses up to {np.abs(losses).max():g} "
                         f"(l / T overflows)")
    return logits


def probabilities(losses: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(losses / temperature)`` (float64, sums to 1)."""
    logits = _check(losses, temperature)
    z = np.exp(logits - logits.max())
    return z / z.sum()


def draw_batches(losses: np.ndarray, temperature: float, num: int, seed: int) -> np.ndarray:
    """``num`` distinct batch indices, in draw order, drawn without replacement from
    ``softmax(losses / temperature)`` (module docstring); a pure function of its arguments."""
    logits = _check(losses, temperature)
    if not 1 <= num <= logits.size:
        raise ValueError(f"--batches must be between 1 and the number of scored batches ({logits.size}), got {num}")
    rng = np.random.default_rng(_seed(seed))
    keys = logits + rng.gumbel(size=logits.size)
    if num < logits.size:
        top = np.argpartition(-keys, num - 1)[:num]
    else:
        top = np.arange(logits.size)
    return top[np.argsort(-keys[top], kind="stable")].astype(np.int64)


def _seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def effective_batches(p: np.ndarray) -> float:
    """``exp(entropy(p))``: how many equally likely batches the distribution is worth."""
    nz = p[p > 0]
    return float(np.exp(-(nz * np.log(nz)).sum()))


def make_sample_index(scores_dir: str | os.PathLike, temperature: float, num_batches: int, seed: int,
                      out: str | os.PathLike, order: str = "shuffle") -> tuple[Path, dict[str, Any]]:
    """Draw ``num_batches`` batches of ``scores_dir`` and write the sample index ``out`` (+ sidecar).
    Returns the path and the sidecar's metadata."""
    if order not in ORDERS:
        raise ValueError(f"--order must be one of {ORDERS}, got {order!r}")
    meta, losses, batches = read_scores(scores_dir)
    chosen = draw_batches(losses, temperature, num_batches, seed)
    draw_order = chosen.copy()
    if order == "shuffle":
        chosen = chosen[np.random.default_rng([_seed(seed), 1]).permutation(chosen.size)]
    ids = batches[chosen].reshape(-1)
    p = probabilities(losses, temperature)
    info = {
        "scores": str(Path(scores_dir).resolve()), "scores_key": meta.get("key"),
        "checkpoint": meta.get("checkpoint"), "checkpoint_step": meta.get("checkpoint_step"),
        "data": meta.get("data"), "batch_size": meta["batch_size"], "epoch": meta.get("epoch"),
        "data_seed": meta.get("data_seed"), "temperature": float(temperature), "seed": int(seed), "order": order,
        "num_batches": int(num_batches), "scored_batches": int(losses.size),
        "batches": chosen.tolist(), "draw_order": draw_order.tolist(),
        "stats": {"effective_batches": effective_batches(p), "p_max": float(p.max()), "p_min": float(p.min()),
                  "mean_loss_all": float(losses.mean()), "mean_loss_chosen": float(losses[chosen].mean())},
    }
    return write_sample_index(out, ids, info), info
