"""Layout-free ("consolidated") checkpoints: full tensors under the model's names, any layout reads them.

A consolidated directory is a tag directory (``config.yaml``, ``tokenizer/``, ...) holding::

    consolidated.json        marker + metadata (below)
    model.safetensors        full parameters under GPTModel's state_dict names (fp32)
    optimizer.safetensors    full Adam moments "exp_avg.<name>", "exp_avg_sq.<name>" (absent: weights only)

The marker: ``{"format": "megatron_tfree.consolidated", "version": 1, "source": {...},
"optimizer": {"type", "step", "param_groups"} or null, "scheduler": ... or null, "engine": {...}}``.
Written by :mod:`megatron_tfree.training.consolidate` (any DeepSpeed layout -> weights + moments, through
the engine) and by the importers (:mod:`megatron_tfree.hf`: weights only, ``"optimizer": null``).
Resuming from a weights-only directory starts the optimizer from zero moments at step 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from ..fileutil import default_permissions
from .files import TrainerState, write_json

MARKER_FILE = "consolidated.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "megatron_tfree.consolidated"
VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam(W)


def is_consolidated(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a consolidated directory (has the marker file)."""
    return (Path(path) / MARKER_FILE).is_file()


def read_meta(tag_dir: str | os.PathLike) -> dict[str, Any]:
    """The marker's metadata; a wrong ``format`` raises ValueError naming the file."""
    path = Path(tag_dir) / MARKER_FILE
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def has_moments(tag_dir: str | os.PathLike) -> bool:
    return (Path(tag_dir) / OPTIMIZER_FILE).is_file()


def moment_name(key: str, name: str) -> str:
    return f"{key}.{name}"


class ConsolidatedFiles:
    """Full tensors of a consolidated directory by name (``model`` weights, or Adam ``moment`` s)."""

    def __init__(self, tag_dir: str | os.PathLike):
        from safetensors import safe_open

        self.tag_dir = Path(tag_dir)
        path = self.tag_dir / MODEL_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.tag_dir}: {MODEL_FILE} is missing")
        self._model = safe_open(str(path), "pt")
        self._names = set(self._model.keys())
        self._moments = None
        if has_moments(self.tag_dir):
            self._moments = safe_open(str(self.tag_dir / OPTIMIZER_FILE), "pt")
            self._moment_names = set(self._moments.keys())

    def names(self) -> set[str]:
        return set(self._names)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise ValueError(f"{self.tag_dir / MODEL_FILE}: no tensor {name!r} (model and checkpoint differ)")
        return self._model.get_tensor(name)

    def moment(self, key: str, name: str) -> Optional[torch.Tensor]:
        """Adam moment ``key`` of ``name``; None for a weights-only directory."""
        if self._moments is None:
            return None
        entry = moment_name(key, name)
        if entry not in self._moment_names:
            raise ValueError(f"{self.tag_dir / OPTIMIZER_FILE}: no tensor {entry!r} (model and checkpoint differ)")
        return self._moments.get_tensor(entry)


def weights_only_meta(source: dict[str, Any]) -> dict[str, Any]:
    """The marker of a directory that holds weights only (an import): fresh optimizer on resume."""
    return {"format": FORMAT, "version": VERSION, "source": source, "optimizer": None, "scheduler": None,
            "engine": {"global_steps": 0, "global_samples": 0, "skipped_steps": 0}}


def write_weights_only(directory: str | os.PathLike, cfg: Any, tokenizer: Any,
                       tensors: Iterable[tuple[str, torch.Tensor]], specs: dict[str, Any], source: dict[str, Any],
                       progress: bool = False) -> Path:
    """Fill ``directory`` (an empty temp dir of :func:`.files.atomic_output_dir`) with a weights-only
    consolidated checkpoint: ``tensors`` streamed into ``model.safetensors`` in the order of
    ``specs`` (full fp32, shapes checked), ``config.yaml``, ``tokenizer/``, ``trainer_state.json``
    (step 0), the marker."""
    from .files import CONFIG_FILE, STATE_FILE, TOKENIZER_DIR
    from .safetensors_stream import Entry, SafetensorsWriter

    directory = Path(directory)
    entries = [Entry(s.name, torch.float32, s.shape) for s in specs.values()]
    with SafetensorsWriter(directory / MODEL_FILE, entries, metadata={"format": FORMAT}) as writer:
        for name, tensor in _progress(tensors, len(entries), progress, "writing weights"):
            writer.write(name, tensor.float())
    cfg.save(directory / CONFIG_FILE)
    tokenizer.save(directory / TOKENIZER_DIR)
    write_json(directory / STATE_FILE, TrainerState().__dict__)
    write_json(directory / MARKER_FILE, weights_only_meta(source))
    return directory


def _progress(items: Iterable[Any], total: int, enabled: bool, desc: str) -> Iterator[Any]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=desc, unit="tensor", dynamic_ncols=True)


def merge_parts(directory: Path, name: str) -> None:
    """Merge ``part{stage}.{name}`` files (one per pipeline stage, written by the conversion ranks) into
    ``name``, in stage order, and remove the parts."""
    from safetensors.torch import load_file, save_file

    parts = sorted(directory.glob(f"part*.{name}"), key=lambda p: int(p.name[4:].split(".")[0]))
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(load_file(str(part)))
    save_file(merged, str(directory / name), metadata={"format": FORMAT})
    default_permissions(directory / name)
    for part in parts:
        part.unlink()
