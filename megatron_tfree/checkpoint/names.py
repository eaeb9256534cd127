"""Parameter names of a checkpoint: the model's full (unsharded) names, shapes and TP split rules.

Every checkpoint format of this project names tensors as :class:`~megatron_tfree.model.GPTModel`'s
``state_dict`` does (``embedding.weight``, ``blocks.{i}.attention.qkv.weight``, ...,
``output.head.linear.weight``). A pipeline stage numbers its layers globally (0 = embedding,
``1..L`` = blocks, ``L + 1`` = output; :func:`stage_prefix`), and a tensor-parallel rank holds a
shard of some tensors: :class:`ParamSpec` says which dimension is split and how (``stride`` blocks,
uneven parts; :mod:`megatron_tfree.parallel.init`). The specs come from the model itself, built on
the ``meta`` device (no memory, no RNG), so they can never disagree with the layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ModelConfig


EMBEDDING = "embedding.weight"  # [V, h]: one row per vocabulary id (T-Free: per trigram id)
HEAD = "output.head.linear.weight"  # [V, h]: the output head's rows (not tied to the embedding)
VOCAB_ROWS = (EMBEDDING, HEAD)  # the tensors whose rows are vocabulary ids


@dataclass(frozen=True)
class ParamSpec:
    """A full parameter: its name, shape, dtype and how tensor parallelism splits it."""

    name: str
    shape: tuple[int, ...]
    partition_dim: Optional[int]  # None: replicated on every TP rank (norm weights)
    stride: int = 1  # fused blocks each rank takes a slice of (SwiGLU gate|up: 2)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def stage_prefix(index: int, num_layers: int) -> str:
    """The model-name prefix of pipeline layer ``index`` (0 = embedding, ``num_layers + 1`` = output)."""
    if index == 0:
        return "embedding"
    if index == num_layers + 1:
        return "output"
    if 1 <= index <= num_layers:
        return f"blocks.{index - 1}"
    raise ValueError(f"layer index {index} is outside 0..{num_layers + 1}")


def stage_index(name: str, num_layers: int) -> int:
    """The pipeline layer index a full parameter name belongs to (inverse of :func:`stage_prefix`)."""
    head = name.split(".", 2)
    if head[0] == "embedding":
        return 0
    if head[0] == "output":
        return num_layers + 1
    if head[0] == "blocks" and len(head) > 2 and head[1].isdigit() and int(head[1]) < num_layers:
        return int(head[1]) + 1
    raise ValueError(f"{name!r} is not a parameter name of a {num_layers}-layer model")


def named_model_params(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters under :class:`GPTModel`'s names (a pipeline stage's ``"3.layer.x"`` is
    ``"blocks.2.x"``), in a fixed order, the same on every TP/DP peer."""
    from ..model.pipe import GPTPipe

    if not isinstance(module, GPTPipe):
        return list(module.named_parameters())
    out = []
    for index, layer in sorted(module.stage_layers().items()):
        prefix = stage_prefix(index, module.cfg.num_layers)
        out.extend((f"{prefix}.{n}", p) for n, p in layer.named_parameters())
    return out


def param_specs(model_cfg: ModelConfig, kind: str, vocab_size: int) -> dict[str, ParamSpec]:
    """``{full name: ParamSpec}`` of the model, in ``state_dict`` order (built on the meta device)."""
    from ..model import GPTModel
    from ..parallel import state

    with state.single_process(), torch.device("meta"):
        model = GPTModel(model_cfg, kind, vocab_size, seed=0)
    specs = {}
    for name, p in model.named_parameters():
        sharded = getattr(p, "tensor_model_parallel", False)
        specs[name] = ParamSpec(name, tuple(p.shape), p.partition_dim if sharded else None,
                                getattr(p, "partition_stride", 1) if sharded else 1)
    return specs
