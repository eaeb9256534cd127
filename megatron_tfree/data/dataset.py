"""Samples for pretraining and finetuning, the batch collation and the DataLoader factory.

A *sample* holds ``seq_len + 1`` units (words for T-Free, tokens for a classic tokenizer): inputs
are units ``0..S-1`` and targets units ``1..S``.

Pretraining packing (:class:`PretrainingDataset`)
    The aligned items are read in order and each segment's text is encoded; ``<|endoftext|>`` is
    appended only after a segment with ``ends_document``. This gives one stream of ``U`` units over
    the whole corpus. Sample ``j`` is the window of units ``[j*S, j*S + S + 1)`` of that stream
    (consecutive windows share one unit: the last target of ``j`` is the first input of ``j+1``), so
    every unit is used once as an input and once as a target, and an item's remainder simply starts
    the next sample. The last window is padded (eot ids, weight 0, 0 bytes) instead of dropped, so
    ``len = ceil((U - 1) / S)``. The number of units of each item is computed once (one pass of the
    tokenizer over the corpus) and cached beside the aligned index as
    ``{prefix}.aligned_{N}.units-{key}.npy`` (``key`` hashes the tokenizer config and the index).
    Sample ``j`` is found by binary search over the cumulative counts: deterministic, O(log items).

Positions and documents: position ids restart at 0 after every end-of-text and at the start of a
sample; document ids start at 0 and increase by one after every end-of-text (attention is
block-causal within equal ids). ``target_bytes`` follows :mod:`megatron_tfree.data.unit_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..tokenizer.base import SparseIds, Tokenizer
from .aligned import AlignedMemoryMap
from .batch import Batch
from .sampler import IndexSampler, ResumableSampler
from .unit_bytes import END_OF_TEXT_BYTES, unit_byte_counts

UNITS_CACHE_VERSION = 1


@dataclass
class Sample:
    """``seq_len + 1`` units and the per-position fields of the ``seq_len`` input positions."""

    ids: SparseIds  # seq_len + 1 units
    units: list[str]  # their surface strings ("" for padding)
    position_ids: np.ndarray  # [S] int64
    document_ids: np.ndarray  # [S] int64
    loss_weights: np.ndarray  # [S] float32, weight of predicting unit t+1 at position t
    target_bytes: np.ndarray  # [S] int64, bytes of unit t+1

    @property
    def seq_len(self) -> int:
        return len(self.position_ids)


def positions_and_documents(is_eot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Position and document ids of input positions, given which input units are end-of-text."""
    is_eot = np.asarray(is_eot, dtype=bool)
    n = len(is_eot)
    after = np.zeros(n, dtype=np.int64)
    after[1:] = np.cumsum(is_eot[:-1])
    starts = np.concatenate([[0], np.flatnonzero(is_eot[:-1]) + 1]).astype(np.int64)
    return np.arange(n, dtype=np.int64) - starts[after], after


class _EncodedItem:
    """One aligned item encoded: its units, CSR ids and, per unit, the unit before it in its segment."""

    __slots__ = ("units", "ids", "left", "is_eot")

    def __init__(self, units: list[str], ids: SparseIds, left: list[Optional[str]], is_eot: np.ndarray):
        self.units, self.ids, self.left, self.is_eot = units, ids, left, is_eot


def _decode_text(raw: bytes) -> str:
    """UTF-8 text of a stored segment; invalid bytes become U+FFFD (and count as such in target_bytes)."""
    return raw.decode("utf-8", errors="replace")


