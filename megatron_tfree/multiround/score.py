"""Scoring: one loss per training batch of an epoch, with a frozen checkpoint.

A *batch* is a global batch of the trainer: ``B`` consecutive positions of the trainer's global sample
order (:class:`megatron_tfree.data.sampler.ResumableSampler`, seed ``data.seed``). Batch ``k`` of epoch
``e`` holds the sample ids ``epoch_permutation(N, data.seed, e)[k*B : (k+1)*B]`` (``N`` training
samples), so for ``e = 0`` batch ``k`` is what step ``k + 1`` of a run with global batch size ``B``
trains on (split over its data-parallel ranks). An epoch has ``floor(N / B)`` batches; the last
``N mod B`` samples of the epoch are not scored (they belong to no complete batch). ``B`` is
``--batch-size``, else ``training.global_batch_size``, else ``micro_batch_size *
gradient_accumulation_steps * dp`` with ``dp`` the data-parallel size the checkpoint was trained with
(its ``trainer_state.json``; 1 if unknown).

The *loss of a batch* is the mean, over its ``B / micro_batch_size`` consecutive micro-batches, of the
model's training loss (``model.loss(batch)``: T-Free BCE or classic cross-entropy) with the frozen
weights in eval mode (no dropout), without gradients, float32 weights. That is the step loss the
trainer logs, exactly for T-Free (its loss is a plain mean over positions) and up to the grouping of
samples into micro-batches for classic (a weighted mean per micro-batch) when dp > 1.

Distribution: every process holds the whole model (tp=1, :meth:`CheckpointReader.load_model`) and
scores its share of the batches not scored yet (``remaining[rank::world]``); under ``torchrun`` (or
any launcher that sets ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``) the processes join one gloo (CPU)
or NCCL (GPU) group, used only for barriers: the results travel through the file system. A single
process works too.

Resumability: each rank rewrites ``INDEX_DIR/parts/rankNNNNN.npz`` atomically every ``flush_every``
batches (or ``flush_seconds``), with every batch it holds so far. A rerun (with any number of
processes) reads all parts, keeps what belongs to the same job (checkpoint, data fingerprint, batch
size, micro-batch size, seed, epoch, number of batches: its *key*) and scores only the rest; parts of
another job are an error. When every batch is scored, rank 0 writes ``batches.npy``, ``scores.npy``
and last ``scores.json`` (:mod:`megatron_tfree.data.round_index`) and removes ``parts/``; a rerun on a complete directory of the
same job does nothing.

Which data: the training split of the config: the checkpoint's own ``config.yaml``, or another config
(``--config`` and overrides) for the data and batch options; the model and the tokenizer always come
from the checkpoint. ``data.sample_index`` is ignored here: a round scores the whole training set.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..data.round_index import (BATCHES_NPY, PARTS_DIR, SCORES_FORMAT, SCORES_JSON, SCORES_NPY, VERSION, data_fingerprint, job_key,
                    load_json, save_json, save_npy, save_npz)

LOSS_DEFINITION = ("mean over the batch's consecutive micro-batches of the model's training loss (frozen weights, "
                   "eval mode, no gradient)")


@dataclass
class ScoreResult:
    out_dir: Path
    complete: bool  # scores.json written (now or before)
    num_batches: int
    batch_size: int
    scored_here: int  # batches this process scored in this call
    already_done: bool = False  # the directory was complete before this call


# --------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------


def init_distributed_from_env(timeout: float = 1800.0) -> bool:
    """Join the process group a launcher describes (``WORLD_SIZE`` > 1, ``MASTER_ADDR`` ...) unless one
    exists; gloo on CPU, NCCL on GPU. Returns whether this call created it (then the caller destroys it)."""
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    return True


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# what a batch is and what it costs
# --------------------------------------------------------------------------------------------------


def checkpoint_dp(reader: Any) -> int:
    """The data-parallel size the checkpoint was trained with (1 if it does not say)."""
    from ..checkpoint.files import STATE_FILE, TrainerState

    path = reader.tag_dir / STATE_FILE
    if not path.is_file():
        return 1
    p = reader.cfg.parallel
    return max(1, TrainerState.read(reader.tag_dir).world_size // (p.tensor * p.pipe))


def default_batch_size(cfg: Any, dp: int) -> int:
    """``training.global_batch_size``, else ``micro_batch_size * gradient_accumulation_steps * dp``."""
    t = cfg.training
    return t.global_batch_size or t.micro_batch_size * t.gradient_accumulation_steps * dp


def epoch_batches(num_samples: int, seed: int, epoch: int, batch_size: int,
                  num_batches: Optional[int] = None) -> np.ndarray:
    """``[n, B]`` sample ids: the first ``n`` (default all ``floor(N / B)``) batches of ``epoch`` of the
    trainer's order (module docstring)."""
    from ..data.sampler import epoch_permutation

    total = num_samples // batch_size
    if total == 0:
        raise ValueError(f"the training set has {num_samples} samples, fewer than one batch of {batch_size}")
    n = total if num_batches is None else num_batches
    if not 1 <= n <= total:
        raise ValueError(f"--batches must be between 1 and {total} (batches of {batch_size} in an epoch of "
                         f"{num_samples} samples), got {n}")
    order = epoch_permutation(num_samples, seed, epoch)
    return order[: n * batch_size].reshape(n, batch_size)


