"""Layout-free ("consolidated") checkpoints: any (TP, PP, DP, ZeRO) DeepSpeed checkpoint to one set of
full fp32 tensors, and resuming from those at any layout.

    to_consolidated("runs/big", "runs/big-full")            # run dir (``latest``) or a step_N dir
    # train at another layout:  training.load_dir=runs/big-full  (checkpoint.load_checkpoint detects it)
    to_deepspeed("runs/big-full", "runs/big-tp1", tensor=1, pipe=2)   # = resume there + save, 0 steps

A consolidated directory holds::

    consolidated.json        marker + metadata: optimizer step and hyper-parameters, LR scheduler
                             state, DeepSpeed engine counters, source layout, parameter shapes
    model.safetensors        full fp32 parameters under GPTModel's state_dict names
    optimizer.safetensors    full Adam moments: "exp_avg.<name>", "exp_avg_sq.<name>"
    config.yaml, tokenizer/, trainer_state.json, word_counts.json, rng_state_rank*.json,
    decode_dictionary.* (whatever the source tag dir held besides DeepSpeed's .pt files)

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

from megatron_tfree.parallel import spawn

MARKER_FILE = "consolidated.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "megatron_tfree.consolidated"
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam(W)


def is_consolidated(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a consolidated directory (has the marker file)."""
    return (Path(path) / MARKER_FILE).is_file()


# --------------------------------------------------------------------------------------------------
# parameter names and values (inside a rank)
# --------------------------------------------------------------------------------------------------


def named_model_params(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters under :class:`GPTModel`'s names (a pipeline stage's ``"3.layer.x"`` is
    ``"blocks.2.x"``), in a fixed order, the same on every TP/DP peer."""
    from megatron_tfree.model.pipe import GPTPipe

    if not isinstance(module, GPTPipe):
        return list(module.named_parameters())
    last = module.cfg.num_layers + 1
    out = []
    for index, layer in sorted(module.stage_layers().items()):
        prefix = "embedding" if index == 0 else "output" if index == last else f"blocks.{index - 1}"
        out.extend((f"{prefix}.{n}", p) for n, p in layer.named_parameters())
    return out


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _prepare_optimizer(engine: Any, step: Optional[int] = None) -> Any:
    """The torch AdamW under DeepSpeed, with Adam state for every parameter it updates (zeros and
    ``step`` where none exists yet) and DeepSpeed's fragment links to that state refreshed. ``step``
    overwrites every state's step counter."""
    if engine.zero_optimization_stage() == 0 and engine.fp16_enabled():
        raise NotImplementedError("training.precision=fp16 with parallel.zero_stage=0 (DeepSpeed's FP16_Optimizer) "
                                  "is not supported by checkpoint consolidation; use bf16/fp32 or ZeRO >= 1")
    basic, wrapper = engine.basic_optimizer, engine.optimizer
    updated = [p for group in basic.param_groups for p in group["params"]]
    updated += list(getattr(wrapper, "fp32_partitioned_groups_flat", []))  # ZeRO 3 (param_groups empty)
    for p in updated:
        st = basic.state[p]
        if not st:
            st.update(exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                      exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format),
                      step=torch.tensor(0.0, dtype=_scalar_dtype()))
        if step is not None:
            st["step"] = torch.tensor(float(step), dtype=_scalar_dtype())
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2, bf16: fragment views
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    return basic


def _optimizer_step(basic: Any) -> int:
    steps = {int(st["step"]) for st in basic.state.values() if "step" in st}
    if len(steps) > 1:
        raise ValueError(f"optimizer state holds different step counts {sorted(steps)}")
    return steps.pop() if steps else 0


def _full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of this rank's tensor-parallel slice (ZeRO 3: not the partitioned ``p.shape``)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _layout_free_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The full shape of ``p`` (all TP shards together)."""
    shape = list(_full_shape(p))
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] = p.partition_full_size
    return tuple(shape)


