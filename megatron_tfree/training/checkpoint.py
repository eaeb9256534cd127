"""Checkpoints: DeepSpeed engine state plus our own files, and an atomic ``latest`` pointer.

Layout of ``{save_dir}``::

    latest                       text: the tag of the newest *complete* checkpoint (e.g. "step_200")
    step_200/                    one tag directory per checkpoint
        mp_rank_00_model_states.pt, *optim_states.pt    DeepSpeed (model, optimizer, LR schedule)
        config.yaml              the resolved Config
        tokenizer/               tokenizer.save(...)
        trainer_state.json       step, consumed_samples, skipped_steps, metrics_position, world_size
        rng_state_rank{r}.json   python / numpy / torch (/ cuda) RNG states of rank r
        word_counts.json         target words seen in training so far (all ranks summed)
    metrics.jsonl, loss.png, tensorboard/

``training.load_dir`` may also name a layout-free (consolidated) directory, recognised by its
``consolidated.json`` marker (:mod:`.consolidate`); it resumes at any (TP, PP, DP, ZeRO) layout.

DeepSpeed's own ``.pt`` files are loaded with ``torch.load(weights_only=True)`` too
(:func:`_weights_only_loads`), allowing just the few DeepSpeed classes its optimizer states contain.

Order of a save: every rank writes its DeepSpeed shards and RNG file, rank 0 the rest; a barrier;
then rank 0 replaces ``latest`` atomically (temp file + ``os.replace``). A crash anywhere before
that leaves ``latest`` on the previous checkpoint, which stays loadable. Nothing here unpickles:
our files are JSON/YAML (RNG states are stored as integer lists).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"
WORD_COUNTS_FILE = "word_counts.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"


def tag_for(step: int) -> str:
    return f"step_{step}"


@dataclass
class TrainerState:
    """Counters that, with the engine state, make a resumed run continue exactly."""

    step: int = 0  # optimizer steps taken (including skipped ones)
    consumed_samples: int = 0  # global data position (all data-parallel ranks together)
    skipped_steps: int = 0  # steps skipped because of a non-finite loss
    metrics_position: int = 0  # byte length of metrics.jsonl at save time
    world_size: int = 1

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainerState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------------
# small file helpers
# --------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + fsync + os.replace (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _write_atomic(path, json.dumps(data, ensure_ascii=False))


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def read_latest(save_dir: str | os.PathLike) -> Optional[str]:
    """The tag in ``{save_dir}/latest``, or None when there is no complete checkpoint."""
    path = Path(save_dir) / LATEST_FILE
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


def write_latest(save_dir: str | os.PathLike, tag: str) -> None:
    _write_atomic(Path(save_dir) / LATEST_FILE, tag + "\n")


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
    _write_json(tag_dir / f"rng_state_rank{rank}.json", capture_rng())
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


def find_resume(cfg: Any) -> Optional[tuple[Path, str]]:
    """``(root, tag)`` to resume from: ``training.load_dir`` (a run dir with ``latest`` or a tag dir),
    else ``training.save_dir`` when it has a ``latest``; None for a fresh run."""
    t = cfg.training
    if t.load_dir:
        path = Path(t.load_dir)
        tag = read_latest(path)
        if tag is not None:
            return path, tag
        if (path / STATE_FILE).is_file():
            return path.parent, path.name
        raise FileNotFoundError(f"training.load_dir={t.load_dir}: neither a '{LATEST_FILE}' file nor a "
                                f"checkpoint directory with {STATE_FILE}")
    tag = read_latest(t.save_dir)
    return (Path(t.save_dir), tag) if tag is not None else None


def _deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoints pickle (loss scalers, ZeRO stage enum, fragment addresses)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class _weights_only_loads:
    """Within the block, ``engine.checkpoint_engine.load`` uses ``torch.load(weights_only=True)``."""

    def __init__(self, engine: Any) -> None:
        self.target = engine.checkpoint_engine
        self.files: list[str] = []  # what was loaded (tests check every file went through here)

    def _load(self, path: str, map_location: Any = None) -> Any:
        self.files.append(str(path))
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    def __enter__(self) -> "_weights_only_loads":
        self.target.load = self._load  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.target.load


def load_checkpoint(engine: Any, root: str | os.PathLike, tag: str) -> tuple[TrainerState, Counter]:
    """Load engine state (model, optimizer, scheduler), this rank's RNG states and our counters.

    Returns the trainer state and the word counts (the saved totals on rank 0, empty elsewhere, so
    summing over ranks at the next save stays correct)."""
    root, rank = Path(root), _rank()
    tag_dir = root / tag
    state_path = tag_dir / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(f"checkpoint {tag_dir} is incomplete: {STATE_FILE} is missing")
    from megatron_tfree.training import consolidate

    if consolidate.is_consolidated(tag_dir):  # layout-free checkpoint: any layout resumes from it
        return consolidate.load_consolidated(engine, tag_dir)
    with _weights_only_loads(engine):
        load_path, _ = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the engine state from {tag_dir}")
    state = TrainerState.from_dict(json.loads(state_path.read_text()))
    rng_path = tag_dir / f"rng_state_rank{rank}.json"
    if rng_path.is_file():
        restore_rng(json.loads(rng_path.read_text()))
    elif rank == 0 or state.world_size > rank:
        raise FileNotFoundError(f"checkpoint {tag_dir}: {rng_path.name} is missing")
    counts: Counter = Counter()
    if rank == 0 and (tag_dir / WORD_COUNTS_FILE).is_file():
        counts.update(json.loads((tag_dir / WORD_COUNTS_FILE).read_text()))
    return state, counts