def batch_loss(model: torch.nn.Module, dataset: Any, ids: np.ndarray, micro_batch_size: int,
               device: torch.device | str = "cpu") -> float:
    """The loss of one batch (module docstring): the mean of ``model.loss`` over its micro-batches."""
    from ..data.dataset import collate
    from ..parallel import state

    losses = []
    with state.single_process(), torch.no_grad():
        for start in range(0, len(ids), micro_batch_size):
            batch = collate([dataset[int(i)] for i in ids[start:start + micro_batch_size]]).to(device)
            losses.append(float(model.loss(batch)))
    return float(np.mean(losses))


# --------------------------------------------------------------------------------------------------
# partial results
# --------------------------------------------------------------------------------------------------


def _part_path(out_dir: Path, rank: int) -> Path:
    return out_dir / PARTS_DIR / f"rank{rank:05d}.npz"


def _read_part(path: Path, key: str, num_batches: int) -> dict[int, float]:
    try:
        with np.load(path, allow_pickle=False) as z:
            their_key, batch, loss = str(z["key"]), z["batch"], z["loss"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a readable partial result ({e}); delete it to score those batches "
                         f"again") from None
    if their_key != key:
        raise FileExistsError(f"{path} belongs to another scoring job (another checkpoint, data, batch size, seed, "
                              f"epoch or --batches): use another --out, or delete {path.parent} to start over")
    if batch.shape != loss.shape or batch.ndim != 1 or (batch.size and (batch.min() < 0 or batch.max() >= num_batches)):
        raise ValueError(f"{path}: inconsistent partial result; delete it to score those batches again")
    return {int(b): float(v) for b, v in zip(batch, loss)}


def _read_parts(out_dir: Path, key: str, num_batches: int) -> dict[str, dict[int, float]]:
    parts_dir = out_dir / PARTS_DIR
    if not parts_dir.is_dir():
        return {}
    return {p.name: _read_part(p, key, num_batches) for p in sorted(parts_dir.glob("rank*.npz"))}


def _write_part(path: Path, key: str, scores: dict[int, float]) -> None:
    batch = np.array(sorted(scores), dtype=np.int64)
    loss = np.array([scores[b] for b in batch.tolist()], dtype=np.float64)
    save_npz(path, batch=batch, loss=loss, key=np.array(key))


# --------------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------------


