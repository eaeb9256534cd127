"""Saving and resuming a training run: the DeepSpeed engine's state plus our own files.

The on-disk format (file names, the run-directory layout, ``latest``, tag resolution, the trainer
state, weights-only loads, layout-free directories) is :mod:`megatron_tfree.checkpoint`'s; this module
writes and reads it for the trainer. ``training.load_dir`` may name a run dir, a tag dir or a
layout-free (consolidated) directory, recognised by its ``consolidated.json`` marker; the latter
resumes at any (TP, PP, DP, ZeRO) layout (:func:`load_consolidated`).

DeepSpeed's own ``.pt`` files are loaded with ``torch.load(weights_only=True)`` too
(:class:`_weights_only_loads`), allowing just the few DeepSpeed classes its optimizer states contain.

Order of a save: every rank writes its DeepSpeed shards and RNG file, rank 0 the rest; a barrier;
then rank 0 replaces ``latest`` atomically (temp file + ``os.replace``). A crash anywhere before
that leaves ``latest`` on the previous checkpoint, which stays loadable. Nothing here unpickles:
our files are JSON/YAML (RNG states are stored as integer lists).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_tfree.checkpoint import consolidated
from megatron_tfree.checkpoint.files import (CONFIG_FILE, LATEST_FILE, STATE_FILE, TOKENIZER_DIR,  # noqa: F401
                                             WORD_COUNTS_FILE, TrainerState, complete_tags, read_latest,
                                             resolve_tag_dir, rng_file, step_of, tag_for, unreadable, write_json,
                                             write_latest)
from megatron_tfree.errors import UserError
from megatron_tfree.training import deepspeed_state
from megatron_tfree.training.deepspeed_state import weights_only_loads as _weights_only_loads

_write_json = write_json  # module-level name: the save path calls it (tests replace it to simulate a crash)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# RNG states (JSON-safe)
# --------------------------------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) RNG states as plain lists/ints."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------


def gather_word_counts(local: Counter) -> Counter:
    """Sum every rank's word counter (the result is meaningful on rank 0)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Counter(local)
    parts: list[Optional[dict]] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(local))
    total: Counter = Counter()
    for part in parts:
        total.update(part or {})
    return total


