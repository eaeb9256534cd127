"""Layout-free ("consolidated") checkpoints: any (TP, PP, DP, ZeRO) DeepSpeed checkpoint to one set of
full fp32 tensors, and resuming from those at any layout.

    to_consolidated("runs/big", "runs/big-full")            # run dir (``latest``) or a step_N dir
    # train at another layout:  training.load_dir=runs/big-full  (checkpoint.load_checkpoint detects it)
    to_deepspeed("runs/big-full", "runs/big-tp1", tensor=1, pipe=2)   # = resume there + save, 0 steps

The directory's format is :mod:`megatron_tfree.checkpoint.consolidated`'s (weights, Adam moments, a
marker with the optimizer step, LR scheduler and engine counters), beside a copy of the source tag
dir's own files (config, tokenizer, counters, RNG states, decode dictionary). For the weights alone,
no processes are needed: :class:`megatron_tfree.checkpoint.CheckpointReader` streams any layout.

Design: in-process. :func:`to_consolidated` starts the source layout's ranks (``world_size`` of
``trainer_state.json``; gloo on CPU, one process each) and every rank loads the checkpoint through the
trainer's own code (:func:`.engine.build_engine` + :func:`.checkpoint.load_checkpoint`), so every
format DeepSpeed can load is covered without parsing its files: ZeRO 0 (the torch AdamW's own state,
also under a pipeline), ZeRO 1/2 and bf16 (``safe_get_full_fp32_param`` /
``safe_get_full_optimizer_state``: all-reduce over the DP group), ZeRO 3 (the same APIs, all-gather).
The TP shards are then all-gathered (:func:`megatron_tfree.parallel.init.full_weight`: partition dim,
uneven parts, SwiGLU stride 2, QKV grouped by KV head are all in the parameter's metadata), and one
rank per pipeline stage writes that stage's tensors; the parent merges the parts and renames the
temporary directory into place. Checked: (2,2,1) ZeRO 0 -> consolidated -> resumed at (1,1,1),
(1,2,1), and written back at (1,1,2) ZeRO 1/2/3 and (2,1,1) ZeRO 1, exact. Not covered: fp16 with ZeRO 0 (DeepSpeed's FP16_Optimizer keeps
its fp32 master weights outside the safe_* APIs; the error says so).

Cost for a 7B model: the conversion needs the source world size (e.g. 64 ranks for TP2 x PP2 x DP16) as
processes, each holding its stage's shard of weights + fp32 master + moments as in training (16 bytes
per parameter per replica; ZeRO 0 replicas each hold a full copy), so run it on the training
allocation or a few large-memory nodes; gloo moves each tensor once per TP/DP group. The parent then
holds the whole model (28 GB fp32) and later the moments (56 GB) while merging into the two files.
Loading at the new layout reads the two files on every rank (memory mapped; each rank keeps its slice).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_tfree.checkpoint.consolidated import (FORMAT, MARKER_FILE, MODEL_FILE, MOMENTS,  # noqa: F401
                                                    OPTIMIZER_FILE, VERSION, is_consolidated, merge_parts,
                                                    moment_name)
from megatron_tfree.checkpoint.files import (CONFIG_FILE, TOKENIZER_DIR, TrainerState, atomic_output_dir,
                                             resolve_tag_dir)
from megatron_tfree.checkpoint.names import named_model_params  # noqa: F401 (part of this module's API)
from megatron_tfree.parallel import spawn
from megatron_tfree.training import deepspeed_state
from megatron_tfree.training.checkpoint import load_checkpoint, save_checkpoint


# --------------------------------------------------------------------------------------------------
# rank bodies
# --------------------------------------------------------------------------------------------------


def _load_source(tag_dir: Path) -> tuple[Any, Any, Any]:
    """(cfg, tokenizer, engine) of the source layout with ``tag_dir`` loaded (inside a rank)."""
    from megatron_tfree.config import load_config
    from megatron_tfree.tokenizer import load_tokenizer
    from megatron_tfree.training.engine import build_engine, build_model, setup_parallel

    cfg = load_config(tag_dir / CONFIG_FILE)
    setup_parallel(cfg)
    tokenizer = load_tokenizer(tag_dir / TOKENIZER_DIR)
    engine, _, _ = build_engine(cfg, build_model(cfg, tokenizer.vocab_size))
    load_checkpoint(engine, tag_dir.parent, tag_dir.name)
    return cfg, tokenizer, engine


def _export_rank(rank: int, world: int, tag_dir: Path, tmp: Path) -> Optional[dict[str, Any]]:
    """Rank body of :func:`to_consolidated`: gather this stage's tensors, one rank per stage writes
    ``part{stage}.model/optimizer.safetensors``; rank 0 returns the metadata."""
    from safetensors.torch import save_file

    from megatron_tfree.parallel import state as pstate
    from megatron_tfree.parallel.init import full_weight

    cfg, _, engine = _load_source(tag_dir)
    layout = pstate.get()
    basic = deepspeed_state.prepare_optimizer(engine)
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    for name, p in named_model_params(engine.module):
        weights[name] = full_weight(p, deepspeed_state.local_value(p, basic, None)).contiguous()
        for key in MOMENTS:
            moments[moment_name(key, name)] = full_weight(p, deepspeed_state.local_value(p, basic, key)).contiguous()
    if layout.tp_rank == 0 and layout.dp_rank == 0:
        save_file(weights, str(tmp / f"part{layout.pp_rank}.{MODEL_FILE}"))
        save_file(moments, str(tmp / f"part{layout.pp_rank}.{OPTIMIZER_FILE}"))
    meta = None
    if layout.rank == 0:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in basic.param_groups]
        meta = {"format": FORMAT, "version": VERSION,
                "source": {"tag_dir": str(tag_dir), "tensor": layout.tp, "pipe": layout.pp, "data": layout.dp,
                           "zero_stage": cfg.parallel.zero_stage, "precision": cfg.training.precision},
                "optimizer": {"type": type(basic).__name__, "step": deepspeed_state.optimizer_step(basic),
                              "param_groups": hyper},
                "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
                "engine": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                           "skipped_steps": int(engine.skipped_steps)}}
    dist.barrier()
    del engine, basic
    return meta


def _target_config(src: Path, out: Path, tensor: int, pipe: int, zero_stage: Optional[int]) -> Any:
    """The consolidated checkpoint's config at the new layout, validated (errors name the key)."""
    from megatron_tfree.config import Config, load_config

    data = load_config(src / CONFIG_FILE).to_dict()
    data["parallel"].update(tensor=tensor, pipe=pipe)
    if zero_stage is not None:
        data["parallel"]["zero_stage"] = zero_stage
    data["training"].update(save_dir=str(out), load_dir=str(src))
    return Config.from_dict(data, source=f"{src / CONFIG_FILE} at layout TP={tensor}, PP={pipe}")


