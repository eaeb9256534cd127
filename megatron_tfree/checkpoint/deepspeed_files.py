"""DeepSpeed's files in a tag directory, per layout, read without running DeepSpeed.

What a (TP, PP, DP, ZeRO) layout writes (DeepSpeed 0.19, as saved by :mod:`megatron_tfree.training`):

* no pipeline, ZeRO 0-2: ``mp_rank_{t:02d}_model_states.pt`` per TP rank ``t``; the model's (TP-local)
  weights under ``"module"`` in the training dtype (ZeRO 0 also keeps the optimizer state there;
  ZeRO 1/2 in ``zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt`` per data-parallel rank ``d``);
* ZeRO 3: ``zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt`` per (d, t) holds empty parameters and
  their shapes (``param_shapes``: one ordered ``{name: shape}`` per optimizer parameter group); the
  fp32 weights are partitioned over the data-parallel ranks in ``..._optim_states.pt``
  (``optimizer_state_dict.fp32_flat_groups``: per group, this rank's slice ``[r * k, (r + 1) * k)`` of
  every parameter flattened and zero-padded to ``k * dp`` entries, parameters back to back);
* pipeline: ``layer_{i:02d}-model_{t:02d}-model_states.pt`` per global layer ``i`` and TP rank ``t``,
  keys ``"layer.<name>"`` (:func:`.names.stage_prefix` gives the model prefix).

Files are opened with ``mmap=True`` (:func:`.safe_load.load_weights_only`) and only the tensors asked
for are touched. A missing file raises FileNotFoundError naming it and the layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .safe_load import load_weights_only


def model_states_file(tp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_model_states.pt"


def layer_file(index: int, tp_rank: int) -> str:
    return f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"


def zero_model_states_file(dp_rank: int, tp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_model_states.pt"


def zero_optim_file(dp_rank: int, mp_rank: int) -> str:
    return f"zero_pp_rank_{dp_rank}_mp_rank_{mp_rank:02d}_optim_states.pt"


def is_deepspeed_dir(tag_dir: Path) -> bool:
    return any(tag_dir.glob("*model_states.pt"))


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` / ``_orig_mod.`` wrapper prefix shared by every key."""
    out = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int

    def describe(self) -> str:
        return f"TP={self.tp} PP={self.pp} DP={self.dp} ZeRO-{self.zero_stage}"


class DeepSpeedFiles:
    """TP-local tensors of one tag directory: :meth:`read` ``(names, tp_rank)`` -> ``{name: tensor}``.

    ``names`` are full model names of one pipeline layer (the reader asks layer by layer); each call
    opens the files it needs (memory-mapped) and lets them go afterwards, so only the tensors
    returned stay in memory."""

    def __init__(self, tag_dir: Path, layout: Layout, num_layers: int):
        self.tag_dir, self.layout, self.num_layers = tag_dir, layout, num_layers
        if layout.pp > 1 and layout.zero_stage > 1:
            raise ValueError(f"{tag_dir}: {layout.describe()} is not a layout this trainer writes")
        self._zero3_index: dict[int, dict[str, tuple[int, int, int, tuple[int, ...]]]] = {}

    def _path(self, name: str, what: str) -> Path:
        path = self.tag_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{self.tag_dir}: {name} is missing ({what} of a {self.layout.describe()} "
                                    f"checkpoint)")
        return path

    def read(self, names: Iterable[str], tp_rank: int, layer: int) -> dict[str, torch.Tensor]:
        names = list(names)
        if self.layout.pp > 1:
            from .names import stage_prefix

            prefix = stage_prefix(layer, self.num_layers) + "."
            data = load_weights_only(self._path(layer_file(layer, tp_rank), f"layer {layer}, TP rank {tp_rank}"),
                                     mmap=True)
            local = {prefix + k[len("layer."):]: v for k, v in data.items() if k.startswith("layer.")}
            return self._pick(local, names, layer_file(layer, tp_rank))
        if self.layout.zero_stage == 3:
            return self._read_zero3(names, tp_rank)
        name = model_states_file(tp_rank)
        data = load_weights_only(self._path(name, f"TP rank {tp_rank}"), mmap=True)
        module = data.get("module") if isinstance(data, Mapping) else None
        if not isinstance(module, Mapping):
            raise ValueError(f"{self.tag_dir / name}: expected the model state dict under key 'module'")
        if any(isinstance(v, torch.Tensor) and v.numel() == 0 for v in module.values()):
            raise ValueError(f"{self.tag_dir / name}: the parameters are empty (partitioned by ZeRO-3), but "
                             f"config.yaml says parallel.zero_stage={self.layout.zero_stage}")
        return self._pick(strip_prefix(module), names, name)

    def _pick(self, tensors: Mapping[str, torch.Tensor], names: list[str], file: str) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"{self.tag_dir / file}: no tensor {missing[0]!r} (the checkpoint and its config.yaml "
                             f"disagree; {len(missing)} missing)")
        return {n: tensors[n] for n in names}

    # ------------------------------------------------------------------ ZeRO 3
    def _zero3_entries(self, tp_rank: int) -> dict[str, tuple[int, int, int, tuple[int, ...]]]:
        """``{name: (group, offset, partition numel, shape)}`` of TP rank ``tp_rank``'s parameters."""
        if tp_rank not in self._zero3_index:
            file = zero_model_states_file(0, tp_rank)
            data = load_weights_only(self._path(file, f"ZeRO-3 shapes of TP rank {tp_rank}"), mmap=True)
            groups = data.get("param_shapes")
            if not isinstance(groups, list):
                raise ValueError(f"{self.tag_dir / file}: no 'param_shapes' (not a ZeRO-3 checkpoint)")
            entries = {}
            for g, shapes in enumerate(groups):
                offset = 0
                for name, shape in strip_prefix(shapes).items():
                    shape = tuple(int(s) for s in shape)
                    part = math.ceil(math.prod(shape) / self.layout.dp)
                    entries[name] = (g, offset, part, shape)
                    offset += part
            self._zero3_index[tp_rank] = entries
        return self._zero3_index[tp_rank]

    def _read_zero3(self, names: list[str], tp_rank: int) -> dict[str, torch.Tensor]:
        entries = self._zero3_entries(tp_rank)
        missing = [n for n in names if n not in entries]
        if missing:
            raise ValueError(f"{self.tag_dir / zero_model_states_file(0, tp_rank)}: no parameter {missing[0]!r} in "
                           f"'param_shapes' (the checkpoint and its config.yaml disagree)")
        flats = []
        for d in range(self.layout.dp):
            file = zero_optim_file(d, tp_rank)
            data = load_weights_only(self._path(file, f"ZeRO-3 partition {d} of TP rank {tp_rank}"), mmap=True)
            try:
                flats.append(data["optimizer_state_dict"]["fp32_flat_groups"])
            except (KeyError, TypeError):
                raise ValueError(f"{self.tag_dir / file}: no optimizer_state_dict.fp32_flat_groups") from None
        out = {}
        for n in names:
            g, offset, part, shape = entries[n]
            pieces = []
            for d, groups in enumerate(flats):
                flat = groups[g]
                if offset + part > flat.numel():
                    raise ValueError(f"{self.tag_dir / zero_optim_file(d, tp_rank)}: group {g} holds {flat.numel()} "
                                     f"values, {n!r} needs [{offset}, {offset + part})")
                pieces.append(flat.narrow(0, offset, part))
            out[n] = torch.cat(pieces).narrow(0, 0, math.prod(shape)).view(shape).detach()
        return out
