"""One optimizer step and one evaluation, with and without pipeline parallelism.

* :func:`train_step`: ``gradient_accumulation_steps`` micro-batches through ``engine(batch)`` /
  ``engine.backward`` / ``engine.step`` (data and tensor parallelism, ZeRO 0-3).
* :func:`pipe_train_step`: one ``engine.train_batch`` of DeepSpeed's pipeline engine (the same number
  of micro-batches, fed as ``(inputs, labels)`` tuples, see :mod:`megatron_tfree.model.pipe`).
* :func:`evaluate`: held-out loss (and bits per byte) through ``engine(batch)`` or, for pipelines,
  ``engine.eval_batch`` one micro-batch at a time; the figures are computed where the logits are
  (the last stage) and summed over the world, so every rank (rank 0 logs) holds them.

Counting rule (TP peers see the same batches, pipeline stages the same micro-batches): losses,
target units and training words are counted by the ranks with ``tp_rank == 0`` on the last stage
only, then summed over the world.

A step with a non-finite loss on any rank is vetoed (:class:`~.engine.GuardedAdamW`); in a pipeline
the veto is decided inside ``train_batch`` just before its optimizer step (:func:`install_pipe_veto`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_tfree.parallel import state as pstate
from megatron_tfree.parallel.host import all_reduce_host

# (model, batch, logits) -> (bits, bytes) summed over the positions with loss weight > 0
BitsFn = Callable[[torch.nn.Module, Any, torch.Tensor], tuple[float, float]]


def counts_here() -> bool:
    """Whether this rank counts losses, units and words (``tp_rank == 0`` on the last stage)."""
    st = pstate.get()
    return st.tp_rank == 0 and st.is_last_stage


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_host(t)


def _count_words(batch: Any, word_counts: Counter) -> float:
    """Update ``word_counts`` with the batch's target units; returns the number of weighted targets."""
    if batch.target_units is not None:
        word_counts.update(u for row in batch.target_units for u in row if u)
    return float((batch.loss_weights > 0).sum())


def is_pipeline(engine: Any) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