def _import_rank(rank: int, world: int, src: Path, tmp: Path, cfg: Any) -> Optional[str]:
    """Rank body of :func:`to_deepspeed`: build the engine at ``cfg``'s layout, resume from the
    consolidated ``src`` (the trainer's own resume path) and save a DeepSpeed checkpoint into ``tmp``."""
    from megatron_tfree.tokenizer import load_tokenizer
    from megatron_tfree.training.engine import build_engine, build_model, setup_parallel

    setup_parallel(cfg)
    tokenizer = load_tokenizer(src / TOKENIZER_DIR)
    engine, _, _ = build_engine(cfg, build_model(cfg, tokenizer.vocab_size))
    state, counts = load_checkpoint(engine, src.parent, src.name)
    state.world_size = dist.get_world_size()
    tag_dir = save_checkpoint(engine, cfg, tokenizer, state, counts, save_dir=tmp)
    del engine
    return str(tag_dir) if dist.get_rank() == 0 else None


# --------------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------------


def run_ranks(fn: Callable, world: int, args: Sequence[Any] = ()) -> list[Any]:
    """``fn(rank, world, *args)`` in ``world`` fresh CPU processes joined by gloo, with DeepSpeed's comm
    layer initialised on the existing group; their results by rank."""
    return spawn.run_ranks(_with_deepspeed, world, (fn, *args), what="checkpoint conversion")


def _with_deepspeed(rank: int, world: int, fn: Callable, *args: Any) -> Any:
    from megatron_tfree.training.engine import init_distributed

    init_distributed()  # adopts the worker's process group and sets up DeepSpeed's comm on it
    return fn(rank, world, *args)


# --------------------------------------------------------------------------------------------------
# the two conversions
# --------------------------------------------------------------------------------------------------


def to_consolidated(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert the DeepSpeed checkpoint ``src`` (run dir with ``latest`` or a tag dir, any layout) into
    the consolidated directory ``out`` (written atomically; an existing ``out`` only with ``overwrite``)."""
    tag_dir, out = resolve_tag_dir(src).resolve(), Path(out)
    if is_consolidated(tag_dir):
        raise ValueError(f"{tag_dir} is already consolidated")
    world = TrainerState.read(tag_dir).world_size
    with atomic_output_dir(out, overwrite, flag="overwrite=True (--overwrite)") as tmp:
        meta = run_ranks(_export_rank, world, (tag_dir, tmp))[0]
        merge_parts(tmp, MODEL_FILE)
        merge_parts(tmp, OPTIMIZER_FILE)
        for item in tag_dir.iterdir():  # our files: config, tokenizer, counters, RNG, dictionary
            if item.suffix == ".pt" or item.name == "zero_to_fp32.py":
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=1))
    return out


def to_deepspeed(src: str | os.PathLike, out: str | os.PathLike, tensor: int = 1, pipe: int = 1, data: int = 1,
                 zero_stage: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write the consolidated ``src`` as a DeepSpeed checkpoint of layout (tensor, pipe, data) and
    ``zero_stage`` (default: the config's) into the run dir ``out`` (``latest`` + ``step_N``): the
    trainer's resume at that layout followed by a save, with no training step. A weights-only ``src``
    (an import) gets a fresh optimizer (zero moments, step 0). Returns the tag dir."""
    src = Path(src).resolve()
    if not is_consolidated(src):
        raise ValueError(f"{src}: not a consolidated checkpoint (no {MARKER_FILE}); run to_consolidated first")
    out = Path(out)
    cfg = _target_config(src, out.resolve(), tensor, pipe, zero_stage)
    with atomic_output_dir(out, overwrite, flag="overwrite=True (--overwrite)") as tmp:
        tag = run_ranks(_import_rank, tensor * pipe * data, (src, tmp, cfg))[0]
    return out / Path(tag).name
