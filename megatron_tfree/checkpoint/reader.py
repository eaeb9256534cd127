"""Streaming reader: any checkpoint of this project as (full name, full tensor), one layer at a time.

    reader = CheckpointReader("runs/tiny")              # run dir (latest), tag dir, consolidated dir
    reader.cfg, reader.tokenizer, reader.specs           # config, tokenizer, {name: ParamSpec}
    for name, tensor in reader.tensors():                # GPTModel state_dict order, TP shards merged
        ...
    model = reader.load_model()                          # a GPTModel at tp=1 with these weights

Layouts: DeepSpeed checkpoints of any (TP, PP, DP) and ZeRO 0-3 (:mod:`.deepspeed_files`) and
layout-free directories (:mod:`.consolidated`). Pipeline layers are visited in order; for each, the
TP ranks' shards of its tensors are read (memory-mapped) and merged
(:func:`megatron_tfree.parallel.init.merge_shards`), then released, so the memory a caller needs
beyond what it keeps is about one tensor, not the model and its Adam moments (file pages are released
once read, :mod:`.memory`). Tensors come in
the dtype they were stored in (the training precision for ZeRO 0-2 weights, fp32 for ZeRO 3 and
consolidated weights). Shapes are checked against the config's model: a mismatch names the tensor.
"""

from __future__ import annotations

import os
from functools import cached_property
from itertools import groupby
from typing import Any, Iterator, Optional

import torch

from ..config import Config, load_config
from .consolidated import ConsolidatedFiles, is_consolidated
from .deepspeed_files import DeepSpeedFiles, Layout, is_deepspeed_dir
from .files import CONFIG_FILE, STATE_FILE, TOKENIZER_DIR, TrainerState, resolve_tag_dir
from .memory import release_file_pages
from .names import ParamSpec, param_specs, stage_index


MERGE_CHUNK_BYTES = 4 << 20  # TP shards are merged (and their file pages released) in pieces of this size


