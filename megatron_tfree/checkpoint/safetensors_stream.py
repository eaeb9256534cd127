"""Writing safetensors one tensor at a time, and splitting a model into size-limited shards.

``safetensors.torch.save_file`` needs every tensor in memory at once. Here the header is written
from the tensors' names, dtypes and shapes (known before any value is read, e.g. from
:func:`.names.param_specs`) and then each tensor's bytes are appended as it arrives, so a writer
holds one tensor at a time. The file is the standard format (8-byte little-endian header length,
JSON header with ``data_offsets``, the data), read back by ``safetensors`` itself.

Sharding follows the Hugging Face convention: ``model-00001-of-00003.safetensors`` ... plus
``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {name: file}}``);
a model within the size limit is one ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    """A tensor to be written: name, dtype, shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class SafetensorsWriter:
    """Stream ``entries`` into ``path``: call :meth:`write` once per entry, in order, then :meth:`close`.

    A wrong name, dtype or shape raises ValueError naming the tensor; closing before every entry was
    written raises too (the caller removes the file: see the atomic export directories)."""

    def __init__(self, path: str | os.PathLike, entries: Iterable[Entry], metadata: Optional[dict[str, str]] = None):
        self.path = Path(path)
        self.entries = list(entries)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for e in self.entries:
            if e.dtype not in DTYPES:
                raise ValueError(f"{e.name}: dtype {e.dtype} cannot be stored in safetensors")
            header[e.name] = {"dtype": DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise ValueError(f"{self.path}: {name!r} is one tensor more than announced")
        e = self.entries[self._next]
        if name != e.name or tensor.dtype != e.dtype or tuple(tensor.shape) != e.shape:
            raise ValueError(f"{self.path}: expected {e.name!r} {e.dtype} {list(e.shape)}, got {name!r} "
                             f"{tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if self._next != len(self.entries):
            missing = [e.name for e in self.entries[self._next:]]
            raise ValueError(f"{self.path}: closed with {len(missing)} tensors unwritten, e.g. {missing[:3]}")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


def parse_size(text: str | int) -> int:
    """Bytes of ``"5GB"``, ``"500MB"``, ``"10KiB"``, ``"123"`` (decimal units; ``*iB`` binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", str(text))
    if not m:
        raise ValueError(f"size {text!r}: expected a number with an optional unit, e.g. 5GB or 500MB")
    unit = (m.group(2) or "").lower()
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[:1]]
    return int(float(m.group(1)) * base**power)


def plan_shards(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive groups of ``entries`` of at most ``max_shard_bytes`` each (a larger tensor alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    """The file names of ``n`` shards (one: ``model.safetensors``)."""
    if n == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(directory: str | os.PathLike, shards: list[list[Entry]], names: list[str]) -> Optional[Path]:
    """``model.safetensors.index.json`` for a sharded model (None and nothing written for one file)."""
    if len(shards) == 1:
        return None
    weight_map = {e.name: file for group, file in zip(shards, names) for e in group}
    total = sum(e.nbytes for group in shards for e in group)
    path = Path(directory) / INDEX_FILE
    path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return path


def read_weight_map(directory: str | os.PathLike) -> dict[str, Path]:
    """``{tensor name: file}`` of a Hugging Face model folder (sharded with an index, or one file).
    Errors name a missing index, shard or the folder."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
        files = {name: directory / file for name, file in weight_map.items()}
        missing = sorted({str(p) for p in files.values() if not p.is_file()})
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return files
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {name: single for name in f.keys()}