def evaluate(engine: Any, cfg: Any, loader: Any, bits_fn: Optional[BitsFn] = None) -> dict[str, float]:
    """Mean held-out loss over ``training.eval_iterations`` micro-batches per data-parallel rank
    (weighted by the number of target units, averaged over data-parallel ranks) and, where the
    tokenizer kind has an estimator, ``bits_per_byte``. Every rank returns the same figures."""
    from megatron_tfree.parallel.vocab import gather_logits

    pipe = is_pipeline(engine)
    count = counts_here()
    tp, last_stage = pstate.get().tp, pstate.get().is_last_stage
    was_training = engine.module.training
    sums = torch.zeros(4, dtype=torch.float64)  # loss * weight, weight, bits, bytes
    engine.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(loader):
                if i >= cfg.training.eval_iterations:
                    break
                if pipe:
                    from megatron_tfree.model.pipe import to_pipe

                    loss, logits = engine.eval_batch(iter([to_pipe(batch)]), return_logits=True,
                                                     num_micro_batches=1)
                else:
                    logits = engine(batch)
                    loss = engine.module.loss_from_logits(logits, batch)
                if bits_fn is not None and tp > 1 and last_stage:  # every TP peer joins the gather
                    logits = gather_logits(logits)
                if not count:
                    continue
                weight = float(batch.loss_weights.sum())
                sums[0] += float(loss) * weight
                sums[1] += weight
                if bits_fn is not None:
                    bits, nbytes = bits_fn(engine.module, batch, logits)
                    sums[2] += bits
                    sums[3] += nbytes
    finally:
        engine.train(was_training)
    _all_reduce(sums)
    out = {"eval_loss": float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")}
    if bits_fn is not None and sums[3] > 0:
        out["bits_per_byte"] = float(sums[2] / sums[3])
    return out


# --------------------------------------------------------------------------------------------------
# data / tensor parallel step
# --------------------------------------------------------------------------------------------------


def _grad_norm_stage0(engine: Any) -> float:
    """Global gradient norm from ``param.grad`` (plain fp32 without ZeRO, where DeepSpeed keeps none);
    TP-aware: replicated parameters count once, shards of model-parallel parameters are summed."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    st = pstate.get()
    squares = torch.zeros(1, dtype=torch.float64)
    for p in engine.module.parameters():
        if p.grad is not None and (st.tp_rank == 0 or is_model_parallel_parameter(p)):
            squares += float(p.grad.detach().double().pow(2).sum())
    group = engine.mpu.get_model_parallel_group() if is_pipeline(engine) else st.tp_group
    if dist.is_initialized() and group is not None:
        all_reduce_host(squares, group=group)
    return float(squares.sqrt())


def train_step(engine: Any, optimizer: Any, data_iter: Iterator, gas: int, dp_world: int,
               word_counts: Counter) -> dict[str, Any]:
    """Run one optimizer step of ``gas`` micro-batches. Returns loss (mean over micro-batches and
    data-parallel ranks; NaN when non-finite), grad_norm, units (target units, all ranks), skipped."""
    if is_pipeline(engine):
        return pipe_train_step(engine, optimizer, data_iter, word_counts)
    count = counts_here()
    local = torch.zeros(3, dtype=torch.float64)  # non-finite count, loss sum, target units
    own_norm = engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())
    grad_norm = None
    skipped = False
    for micro in range(gas):
        batch = next(data_iter)
        if count:
            local[2] += _count_words(batch, word_counts)
        loss = engine(batch, return_loss=True)
        value = float(loss.detach())
        local[0] += 0.0 if math.isfinite(value) else 1.0
        local[1] += value if count else 0.0
        if micro == gas - 1:  # every loss of the step is known: agree across ranks on skipping
            summed = _all_reduce(local.clone())
            skipped = bool(summed[0] > 0)
            optimizer.skip_next = skipped
        engine.backward(loss)
        if micro == gas - 1 and own_norm and not skipped:
            grad_norm = _grad_norm_stage0(engine)
        engine.step()
    optimizer.skip_next = False
    if grad_norm is None and not skipped:
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
    mean_loss = float(summed[1]) / (gas * dp_world)
    return {"loss": float("nan") if skipped else mean_loss, "grad_norm": grad_norm,
            "units": float(summed[2]), "skipped": skipped}


# --------------------------------------------------------------------------------------------------
# pipeline step
# --------------------------------------------------------------------------------------------------


def install_pipe_veto(engine: Any, optimizer: Any) -> None:
    """Make the pipeline engine's optimizer step honour non-finite losses like :func:`train_step`.

    Every rank runs the ``OptimizerStep`` instruction once per ``train_batch``, after all forward and
    backward passes; there the last stage's losses of the batch (``engine.fwd_outputs``) are known.
    The wrapped instruction agrees on skipping across the world, vetoes the update
    (``optimizer.skip_next``), records the gradient norm and leaves ``engine.mt_step_info``.
    """
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    original = PipelineEngine._INSTRUCTION_MAP[schedule.OptimizerStep]
    own_norm = engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled())

    def optimizer_step(self: Any, lr_kwargs: Any = None) -> None:
        bad = torch.zeros(1, dtype=torch.float64)
        if self.is_last_stage():
            bad[0] = sum(0.0 if bool(torch.isfinite(l).all()) else 1.0 for l in self.fwd_outputs)
        skipped = bool(_all_reduce(bad)[0] > 0)
        grad_norm = _grad_norm_stage0(self) if own_norm and not skipped else None
        optimizer.skip_next = skipped
        try:
            original(self, lr_kwargs)
        finally:
            optimizer.skip_next = False
        if grad_norm is None and not skipped:
            norm = self.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else None
        self.mt_step_info = {"skipped": skipped, "grad_norm": grad_norm}

    engine._INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.OptimizerStep: optimizer_step}


def pipe_train_step(engine: Any, optimizer: Any, data_iter: Iterator, word_counts: Counter) -> dict[str, Any]:
    """One ``engine.train_batch`` (``gradient_accumulation_steps`` micro-batches through the pipeline).
    Same result fields as :func:`train_step`; the loss is the engine's (last stage, averaged over
    micro-batches and data-parallel ranks, broadcast to every stage)."""
    from megatron_tfree.model.pipe import to_pipe

    count = counts_here()
    units = torch.zeros(1, dtype=torch.float64)

    def feed() -> Iterator[Any]:
        while True:
            batch = next(data_iter)
            if count:
                units[0] += _count_words(batch, word_counts)
            yield to_pipe(batch)

    loss = float(engine.train_batch(feed()))
    info = getattr(engine, "mt_step_info", {"skipped": not math.isfinite(loss), "grad_norm": None})
    skipped = info["skipped"]
    return {"loss": float("nan") if skipped else loss, "grad_norm": info["grad_norm"],
            "units": float(_all_reduce(units)[0]), "skipped": skipped}
