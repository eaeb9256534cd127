"""The training loop: micro-batches through the DeepSpeed engine, skipping non-finite steps, logging,
evaluation, checkpoints and the word counter behind the decode dictionary.

    result = train(cfg)                   # fresh run, or resumes from training.load_dir / save_dir/latest

One *step* is ``gradient_accumulation_steps`` micro-batches (``engine.backward`` + ``engine.step``
each, or one ``engine.train_batch`` of a pipeline; see :mod:`.steps`). The layout comes from
``parallel.tensor`` / ``parallel.pipe`` (:func:`~.engine.setup_parallel`); data-parallel ranks read
disjoint parts of the same global sample order, tensor-parallel peers the same batches. When any micro-batch of the step, on any rank, has
a non-finite loss the update is vetoed (:class:`~megatron_tfree.training.engine.GuardedAdamW`):
parameters, optimizer moments and the LR schedule stay put, the step is counted, and more than
``training.max_skipped_steps`` such steps stop the run with :class:`NonFiniteLossError`.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_tfree.checkpoint.lock import SaveDirBusy, SaveDirLock
from megatron_tfree.config import Config
from megatron_tfree.errors import EXPECTED_ERRORS, UserError
from megatron_tfree.parallel.host import all_reduce_host
from megatron_tfree.training import checkpoint as ckpt
from megatron_tfree.training import init_from
from megatron_tfree.training.resume_check import check_resume
from megatron_tfree.training.engine import build_engine, build_model, setup_parallel
from megatron_tfree.training.metrics import PLOT_FILE, MetricsLogger, format_line, plot_loss
from megatron_tfree.training.steps import BitsFn, evaluate, train_step

__all__ = ["BitsFn", "CollectiveTimeout", "NonFiniteLossError", "TrainResult", "bits_per_byte_fn", "classic_bits",
           "evaluate", "train", "train_step"]

class NonFiniteLossError(RuntimeError, UserError):
    """More steps had a non-finite loss than ``training.max_skipped_steps`` allows."""


@dataclass
class TrainResult:
    step: int  # last step taken
    losses: dict[int, Optional[float]] = field(default_factory=dict)  # step -> mean loss (None: skipped)
    skipped_steps: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    save_dir: Path = Path(".")


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------


def classic_bits(model: torch.nn.Module, batch: Any, logits: torch.Tensor) -> tuple[float, float]:
    """Bits and UTF-8 bytes of the targets of a classic (one id per position) batch: CE in nats summed
    over weighted positions / ln 2, and the sum of ``batch.target_bytes`` there."""
    mask = batch.loss_weights.reshape(-1) > 0
    if batch.target_bytes is None:
        raise ValueError("bits per byte needs batch.target_bytes")
    targets = torch.where(mask, batch.target_ids.reshape(-1), torch.zeros_like(batch.target_ids.reshape(-1)))
    ce = torch.nn.functional.cross_entropy(logits.reshape(mask.numel(), -1).float(), targets, reduction="none")
    nats = float(ce[mask].sum())
    return nats / math.log(2), float(batch.target_bytes.reshape(-1)[mask].sum())


def bits_per_byte_fn(tokenizer: Any, cfg: Config, loader: Any) -> BitsFn:
    """The bits-per-byte estimator of a run, built once so every evaluation uses the same one.

    Classic: cross-entropy of the target tokens. T-Free: the decoder's softmax over a decode
    dictionary (:func:`megatron_tfree.inference.bpb.make_bits_fn`) fixed for the whole run: the
    special words plus every word of the held-out batches (the evaluated text's own words join the
    dictionary, as a prompt's words do in generation). A dictionary that grew with the training word
    counts would make evaluations at different steps incomparable.
    """
    if tokenizer.kind == "classic":
        return classic_bits
    from megatron_tfree.inference.bpb import make_bits_fn

    words: Counter = Counter()
    for i, batch in enumerate(loader):
        if i >= cfg.training.eval_iterations:
            break
        for row in batch.target_units or []:
            words.update(w for w in row if w)
    return make_bits_fn(tokenizer, words)


# --------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------


def _rank0_first(fn: Callable[[], Any], what: str, timeout: float) -> Any:
    """Run ``fn`` on rank 0, then on the other ranks (shared caches are built once); ``what`` names the
    wait in a timeout."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = fn() if rank == 0 else None
    if dist.is_initialized():
        with _collectives(f"waiting for rank 0 ({what})", 0, timeout):
            dist.barrier()
    return out if rank == 0 else fn()


def _rank0_decides(fn: Callable[[], Any], what: str, timeout: float) -> Any:
    """``fn()`` computed on rank 0 and sent to every rank (an expected error on rank 0 is raised on all):
    decisions that read shared files, such as which checkpoint to resume, must agree."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except EXPECTED_ERRORS as e:
            box[0] = ("error", e)
    with _collectives(f"waiting for rank 0 ({what})", 0, timeout):
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _make_tokenizer(cfg: Config, resume: Optional[tuple[Path, str]], init: Any) -> Any:
    """The checkpoint's tokenizer when resuming or starting from ``training.init_from``, else the config's
    (a missing classic BPE is fitted on the train split once, see
    :func:`megatron_tfree.data.sources.tokenizer_for_config`)."""
    from megatron_tfree.data.sources import tokenizer_for_config
    from megatron_tfree.tokenizer import load_tokenizer

    if resume is not None:
        return load_tokenizer(resume[0] / resume[1] / ckpt.TOKENIZER_DIR)
    if init is not None:
        return init.tokenizer
    return tokenizer_for_config(cfg)


class CollectiveTimeout(RuntimeError, UserError):
    """A collective did not finish within ``training.collective_timeout``: a peer is hung or dead."""


_TIMEOUT = re.compile(r"timed? ?out|timeout|connection closed by peer|connection reset by peer", re.IGNORECASE)


@contextlib.contextmanager
def _collectives(what: str, step: int, timeout: float) -> Iterator[None]:
    """Turn a collective's timeout (gloo/NCCL raise RuntimeError) into :class:`CollectiveTimeout` naming
    ``what`` this rank was doing and the step."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, UserError) or not _TIMEOUT.search(str(e)):
            raise
        raise CollectiveTimeout(
            f"step {step}: {what} waited longer than training.collective_timeout={timeout:g} s for another rank: a "
            f"rank is hung or dead ({str(e).splitlines()[0][:200]})") from e


def _own_save_dir(cfg: Config, rank: int) -> Optional[SaveDirLock]:
    """Rank 0 takes ``training.save_dir``'s lock before the run writes anything; every rank learns the outcome
    (all raise :class:`SaveDirBusy` when another run owns the directory)."""
    lock, error = None, None
    if rank == 0:
        lock = SaveDirLock(cfg.training.save_dir, cfg.training.lock_stale_after)
        try:
            reason = lock.acquire()
            if reason:
                print(f"took over {lock.path}: {reason}", file=sys.stderr, flush=True)
        except SaveDirBusy as e:
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1 if error is not None else 0])
        with _collectives("taking the save dir", 0, cfg.training.collective_timeout):
            all_reduce_host(flag)
        if error is None and flag.item():
            error = SaveDirBusy(f"{cfg.training.save_dir} is in use by another run (rank 0 says who)")
    if error is not None:
        raise error
    return lock