class PretrainingDataset(torch.utils.data.Dataset):
    """Packed pretraining samples over an :class:`AlignedMemoryMap` (packing: see the module docstring).

    Args:
        aligned: the aligned item index of a text MemoryMap.
        tokenizer: turns segment text into units and ids.
        seq_len: ``S``; every sample has ``S + 1`` units.
        seed: kept for the sampler (the packing itself is deterministic and unshuffled).
        cache_units: store the per-item unit counts beside the index (skipped if not writable).
        progress: show a progress bar while counting units.
    """

    def __init__(self, aligned: AlignedMemoryMap, tokenizer: Tokenizer, seq_len: int, seed: int = 0,
                 cache_units: bool = True, progress: bool = False):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.aligned = aligned
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self._eot_ids = tokenizer.eot_ids()
        self._cache: OrderedDict[int, _EncodedItem] = OrderedDict()
        self.item_units = self._unit_counts(cache_units, progress)
        self.cum_units = np.zeros(len(self.item_units) + 1, dtype=np.int64)
        np.cumsum(self.item_units, out=self.cum_units[1:])
        self.total_units = int(self.cum_units[-1])

    # -- per-item encoding ------------------------------------------------------------------
    def _encode_item(self, idx: int) -> _EncodedItem:
        hit = self._cache.get(idx)
        if hit is not None:
            self._cache.move_to_end(idx)
            return hit
        eot = self.tokenizer.end_of_text
        units: list[str] = []
        parts: list[SparseIds] = []
        left: list[Optional[str]] = []
        eots: list[int] = []
        for raw, ends_document in self.aligned[idx]:
            enc = self.tokenizer.encode(_decode_text(raw))
            if len(enc):
                left.append(None)
                left.extend(enc.units[:-1])
                units.extend(enc.units)
                parts.append(enc.ids)
            if ends_document:
                eots.append(len(units))
                units.append(eot)
                left.append(None)
                parts.append(self._eot_ids)
        is_eot = np.zeros(len(units), dtype=bool)
        is_eot[eots] = True
        item = _EncodedItem(units, SparseIds.concat(parts), left, is_eot)
        self._cache[idx] = item
        if len(self._cache) > 4:
            self._cache.popitem(last=False)
        return item

    def _cache_path(self) -> Optional[Path]:
        meta = getattr(self.aligned, "path_meta", None)
        if meta is None or not Path(meta).is_file():
            return None
        key = json.dumps({"v": UNITS_CACHE_VERSION, "tokenizer": self.tokenizer.identity(),
                          "index": Path(meta).read_text(encoding="utf-8")}, sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
        return Path(f"{self.aligned.prefix}.aligned_{self.aligned.max_bytes}.units-{digest}.npy")

    def _unit_counts(self, cache: bool, progress: bool) -> np.ndarray:
        path = self._cache_path() if cache else None
        if path is not None and path.is_file():
            try:
                counts = np.load(path)
                if counts.shape == (len(self.aligned),) and counts.dtype == np.int64:
                    return counts
            except (OSError, ValueError):
                pass  # unreadable cache: recount below and replace it
        counts = np.zeros(len(self.aligned), dtype=np.int64)
        for i in tqdm(range(len(self.aligned)), desc=f"counting units of {self.aligned.prefix}",
                      disable=not progress, leave=False):
            counts[i] = len(self._encode_item(i).units)
        if path is not None:
            tmp = Path(f"{path}.tmp{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    np.save(f, counts)
                os.replace(tmp, path)
            except OSError:
                tmp.unlink(missing_ok=True)  # read-only corpus directory: keep the counts in memory only
        return counts

    # -- samples ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return max(0, -(-(self.total_units - 1) // self.seq_len))

    def locate(self, idx: int) -> tuple[int, int]:
        """``(item, unit offset in item)`` where sample ``idx`` starts."""
        start = idx * self.seq_len
        item = int(np.searchsorted(self.cum_units, start, side="right")) - 1
        return item, start - int(self.cum_units[item])

    def __getitem__(self, idx: int) -> Sample:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} samples of {self.aligned.prefix}")
        need = self.seq_len + 1
        item, off = self.locate(idx)
        units: list[str] = []
        left: list[Optional[str]] = []
        parts: list[SparseIds] = []
        eots: list[np.ndarray] = []
        while need > 0 and item < len(self.item_units):
            enc = self._encode_item(item)
            take = min(need, len(enc.units) - off)
            units += enc.units[off:off + take]
            left += enc.left[off:off + take]
            parts.append(enc.ids.slice(off, off + take))
            eots.append(enc.is_eot[off:off + take])
            need -= take
            item, off = item + 1, 0
        real = len(units)
        is_eot = np.concatenate(eots) if eots else np.zeros(0, dtype=bool)
        if need > 0:  # the corpus' last window: pad with end-of-text units of weight 0
            parts += [self._eot_ids] * need
            units += [""] * need
            is_eot = np.concatenate([is_eot, np.ones(need, dtype=bool)])
        nbytes = unit_byte_counts(self.tokenizer, units[1:real], left[1:real])
        nbytes[is_eot[1:real]] = END_OF_TEXT_BYTES
        target_bytes = np.zeros(self.seq_len, dtype=np.int64)
        target_bytes[: real - 1] = nbytes
        weights = np.zeros(self.seq_len, dtype=np.float32)
        weights[: real - 1] = 1.0
        pos, doc = positions_and_documents(is_eot[: self.seq_len])
        return Sample(SparseIds.concat(parts), units, pos, doc, weights, target_bytes)


# --------------------------------------------------------------------------------------------------
# finetuning
# --------------------------------------------------------------------------------------------------


def _field(piece: Any, name: str) -> Any:
    return piece[name] if isinstance(piece, dict) else getattr(piece, name)


class FinetuningDataset(torch.utils.data.Dataset):
    """One instruction record (a MemoryMap document) per sample.

    Pieces are encoded separately; the weight of position ``t`` is the ``has_loss`` of the piece
    that target unit ``t+1`` came from. ``<|endoftext|>`` is appended with the weight of the last
    piece (a model that answers also learns to stop). Then the units are truncated to
    ``seq_len + 1`` or padded with end-of-text ids of weight 0, 0 bytes and empty surface strings.
    Only pieces of ``type == "text"`` are supported.
    """

    def __init__(self, memory_map: Any, tokenizer: Tokenizer, seq_len: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.memory_map = memory_map
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self._eot_ids = tokenizer.eot_ids()

    def __len__(self) -> int:
        return len(self.memory_map)

    def pieces(self, idx: int) -> list[Any]:
        from .convert import read_instruction_record

        where = f"{getattr(self.memory_map, 'prefix', 'memory map')} document {idx}"
        try:
            pieces = read_instruction_record(self.memory_map.document_bytes(idx))
        except Exception as e:
            raise ValueError(f"{where}: not an instruction record ({e})") from e
        for p in pieces:
            if _field(p, "type") != "text":
                raise ValueError(f"{where}: piece type {_field(p, 'type')!r} is not supported (only 'text')")
        return pieces

    def __getitem__(self, idx: int) -> Sample:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range for {len(self)} records")
        n = self.seq_len + 1
        units: list[str] = []
        left: list[Optional[str]] = []
        parts: list[SparseIds] = []
        weight: list[float] = []
        last = 0.0
        for p in self.pieces(idx):
            enc = self.tokenizer.encode(_field(p, "content"))
            last = 1.0 if _field(p, "has_loss") else 0.0
            if len(enc):
                units += enc.units
                left += [None] + enc.units[:-1]
                parts.append(enc.ids)
                weight += [last] * len(enc)
            if len(units) >= n:
                break
        units.append(self.tokenizer.end_of_text)
        left.append(None)
        parts.append(self._eot_ids)
        weight.append(last)
        is_eot = np.zeros(len(units), dtype=bool)
        is_eot[-1] = True
        ids = SparseIds.concat(parts)
        real = min(len(units), n)
        units, left, ids, is_eot = units[:real], left[:real], ids.slice(0, real), is_eot[:real]
        w = np.asarray(weight[:real], dtype=np.float32)
        nbytes = unit_byte_counts(self.tokenizer, units[1:], left[1:])
        nbytes[is_eot[1:]] = END_OF_TEXT_BYTES
        pad = n - real
        if pad:
            ids = SparseIds.concat([ids] + [self._eot_ids] * pad)
            units = units + [""] * pad
            is_eot = np.concatenate([is_eot, np.ones(pad, dtype=bool)])
        weights = np.zeros(self.seq_len, dtype=np.float32)
        weights[: real - 1] = w[1:]
        target_bytes = np.zeros(self.seq_len, dtype=np.int64)
        target_bytes[: real - 1] = nbytes
        pos, doc = positions_and_documents(is_eot[: self.seq_len])
        return Sample(ids, units, pos, doc, weights, target_bytes)


# --------------------------------------------------------------------------------------------------
# batches and loaders
# --------------------------------------------------------------------------------------------------


def collate(samples: Sequence[Sample]) -> Batch:
    """Stack samples of equal ``seq_len`` into a :class:`Batch` (CSR rows ``b * S + s``).

    Input row ``(b, s)`` holds the ids of unit ``s`` of sample ``b``, target row ``(b, s)`` those of
    unit ``s + 1`` (T-Free rows may repeat an id shared by two trigrams; the loss clamps the
    multi-hot to 1). ``target_units[b][s]`` is the target unit's string where the weight is > 0, else "".
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    s_len = samples[0].seq_len
    if any(s.seq_len != s_len for s in samples):
        raise ValueError(f"collate: samples of different seq_len {sorted({s.seq_len for s in samples})}")
    inputs = SparseIds.concat([s.ids.slice(0, s_len) for s in samples])
    targets = SparseIds.concat([s.ids.slice(1, s_len + 1) for s in samples])
    stack = lambda name, dtype: torch.from_numpy(np.stack([getattr(s, name) for s in samples]).astype(dtype))
    weights = [s.loss_weights for s in samples]
    target_units = [[u if w > 0 else "" for u, w in zip(s.units[1:], ws)] for s, ws in zip(samples, weights)]
    return Batch(
        input_offsets=torch.from_numpy(inputs.offsets.astype(np.int64)),
        input_ids=torch.from_numpy(inputs.indices.astype(np.int64)),
        target_offsets=torch.from_numpy(targets.offsets.astype(np.int64)),
        target_ids=torch.from_numpy(targets.indices.astype(np.int64)),
        position_ids=stack("position_ids", np.int64),
        document_ids=stack("document_ids", np.int64),
        loss_weights=stack("loss_weights", np.float32),
        target_bytes=stack("target_bytes", np.int64),
        target_units=target_units,
    )


def _open_split(cfg: Any, tokenizer: Tokenizer, prefixes: Sequence[str], key: str, progress: bool):
    from .aligned import ensure_aligned_index
    from .memory_map import MemoryMap

    d = cfg.data
    datasets = []
    for i, prefix in enumerate(prefixes):
        where = f"data.{key}[{i}] = {prefix!r}"
        if not Path(f"{prefix}.meta.json").is_file():
            raise FileNotFoundError(f"{where}: no MemoryMap there ({prefix}.meta.json is missing); "
                                    f"convert text with megatron-tfree-prepare-data first")
        if d.finetuning:
            ds: torch.utils.data.Dataset = FinetuningDataset(MemoryMap(prefix), tokenizer, d.seq_len)
        else:
            aligned = ensure_aligned_index(prefix, d.aligned_max_bytes, progress=progress)
            ds = PretrainingDataset(aligned, tokenizer, d.seq_len, d.seed, progress=progress)
        if len(ds) == 0:
            raise ValueError(f"{where}: holds no samples (too little text for data.seq_len={d.seq_len})")
        datasets.append(ds)
    return datasets[0] if len(datasets) == 1 else torch.utils.data.ConcatDataset(datasets)


def build_dataset(cfg: Any, tokenizer: Tokenizer, split: str = "train", progress: bool = True):
    """The dataset of ``split`` from ``cfg.data`` (None: no validation data configured).

    ``data.prefix_paths`` / ``data.valid_prefix_paths`` list MemoryMap prefixes (several are
    concatenated). With an empty ``prefix_paths`` the default corpus is used for both splits; with
    ``prefix_paths`` but no ``valid_prefix_paths`` there is no validation set (None).
    Pretraining prefixes get their aligned index (``data.aligned_max_bytes``) built if missing.
    """
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    d = cfg.data
    if split == "train" and d.prefix_paths:
        return _open_split(cfg, tokenizer, d.prefix_paths, "prefix_paths", progress)
    if split == "valid" and d.valid_prefix_paths:
        return _open_split(cfg, tokenizer, d.valid_prefix_paths, "valid_prefix_paths", progress)
    if split == "valid" and d.prefix_paths:
        return None
    from .corpus import default_corpus

    corpus = default_corpus(d.cache_dir or None, progress=progress, aligned_max_bytes=d.aligned_max_bytes)
    prefix = corpus.train if split == "train" else corpus.valid
    return _open_split(cfg, tokenizer, [prefix], f"<default corpus {split}>", progress)


def build_dataloader(cfg: Any, tokenizer: Tokenizer, dp_rank: int = 0, dp_world: int = 1,
                     consumed_samples: int = 0, split: str = "train", progress: bool = True):
    """An endless DataLoader of :class:`Batch` for this data-parallel rank (None: no such split).

    Batches hold ``cfg.training.micro_batch_size`` samples in the order of
    :class:`ResumableSampler` (seed ``cfg.data.seed``), or for the train split with
    ``cfg.data.sample_index`` set, of :class:`IndexSampler` over that index (checked against this
    dataset: :func:`megatron_tfree.data.round_index.read_sample_index`), resuming after
    ``consumed_samples`` global samples; iterating it again starts again at ``consumed_samples`` (so
    validation, built with 0, sees the same batches at every evaluation). Workers: ``cfg.data.num_workers``.
    """
    dataset = build_dataset(cfg, tokenizer, split, progress=progress)
    if dataset is None:
        return None
    if split == "train" and cfg.data.sample_index:  # a round of multiple-round training: the order is given
        from .round_index import data_fingerprint, read_sample_index

        order = read_sample_index(cfg.data.sample_index, len(dataset),
                                  data_fingerprint(cfg, tokenizer, len(dataset)))
        sampler: torch.utils.data.Sampler = IndexSampler(order, dp_rank=dp_rank, dp_world=dp_world,
                                                         consumed_samples=consumed_samples)
    else:
        sampler = ResumableSampler(len(dataset), seed=cfg.data.seed, dp_rank=dp_rank, dp_world=dp_world,
                                   consumed_samples=consumed_samples, shuffle=True)
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.training.micro_batch_size, sampler=sampler,
                                       num_workers=workers, collate_fn=collate, persistent_workers=workers > 0)