class CheckpointReader:
    """See the module docstring. ``path``: a run directory (its ``latest``), a tag or consolidated dir."""

    def __init__(self, path: str | os.PathLike):
        self.tag_dir = resolve_tag_dir(path)
        self.cfg: Config = load_config(self.tag_dir / CONFIG_FILE)
        self.kind = self.cfg.tokenizer.kind
        if self.tokenizer.kind != self.kind:
            raise ValueError(f"{self.tag_dir}: config says tokenizer.kind={self.kind!r}, the saved tokenizer is "
                             f"{self.tokenizer.kind!r}")
        self.specs: dict[str, ParamSpec] = param_specs(self.cfg.model, self.kind, self.tokenizer.vocab_size)
        self.consolidated = is_consolidated(self.tag_dir)
        if self.consolidated:
            self.layout = Layout(1, 1, 1, 0)
            self._files: Any = ConsolidatedFiles(self.tag_dir)
        elif is_deepspeed_dir(self.tag_dir):
            p = self.cfg.parallel
            state = self.tag_dir / STATE_FILE  # absent in hand-made checkpoints: one replica
            world = TrainerState.read(self.tag_dir).world_size if state.is_file() else p.tensor * p.pipe
            if world % (p.tensor * p.pipe):
                raise ValueError(f"{self.tag_dir}: world_size {world} is not a multiple of parallel.tensor * "
                                 f"parallel.pipe ({p.tensor} * {p.pipe})")
            self.layout = Layout(p.tensor, p.pipe, world // (p.tensor * p.pipe), p.zero_stage)
            self._files = DeepSpeedFiles(self.tag_dir, self.layout, self.cfg.model.num_layers)
        else:
            raise FileNotFoundError(f"{self.tag_dir}: no model weights (neither DeepSpeed *_model_states.pt files nor "
                                    f"a consolidated model.safetensors)")

    @cached_property
    def tokenizer(self) -> Any:
        from ..tokenizer import load_tokenizer

        sub = self.tag_dir / TOKENIZER_DIR
        return load_tokenizer(sub if sub.is_dir() else self.tag_dir)

    # ------------------------------------------------------------------ streaming
    def _layer_specs(self, names: Optional[set[str]]) -> Iterator[tuple[int, list[ParamSpec]]]:
        L = self.cfg.model.num_layers
        wanted = [s for s in self.specs.values() if names is None or s.name in names]
        for index, group in groupby(wanted, key=lambda s: stage_index(s.name, L)):
            yield index, list(group)

    def tensors(self, names: Optional[set[str]] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(full name, full tensor)`` in GPTModel ``state_dict`` order (``names``: only those). Each
        layer's files are opened (memory-mapped) once; each tensor is merged from its TP shards when it
        is asked for, so only one merged tensor exists at a time unless the caller keeps them."""
        for index, specs in self._layer_specs(names):
            if self.consolidated:
                shards = None
            else:
                shards = [self._files.read([s.name for s in specs], t, index) for t in range(self.layout.tp)]
            for s in specs:
                full = self._files.tensor(s.name) if shards is None else self._merge(s, [sh[s.name] for sh in shards])
                if tuple(full.shape) != s.shape:
                    raise ValueError(f"{self.tag_dir}: tensor {s.name!r} has shape {tuple(full.shape)}, the model of "
                                     f"{CONFIG_FILE} needs {s.shape}")
                yield s.name, full
                release_file_pages(full)  # the caller is done with it (a file view at TP=1; re-read if touched)
            del shards

    def layers(self, names: Optional[set[str]] = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(layer index, {full name: full tensor})`` per pipeline layer, in order (``names``: only those)."""
        L = self.cfg.model.num_layers
        for index, group in groupby(self.tensors(names), key=lambda item: stage_index(item[0], L)):
            yield index, dict(group)

    def _merge(self, spec: ParamSpec, shards: list[torch.Tensor]) -> torch.Tensor:
        from ..parallel.init import merge_shards

        if spec.partition_dim is None or len(shards) == 1:
            return shards[0]
        try:
            return merge_shards(shards, spec.partition_dim, spec.stride, chunk_bytes=MERGE_CHUNK_BYTES,
                                after_chunk=release_file_pages)
        except ValueError as e:
            raise ValueError(f"{self.tag_dir}: tensor {spec.name!r}: {e}") from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every full tensor at once (small models, tests)."""
        return dict(self.tensors())

    # ------------------------------------------------------------------ a model
    def load_model(self, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
        """A :class:`GPTModel` (whole, tp=1, whatever this process's layout) with the checkpoint's
        weights, in eval mode on ``device`` (parameters float32 unless ``dtype``)."""
        from ..model import GPTModel
        from ..parallel import state

        with state.single_process(), torch.device("meta"):
            model = GPTModel(self.cfg.model, self.kind, self.tokenizer.vocab_size, seed=0)
        model = model.to_empty(device=device)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in self.tensors():
                params[name].copy_(tensor)
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def describe(self) -> str:
        return "consolidated" if self.consolidated else self.layout.describe()


def load_into(module: torch.nn.Module, source: CheckpointReader, what: str = "training.init_from") -> int:
    """Copy ``source``'s weights into this rank's parameters of ``module`` (a GPTModel or a pipeline
    stage, TP-sharded or not; before ``deepspeed.initialize``): each rank keeps its shard of every full
    tensor it holds. Returns the number of tensors copied. A missing tensor or a full shape that differs
    from the model's raises ValueError naming the tensor (``what`` names the option in the message)."""
    from ..parallel import state
    from ..parallel.init import local_shard
    from .names import named_model_params

    layout = state.get()
    params = dict(named_model_params(module))
    unknown = sorted(set(params) - set(source.specs))
    if unknown:
        raise ValueError(f"{what}={source.tag_dir}: the checkpoint has no tensor {unknown[0]!r} "
                         f"({len(unknown)} of this model's parameters are missing)")
    for name, p in params.items():
        full = list(p.shape)
        if getattr(p, "tensor_model_parallel", False):
            full[p.partition_dim] = p.partition_full_size
        if tuple(full) != source.specs[name].shape:
            raise ValueError(f"{what}={source.tag_dir}: tensor {name!r} has shape {source.specs[name].shape} in the "
                             f"checkpoint, this model's is {tuple(full)} (model settings differ)")
    with torch.no_grad():
        for name, value in source.tensors(set(params)):
            p = params[name]
            if getattr(p, "tensor_model_parallel", False):
                value = local_shard(value, p.partition_dim, layout.tp, layout.tp_rank, p.partition_stride)
            p.data.copy_(value)
    return len(params)
