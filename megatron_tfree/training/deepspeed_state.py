"""The DeepSpeed engine's state as checkpoints need it: full fp32 weights and Adam moments of a
parameter (every ZeRO stage), and weights-only loads of DeepSpeed's own files.

DeepSpeed's public ``safe_get/safe_set_full_*`` APIs cover ZeRO 1-3 and bf16; the few private
attributes this needs (the optimizer's fragment links, ``checkpoint_engine.load``, ZeRO-3's
``ds_tensor``) are touched here and nowhere else in the checkpoint code.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_tfree.checkpoint.safe_load import load_weights_only

MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam(W)


class weights_only_loads:  # noqa: N801 - a context manager used like a function
    """Within the block, ``engine.checkpoint_engine.load`` uses ``torch.load(weights_only=True)``
    (:func:`megatron_tfree.checkpoint.safe_load.load_weights_only`)."""

    def __init__(self, engine: Any) -> None:
        self.target = engine.checkpoint_engine
        self.files: list[str] = []  # what was loaded (tests check every file went through here)

    def _load(self, path: str, map_location: Any = None) -> Any:
        self.files.append(str(path))
        return load_weights_only(path, map_location=map_location)

    def __enter__(self) -> "weights_only_loads":
        self.target.load = self._load  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.target.load


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def prepare_optimizer(engine: Any, step: Optional[int] = None) -> Any:
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


def optimizer_step(basic: Any) -> int:
    steps = {int(st["step"]) for st in basic.state.values() if "step" in st}
    if len(steps) > 1:
        raise ValueError(f"optimizer state holds different step counts {sorted(steps)}")
    return steps.pop() if steps else 0


def full_shape(p: torch.Tensor) -> torch.Size:
    """The shape of this rank's tensor-parallel slice (ZeRO 3: not the partitioned ``p.shape``)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def layout_free_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The full shape of ``p`` (all TP shards together)."""
    shape = list(full_shape(p))
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] = p.partition_full_size
    return tuple(shape)


def local_value(p: torch.nn.Parameter, basic: Any, key: Optional[str]) -> torch.Tensor:
    """This TP rank's fp32 ``p`` (``key`` None) or Adam moment ``key``, complete over the DP group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if value is None:  # ZeRO 0 with the torch optimizer: the parameter is its own master weight
        value = p.detach() if key is None else basic.state[p][key]
    return value.detach().float().reshape(full_shape(p)).cpu()


def set_local(p: torch.nn.Parameter, basic: Any, key: Optional[str], value: torch.Tensor) -> None:
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