def train(cfg: Config, stop_after: Optional[int] = None,
          on_step: Optional[Callable[[int, Any, dict], None]] = None) -> TrainResult:
    """Train (or resume training) ``cfg`` up to ``training.train_iterations`` steps. The run owns
    ``training.save_dir`` while it runs (:mod:`megatron_tfree.checkpoint.lock`).

    Args:
        stop_after: stop (with a checkpoint) once this step is reached, as if the job were
            interrupted; the schedule still runs to ``train_iterations``.
        on_step: called as ``on_step(step, engine, record)`` after every step (tests, hooks).
    """
    layout = setup_parallel(cfg)
    lock = _own_save_dir(cfg, layout.rank)
    try:
        return _train(cfg, layout, lock, stop_after, on_step)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, layout: Any, lock: Optional[SaveDirLock], stop_after: Optional[int],
           on_step: Optional[Callable[[int, Any, dict], None]]) -> TrainResult:
    from megatron_tfree.data.dataset import build_dataloader

    t = cfg.training
    rank, dp_rank, dp_world = layout.rank, layout.dp_rank, layout.dp
    save_dir = Path(t.save_dir)
    resume = _rank0_decides(lambda: ckpt.find_resume(cfg), "choosing the checkpoint to resume", t.collective_timeout)
    changes = check_resume(cfg, resume[0] / resume[1], dist.get_world_size()) if resume is not None else []
    init = init_from.open_source(cfg) if resume is None and t.init_from else None
    tokenizer = _rank0_first(lambda: _make_tokenizer(cfg, resume, init), "the tokenizer", t.collective_timeout)
    model = build_model(cfg, tokenizer.vocab_size)
    if init is not None:
        init_from.load_weights(model, init)
    random.seed(t.seed + rank)
    np.random.seed((t.seed + rank) % 2**32)
    torch.manual_seed(t.seed + rank)
    engine, optimizer, _ = build_engine(cfg, model)
    model = None  # the engine holds it
    gas = engine.gradient_accumulation_steps()
    state, word_counts = ckpt.TrainerState(world_size=dist.get_world_size()), Counter()
    truncate = None
    if resume is not None:
        state, word_counts = ckpt.load_checkpoint(engine, *resume)
        state.world_size = dist.get_world_size()
        if resume[0].resolve() == save_dir.resolve():
            truncate = state.metrics_position
    # only the save dir's owner gets here: it cuts metrics back to the resumed step, or (a run of its own,
    # not resumed from this dir) starts a fresh file, keeping an old one aside
    metrics = MetricsLogger(save_dir, enabled=rank == 0, tensorboard=t.tensorboard, truncate_to=truncate,
                            fresh=truncate is None)
    loader = _rank0_first(lambda: build_dataloader(cfg, tokenizer, dp_rank, dp_world, state.consumed_samples,
                                                   split="train", progress=rank == 0),
                          "the training data index", t.collective_timeout)
    valid = _rank0_first(lambda: build_dataloader(cfg, tokenizer, dp_rank, dp_world, 0, split="valid",
                                                  progress=False),
                         "the validation data index", t.collective_timeout) if t.eval_iterations > 0 else None
    result = TrainResult(step=state.step, skipped_steps=state.skipped_steps, save_dir=save_dir)
    last = min(t.train_iterations, stop_after) if stop_after else t.train_iterations
    samples_per_step = t.micro_batch_size * gas * dp_world
    bar = tqdm(total=t.train_iterations, initial=state.step, disable=rank != 0, desc="train", dynamic_ncols=True)
    bits_fn = bits_per_byte_fn(tokenizer, cfg, valid) if valid is not None else None
    if rank == 0 and init is not None:
        bar.write(f"initialised from {init.tag_dir} ({init.describe()}): weights only, fresh optimizer and schedule")
    if rank == 0 and metrics.set_aside is not None:
        bar.write(f"a new run in {save_dir}: the earlier metrics.jsonl is kept as {metrics.set_aside.name}")
    if rank == 0 and resume is not None:
        msg = f"resuming {resume[0] / resume[1]} at step {state.step}"
        if state.step >= last:
            msg += (f": training.train_iterations={t.train_iterations} already reached, nothing to train "
                    f"(raise it, or set training.save_dir for a new run)")
        bar.write(msg + ("; changed: " + ", ".join(changes) if changes else ""))
    timeout = t.collective_timeout
    try:
        initial: dict[str, float] = {}
        if valid is not None and state.step == 0:  # the untrained model, for comparison
            with _collectives("the first evaluation", 0, timeout):
                result.last_eval = evaluate(engine, cfg, valid, bits_fn)
            initial = {f"initial_{k}": v for k, v in result.last_eval.items()}  # logged with step 1
            if rank == 0:
                bar.write("untrained: " + ", ".join(f"{k} {v:.4f}" for k, v in result.last_eval.items()))
        data_iter = iter(loader)
        for step in range(state.step + 1, last + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            with _collectives("the training step (gradient all-reduce, loss checks)", step, timeout):
                out = train_step(engine, optimizer, data_iter, gas, dp_world, word_counts)
            elapsed = time.perf_counter() - start
            state.step, state.consumed_samples = step, state.consumed_samples + samples_per_step
            record = {"step": step, "loss": out["loss"], "lr": lr, "grad_norm": out["grad_norm"],
                      "words_per_s": out["units"] / elapsed if elapsed > 0 else 0.0,
                      "consumed_samples": state.consumed_samples, "skipped": out["skipped"], **initial}
            initial = {}
            result.losses[step] = None if out["skipped"] else out["loss"]
            if out["skipped"]:
                state.skipped_steps += 1
                result.skipped_steps = state.skipped_steps
                if state.skipped_steps > t.max_skipped_steps:
                    metrics.log(record)
                    raise NonFiniteLossError(
                        f"step {step}: {state.skipped_steps} steps with a non-finite loss exceed "
                        f"training.max_skipped_steps={t.max_skipped_steps}; lower training.lr or check the data")
            if valid is not None and (step % t.eval_interval == 0 or step == last):
                with _collectives("the evaluation", step, timeout):
                    result.last_eval = evaluate(engine, cfg, valid, bits_fn)
                record.update(result.last_eval)
            metrics.log(record)
            if lock is not None:
                lock.heartbeat()
            if rank == 0 and (step % t.log_interval == 0 or step == last or "eval_loss" in record):
                bar.write(format_line(record, t.train_iterations))
            bar.update(1)
            result.step = step
            if on_step is not None:
                on_step(step, engine, record)
            if step % t.save_interval == 0 or step == last:
                state.metrics_position = metrics.position()
                with _collectives("saving the checkpoint", step, timeout):
                    ckpt.save_checkpoint(engine, cfg, tokenizer, state, word_counts)
                if rank == 0:
                    for tag in ckpt.prune_checkpoints(save_dir, t.keep_checkpoints, t.keep_every):
                        bar.write(f"removed old checkpoint {save_dir / tag} (training.keep_checkpoints="
                                  f"{t.keep_checkpoints}, keep_every={t.keep_every})")
    finally:  # also after an error: the plot of a failed run helps most
        bar.close()
        metrics.close()
        if rank == 0 and metrics.path.is_file():
            plot_loss(metrics.path, save_dir / PLOT_FILE)
    del engine, optimizer, model
    return result