def _local_value(p: torch.nn.Parameter, basic: Any, key: Optional[str]) -> torch.Tensor:
    """This TP rank's fp32 ``p`` (``key`` None) or Adam moment ``key``, complete over the DP group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if value is None:  # ZeRO 0 with the torch optimizer: the parameter is its own master weight
        value = p.detach() if key is None else basic.state[p][key]
    return value.detach().float().reshape(_full_shape(p)).cpu()


def _set_local(p: torch.nn.Parameter, basic: Any, key: Optional[str], value: torch.Tensor) -> None:
    """Set this TP rank's slice ``value`` of ``p`` (``key`` None: weights, model copy and fp32 master)
    or of its Adam moment ``key``, for every ZeRO stage."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    with torch.no_grad():
        if key is not None:
            if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
                safe_set_full_optimizer_state(p, value.to(p.device), key)
            else:
                basic.state[p][key].copy_(value.reshape(p.shape))
            return
        if hasattr(p, "ds_id"):  # ZeRO 3: the model's own partition of the padded flat tensor
            part, group = p.ds_tensor, p.ds_process_group
            r, world = dist.get_rank(group), dist.get_world_size(group)
            flat = torch.nn.functional.pad(value.flatten(), (0, part.numel() * world - value.numel()))
            part.data.copy_(flat.narrow(0, part.numel() * r, part.numel()))
        else:
            p.data.copy_(value.reshape(p.shape))
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, value.to(p.device))


# --------------------------------------------------------------------------------------------------
# rank bodies
# --------------------------------------------------------------------------------------------------


def _load_source(tag_dir: Path) -> tuple[Any, Any, Any]:
    """(cfg, tokenizer, engine) of the source layout with ``tag_dir`` loaded (inside a rank)."""
    from megatron_tfree.config import load_config
    from megatron_tfree.tokenizer import load_tokenizer
    from megatron_tfree.training import checkpoint as ckpt
    from megatron_tfree.training.engine import build_engine, build_model, setup_parallel

    cfg = load_config(tag_dir / ckpt.CONFIG_FILE)
    setup_parallel(cfg)
    tokenizer = load_tokenizer(tag_dir / ckpt.TOKENIZER_DIR)
    engine, _, _ = build_engine(cfg, build_model(cfg, tokenizer.vocab_size))
    ckpt.load_checkpoint(engine, tag_dir.parent, tag_dir.name)
    return cfg, tokenizer, engine


def _export_rank(rank: int, world: int, tag_dir: Path, tmp: Path) -> Optional[dict[str, Any]]:
    """Rank body of :func:`to_consolidated`: gather this stage's tensors, one rank per stage writes
    ``part{stage}.model/optimizer.safetensors``; rank 0 returns the metadata."""
    from safetensors.torch import save_file

    from megatron_tfree.parallel import state as pstate
    from megatron_tfree.parallel.init import full_weight

    cfg, _, engine = _load_source(tag_dir)
    layout = pstate.get()
    basic = _prepare_optimizer(engine)
    weights: dict[str, torch.Tensor] = {}
    moments: dict[str, torch.Tensor] = {}
    for name, p in named_model_params(engine.module):
        weights[name] = full_weight(p, _local_value(p, basic, None)).contiguous()
        for key in MOMENTS:
            moments[f"{key}.{name}"] = full_weight(p, _local_value(p, basic, key)).contiguous()
    if layout.tp_rank == 0 and layout.dp_rank == 0:
        save_file(weights, str(tmp / f"part{layout.pp_rank}.{MODEL_FILE}"))
        save_file(moments, str(tmp / f"part{layout.pp_rank}.{OPTIMIZER_FILE}"))
    meta = None
    if layout.rank == 0:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in basic.param_groups]
        meta = {"format": FORMAT, "version": 1,
                "source": {"tag_dir": str(tag_dir), "tensor": layout.tp, "pipe": layout.pp, "data": layout.dp,
                           "zero_stage": cfg.parallel.zero_stage, "precision": cfg.training.precision},
                "optimizer": {"type": type(basic).__name__, "step": _optimizer_step(basic), "param_groups": hyper},
                "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
                "engine": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                           "skipped_steps": int(engine.skipped_steps)}}
    dist.barrier()
    del engine, basic
    return meta