def score_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, cfg: Any = None,
                     batch_size: Optional[int] = None, micro_batch_size: Optional[int] = None,
                     num_batches: Optional[int] = None, epoch: int = 0, flush_every: int = 32,
                     flush_seconds: float = 60.0, stop_after: Optional[int] = None,
                     device: torch.device | str | None = None, progress: bool = False,
                     reader: Any = None) -> ScoreResult:
    """Score the batches of one epoch with the frozen ``checkpoint`` into ``out_dir`` (module docstring).

    Args:
        cfg: the config for the data and batch options (default: the checkpoint's).
        batch_size: ``B`` (default: see the module docstring); a multiple of ``micro_batch_size``.
        micro_batch_size: samples per forward pass (default ``training.micro_batch_size``).
        num_batches: score only the first this many batches of the epoch (default: all).
        epoch: which epoch of the trainer's order (0 = the first).
        flush_every, flush_seconds: write this rank's partial result after so many batches / seconds.
        stop_after: return after this process scored so many batches in this call (or all of its
            share), as if interrupted (tests): the partial result is flushed, nothing is finalised.
        reader: an open :class:`CheckpointReader` of ``checkpoint`` (saves reading it twice).
    """
    from ..checkpoint.reader import CheckpointReader
    from ..data.dataset import build_dataset

    out_dir = Path(out_dir)
    reader = reader if reader is not None else CheckpointReader(checkpoint)
    cfg = cfg if cfg is not None else reader.cfg
    rank, world = _rank_world()
    if epoch < 0:
        raise ValueError(f"--epoch must be >= 0, got {epoch}")
    mbs = micro_batch_size or cfg.training.micro_batch_size
    B = batch_size or default_batch_size(cfg, checkpoint_dp(reader))
    if mbs <= 0 or B <= 0 or B % mbs:
        raise ValueError(f"the batch size ({B}) must be a positive multiple of the micro-batch size ({mbs})")
    if flush_every <= 0:
        raise ValueError(f"flush_every must be > 0, got {flush_every}")
    tokenizer = reader.tokenizer
    dataset = build_dataset(cfg, tokenizer, "train", progress=progress and rank == 0) if rank == 0 else None
    _barrier(world)  # rank 0 built the aligned index / unit-count caches; the others read them
    if dataset is None:
        dataset = build_dataset(cfg, tokenizer, "train", progress=False)
    N = len(dataset)
    batches = epoch_batches(N, cfg.data.seed, epoch, B, num_batches)
    n = len(batches)
    step = None
    try:
        from ..checkpoint.files import TrainerState

        step = TrainerState.read(reader.tag_dir).step
    except (FileNotFoundError, ValueError):
        pass
    job = {"checkpoint": str(reader.tag_dir.resolve()), "checkpoint_step": step,
           "data": data_fingerprint(cfg, tokenizer, N), "data_seed": cfg.data.seed, "epoch": epoch,
           "batch_size": B, "micro_batch_size": mbs, "num_batches": n}
    key = job_key(job)

    done_file = out_dir / SCORES_JSON
    if done_file.is_file():
        meta = load_json(done_file, f"scores {out_dir}")
        if meta.get("key") == key:
            return ScoreResult(out_dir, True, n, B, 0, already_done=True)
        theirs = meta.get("job", {})
        diff = [f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in job.items() if theirs.get(k) != v]
        raise FileExistsError(f"{out_dir} holds the scores of another job ({'; '.join(diff) or 'another format'}): "
                              f"use another --out")

    parts = _read_parts(out_dir, key, n)
    _barrier(world)  # every rank has read the same parts before anyone writes
    done: dict[int, float] = {}
    for scores in parts.values():
        done.update(scores)
    mine_path = _part_path(out_dir, rank)
    mine = dict(parts.get(mine_path.name, {}))
    todo = [b for b in range(n) if b not in done][rank::world]

    scored = 0
    if todo:
        model = reader.load_model(device=device or _default_device())
        model.eval()
        last_flush, dirty = time.monotonic(), 0
        from tqdm import tqdm

        bar = tqdm(total=n, initial=len(done), desc="scoring batches", disable=not (progress and rank == 0),
                   dynamic_ncols=True)
        for b in todo:
            mine[b] = batch_loss(model, dataset, batches[b], mbs, next(model.parameters()).device)
            scored, dirty = scored + 1, dirty + 1
            bar.update(world)
            if dirty >= flush_every or time.monotonic() - last_flush >= flush_seconds:
                _write_part(mine_path, key, mine)
                last_flush, dirty = time.monotonic(), 0
            if stop_after is not None and scored >= stop_after:
                break
        bar.close()
        if dirty:
            _write_part(mine_path, key, mine)
        del model
    if stop_after is not None:  # an interruption: every rank leaves without the final barriers
        return ScoreResult(out_dir, False, n, B, scored)

    _barrier(world)  # every rank's part is on disk
    if rank == 0:
        _finalise(out_dir, key, job, batches, world)
    _barrier(world)
    return ScoreResult(out_dir, True, n, B, scored)


def _finalise(out_dir: Path, key: str, job: dict[str, Any], batches: np.ndarray, world: int) -> None:
    n = len(batches)
    scores: dict[int, float] = {}
    for part in _read_parts(out_dir, key, n).values():
        scores.update(part)
    missing = [b for b in range(n) if b not in scores]
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} batches are not scored (first: {missing[0]}) although every "
                           f"rank finished; rerun to score them")
    losses = np.array([scores[b] for b in range(n)], dtype=np.float64)
    finite = losses[np.isfinite(losses)]
    save_npy(out_dir / BATCHES_NPY, batches.astype(np.int64))
    save_npy(out_dir / SCORES_NPY, losses)
    meta = {"format": SCORES_FORMAT, "version": VERSION, "key": key, "job": job, **job,
            "batches_in_epoch": job["data"]["num_samples"] // job["batch_size"],
            "unscored_samples": job["data"]["num_samples"] - n * job["batch_size"],
            "loss": LOSS_DEFINITION, "world_size": world,
            "stats": {"mean": float(finite.mean()) if finite.size else None,
                      "std": float(finite.std()) if finite.size else None,
                      "min": float(finite.min()) if finite.size else None,
                      "max": float(finite.max()) if finite.size else None,
                      "non_finite": int(n - finite.size)},
            "files": {"losses": SCORES_NPY, "batches": BATCHES_NPY}}
    save_json(out_dir / SCORES_JSON, meta)
    shutil.rmtree(out_dir / PARTS_DIR, ignore_errors=True)