def save_checkpoint(engine: Any, cfg: Any, tokenizer: Any, state: TrainerState, word_counts: Counter,
                    save_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write checkpoint ``step_{state.step}`` into ``save_dir`` (default ``training.save_dir``) on all
    ranks, then point ``latest`` at it. Returns the tag directory."""
    root = Path(save_dir or cfg.training.save_dir)
    tag = tag_for(state.step)
    rank = _rank()
    engine.save_checkpoint(str(root), tag=tag, client_state={"trainer_state": asdict(state)}, save_latest=False)
    tag_dir = root / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    _write_json(tag_dir / rng_file(rank), capture_rng())
    totals = gather_word_counts(word_counts)
    if rank == 0:
        cfg.save(tag_dir / CONFIG_FILE)
        tokenizer.save(tag_dir / TOKENIZER_DIR)
        _write_json(tag_dir / WORD_COUNTS_FILE, dict(totals.most_common()))
        _write_json(tag_dir / STATE_FILE, asdict(state))
    _barrier()  # every rank's files are complete
    if rank == 0:
        write_latest(root, tag)
    _barrier()
    return tag_dir


# --------------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------------


class CheckpointError(RuntimeError, UserError):
    """A checkpoint cannot be resumed (the message names the file or tensor)."""


def _readable_or_fallback(root: Path, tag: str, fallback: bool) -> str:
    """``tag`` if its files open, else (``fallback``) the newest older complete checkpoint that does,
    announced on stderr; otherwise CheckpointError naming the file."""
    problem = unreadable(root / tag)
    if problem is None:
        return tag
    if fallback:
        for older in complete_tags(root):
            if older != tag and (step_of(older) or 0) < (step_of(tag) or 0) and unreadable(root / older) is None:
                if _rank() == 0:
                    print(f"WARNING: checkpoint {root / tag} cannot be read ({problem}); resuming from the previous "
                          f"valid checkpoint {root / older} instead", file=sys.stderr, flush=True)
                return older
    raise CheckpointError(f"cannot resume {root / tag}: {problem}" +
                          ("; no older readable checkpoint in the run dir either" if fallback else ""))


def find_resume(cfg: Any) -> Optional[tuple[Path, str]]:
    """``(root, tag)`` to resume from: ``training.load_dir`` (a run dir with ``latest``, a tag dir or a
    consolidated dir), else ``training.save_dir`` when it has a ``latest``; None for a fresh run. A run
    dir's ``latest`` checkpoint that cannot be read falls back to the previous valid one (loudly); an
    explicitly named checkpoint that cannot be read is an error naming the file."""
    t = cfg.training
    if t.load_dir:
        try:
            tag_dir = resolve_tag_dir(t.load_dir)
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"training.load_dir={t.load_dir}: {e}") from None
        fallback = read_latest(t.load_dir) is not None
        return tag_dir.parent, _readable_or_fallback(tag_dir.parent, tag_dir.name, fallback)
    tag = read_latest(t.save_dir)
    if tag is None:
        return None
    if not (Path(t.save_dir) / tag).is_dir():
        older = complete_tags(t.save_dir)
        if not older:
            raise CheckpointError(f"{Path(t.save_dir) / LATEST_FILE} names {tag!r} but {Path(t.save_dir) / tag} does "
                                  f"not exist, and there is no other checkpoint")
        return Path(t.save_dir), _readable_or_fallback(Path(t.save_dir), older[0], True)
    return Path(t.save_dir), _readable_or_fallback(Path(t.save_dir), tag, True)


def prune_checkpoints(root: Path, keep: int, every: int) -> list[str]:
    """Delete all but ``keep`` complete checkpoints of ``root`` (0: keep all), counted down from the one
    ``latest`` names (kept), never a step that is a multiple of ``every``; returns the deleted tags.
    Checkpoints newer than ``latest`` (a run rolled back to an earlier one, or the fallback from an
    unreadable one) are neither counted nor deleted: the run replaces them when it gets there again."""
    if keep <= 0:
        return []
    latest = read_latest(root)
    if latest is None or step_of(latest) is None:
        return []
    tags = [t for t in complete_tags(root) if (step_of(t) or 0) <= step_of(latest)]
    deleted = []
    for tag in tags[keep:]:
        step = step_of(tag) or 0
        if tag == latest or (every and step % every == 0):
            continue
        try:
            shutil.rmtree(root / tag)
        except OSError as e:
            print(f"WARNING: could not remove old checkpoint {root / tag}: {e}", file=sys.stderr, flush=True)
            continue
        deleted.append(tag)
    return deleted


def _read_counts(tag_dir: Path) -> Counter:
    """The saved word counts on rank 0 (empty elsewhere, so summing over ranks at the next save is right)."""
    counts: Counter = Counter()
    if _rank() == 0 and (tag_dir / WORD_COUNTS_FILE).is_file():
        counts.update(json.loads((tag_dir / WORD_COUNTS_FILE).read_text()))
    return counts


def load_checkpoint(engine: Any, root: str | os.PathLike, tag: str) -> tuple[TrainerState, Counter]:
    """Load engine state (model, optimizer, scheduler), this rank's RNG states and our counters.

    Returns the trainer state and the word counts (the saved totals on rank 0, empty elsewhere, so
    summing over ranks at the next save stays correct)."""
    root, rank = Path(root), _rank()
    tag_dir = root / tag
    state = TrainerState.read(tag_dir)
    if consolidated.is_consolidated(tag_dir):  # layout-free checkpoint: any layout resumes from it
        return load_consolidated(engine, tag_dir), _read_counts(tag_dir)
    try:
        with _weights_only_loads(engine):
            load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
    except RuntimeError as e:  # load_state_dict: "size mismatch for <name>: copying a param with shape ..."
        detail = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "key(s)" in ln]
        if not detail:
            raise
        raise CheckpointError(f"{tag_dir}: the weights do not fit this model: " + "; ".join(detail[:5])) from None
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the engine state from {tag_dir}")
    rng_path = tag_dir / rng_file(rank)
    if rng_path.is_file():
        restore_rng(json.loads(rng_path.read_text()))
    elif rank == 0 or state.world_size > rank:
        raise FileNotFoundError(f"checkpoint {tag_dir}: {rng_path.name} is missing")
    return state, _read_counts(tag_dir)


def load_consolidated(engine: Any, tag_dir: str | os.PathLike) -> TrainerState:
    """Resume ``engine`` (any layout, ZeRO 0-3) from a consolidated directory: this rank's slices of
    the weights and Adam moments (zeros for a weights-only directory), the optimizer step, LR
    scheduler, engine counters and RNG. Returns the trainer state."""
    from megatron_tfree.checkpoint.names import named_model_params
    from megatron_tfree.parallel import state as pstate
    from megatron_tfree.parallel.init import local_shard

    tag_dir = Path(tag_dir)
    meta = consolidated.read_meta(tag_dir)
    layout = pstate.get()
    optimizer_meta = meta.get("optimizer") or {"step": 0}
    basic = deepspeed_state.prepare_optimizer(engine, step=optimizer_meta["step"])
    files = consolidated.ConsolidatedFiles(tag_dir)
    for name, p in named_model_params(engine.module):
        for key in (None, *deepspeed_state.MOMENTS):
            full = files.tensor(name) if key is None else files.moment(key, name)
            if full is None:  # weights only: the moments stay zero
                continue
            where = consolidated.MODEL_FILE if key is None else consolidated.OPTIMIZER_FILE
            entry = name if key is None else consolidated.moment_name(key, name)
            if tuple(full.shape) != deepspeed_state.layout_free_shape(p):
                raise ValueError(f"{tag_dir / where}: {entry!r} has shape {tuple(full.shape)}, the model "
                                 f"{deepspeed_state.layout_free_shape(p)}")
            if getattr(p, "tensor_model_parallel", False):
                full = local_shard(full, p.partition_dim, layout.tp, layout.tp_rank, p.partition_stride)
            deepspeed_state.set_local(p, basic, key, full)
    if meta.get("scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["scheduler"])
    counters = meta.get("engine", {})
    engine.global_steps = counters.get("global_steps", engine.global_steps)
    engine.global_samples = counters.get("global_samples", engine.global_samples)
    engine.skipped_steps = counters.get("skipped_steps", engine.skipped_steps)
    rng = tag_dir / rng_file(layout.rank)  # same rank of the source layout, else rank 0's
    if not rng.is_file():
        rng = tag_dir / rng_file(0)
    if rng.is_file():  # an import has no RNG states: the run's seeds stand
        restore_rng(json.loads(rng.read_text()))
    return TrainerState.read(tag_dir)