def load_consolidated(engine: Any, tag_dir: str | os.PathLike) -> tuple[Any, Any]:
    """Resume ``engine`` (any layout, ZeRO 0-3) from a consolidated directory: this rank's slices of
    the weights and Adam moments, the optimizer step, LR scheduler, engine counters and RNG. Returns
    ``(TrainerState, word counts)`` like :func:`.checkpoint.load_checkpoint` (counts on rank 0 only)."""
    from collections import Counter

    from safetensors import safe_open

    from megatron_tfree.parallel import state as pstate
    from megatron_tfree.parallel.init import local_shard
    from megatron_tfree.training import checkpoint as ckpt

    tag_dir = Path(tag_dir)
    meta = json.loads((tag_dir / MARKER_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{tag_dir / MARKER_FILE}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    layout = pstate.get()
    basic = _prepare_optimizer(engine, step=meta["optimizer"]["step"])
    params = named_model_params(engine.module)
    with safe_open(str(tag_dir / MODEL_FILE), "pt") as fm, safe_open(str(tag_dir / OPTIMIZER_FILE), "pt") as fo:
        have_m, have_o = set(fm.keys()), set(fo.keys())
        for name, p in params:
            for key, f, have, file in ((None, fm, have_m, MODEL_FILE), *((k, fo, have_o, OPTIMIZER_FILE) for k in MOMENTS)):
                entry = name if key is None else f"{key}.{name}"
                if entry not in have:
                    raise KeyError(f"{tag_dir / file}: no tensor {entry!r} (model and checkpoint differ)")
                full = f.get_tensor(entry)
                if tuple(full.shape) != _layout_free_shape(p):
                    raise ValueError(f"{tag_dir / file}: {entry!r} has shape {tuple(full.shape)}, the model "
                                     f"{_layout_free_shape(p)}")
                if getattr(p, "tensor_model_parallel", False):
                    full = local_shard(full, p.partition_dim, layout.tp, layout.tp_rank, p.partition_stride)
                _set_local(p, basic, key, full)
    if meta.get("scheduler") is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(meta["scheduler"])
    counters = meta.get("engine", {})
    engine.global_steps = counters.get("global_steps", engine.global_steps)
    engine.global_samples = counters.get("global_samples", engine.global_samples)
    engine.skipped_steps = counters.get("skipped_steps", engine.skipped_steps)
    rng = tag_dir / f"rng_state_rank{layout.rank}.json"  # same rank of the source layout, else rank 0's
    ckpt.restore_rng(json.loads((rng if rng.is_file() else tag_dir / "rng_state_rank0.json").read_text()))
    state = ckpt.TrainerState.from_dict(json.loads((tag_dir / ckpt.STATE_FILE).read_text()))
    counts: Counter = Counter()
    if layout.rank == 0 and (tag_dir / ckpt.WORD_COUNTS_FILE).is_file():
        counts.update(json.loads((tag_dir / ckpt.WORD_COUNTS_FILE).read_text()))
    return state, counts


def _target_config(src: Path, out: Path, tensor: int, pipe: int, zero_stage: Optional[int]) -> Any:
    """The consolidated checkpoint's config at the new layout, validated (errors name the key)."""
    from megatron_tfree.config import Config, load_config
    from megatron_tfree.training import checkpoint as ckpt

    data = load_config(src / ckpt.CONFIG_FILE).to_dict()
    data["parallel"].update(tensor=tensor, pipe=pipe)
    if zero_stage is not None:
        data["parallel"]["zero_stage"] = zero_stage
    data["training"].update(save_dir=str(out), load_dir=str(src))
    return Config.from_dict(data, source=f"{src / ckpt.CONFIG_FILE} at layout TP={tensor}, PP={pipe}")


def _import_rank(rank: int, world: int, src: Path, tmp: Path, cfg: Any) -> Optional[str]:
    """Rank body of :func:`to_deepspeed`: build the engine at ``cfg``'s layout, resume from the
    consolidated ``src`` (the trainer's own resume path) and save a DeepSpeed checkpoint into ``tmp``."""
    from megatron_tfree.tokenizer import load_tokenizer
    from megatron_tfree.training import checkpoint as ckpt
    from megatron_tfree.training.engine import build_engine, build_model, setup_parallel

    setup_parallel(cfg)
    tokenizer = load_tokenizer(src / ckpt.TOKENIZER_DIR)
    engine, _, _ = build_engine(cfg, build_model(cfg, tokenizer.vocab_size))
    state, counts = ckpt.load_checkpoint(engine, src.parent, src.name)
    state.world_size = dist.get_world_size()
    tag_dir = ckpt.save_checkpoint(engine, cfg, tokenizer, state, counts, save_dir=tmp)
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


def resolve_tag_dir(path: str | os.PathLike) -> Path:
    """``path/<latest>`` for a run dir, else ``path`` (a ``step_N`` or consolidated directory)."""
    from megatron_tfree.training import checkpoint as ckpt

    path = Path(path)
    tag = ckpt.read_latest(path)
    tag_dir = path / tag if tag is not None else path
    if not (tag_dir / ckpt.STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: neither a run dir with '{ckpt.LATEST_FILE}' nor a checkpoint directory "
                                f"with {ckpt.STATE_FILE}")
    return tag_dir


def _temp_for(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out`` (an existing ``out`` is moved aside first and removed after)."""
    old = out.with_name(f".{out.name}.old{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _merge_parts(tmp: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    parts = sorted(tmp.glob(f"part*.{name}"), key=lambda p: int(p.name[4:].split(".")[0]))
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(load_file(str(part)))
    save_file(merged, str(tmp / name), metadata={"format": FORMAT})
    for part in parts:
        part.unlink()


def to_consolidated(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert the DeepSpeed checkpoint ``src`` (run dir with ``latest`` or a tag dir, any layout) into
    the consolidated directory ``out`` (written atomically; an existing ``out`` only with ``overwrite``)."""
    from megatron_tfree.training import checkpoint as ckpt

    tag_dir, out = resolve_tag_dir(src).resolve(), Path(out)
    if is_consolidated(tag_dir):
        raise ValueError(f"{tag_dir} is already consolidated")
    world = int(json.loads((tag_dir / ckpt.STATE_FILE).read_text()).get("world_size", 1))
    tmp = _temp_for(out, overwrite)
    try:
        meta = run_ranks(_export_rank, world, (tag_dir, tmp))[0]
        _merge_parts(tmp, MODEL_FILE)
        _merge_parts(tmp, OPTIMIZER_FILE)
        for item in tag_dir.iterdir():  # our files: config, tokenizer, counters, RNG, dictionary
            if item.suffix == ".pt" or item.name == "zero_to_fp32.py":
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / MARKER_FILE).write_text(json.dumps(meta, indent=1))
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def to_deepspeed(src: str | os.PathLike, out: str | os.PathLike, tensor: int = 1, pipe: int = 1, data: int = 1,
                 zero_stage: Optional[int] = None, overwrite: bool = False) -> Path:
    """Write the consolidated ``src`` as a DeepSpeed checkpoint of layout (tensor, pipe, data) and
    ``zero_stage`` (default: the config's) into the run dir ``out`` (``latest`` + ``step_N``): the
    trainer's resume at that layout followed by a save, with no training step. Returns the tag dir."""
    src = Path(src).resolve()
    if not is_consolidated(src):
        raise ValueError(f"{src}: not a consolidated checkpoint (no {MARKER_FILE}); run to_consolidated first")
    out = Path(out)
    cfg = _target_config(src, out.resolve(), tensor, pipe, zero_stage)
    tmp = _temp_for(out, overwrite)
    try:
        tag = run_ranks(_import_rank, tensor * pipe * data, (src, tmp, cfg))[0]
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / Path(tag).name
