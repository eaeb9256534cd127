"""AlignedMemoryMap: items of about ``max_bytes`` UTF-8 bytes cut from consecutive documents.

An aligned index is built over a uint8 (UTF-8 text) :class:`~megatron_tfree.data.memory_map.MemoryMap`
once, and read many times. Documents are taken in order and packed into items of at most
``max_bytes`` bytes. A document that does not fit in the rest of the current item is cut *before* one
of ``" .,!?"`` (so words are not split) as late as possible; if its chunk has no such character in
reach, the item is closed and the chunk starts a fresh one; a run of ``max_bytes`` bytes with no such
character at all is hard-cut at a UTF-8 character boundary. Every byte of every document appears in
exactly one item, in order; nothing is dropped (the tail item is kept) and empty documents, having no
bytes, produce no segment.

Files (``N = max_bytes``), next to the MemoryMap:

* ``{prefix}.aligned_{N}.idx``: uint64. ``item_count + 1`` item starts (segment numbers; item ``i`` is
  segments ``[starts[i], starts[i+1])``), then ``segment_count`` triples ``(document, offset in
  document, length)``.
* ``{prefix}.aligned_{N}.meta.json``: counts, ``max_bytes``, the size and the fingerprint of the source
  MemoryMap (:attr:`MemoryMap.fingerprint`: index, data size and time, sampled data blocks), so an index
  built for other contents is refused as stale (``ensure_aligned_index`` rebuilds it, and the unit-count
  cache keyed on this file follows). Written last, via temp names and renames, like the MemoryMap.

Unlike the reference implementation this keeps the last item, finds an item in O(1) and tells for
each segment whether it reaches the real end of its document (``ends_document``): the dataset
appends ``<|endoftext|>`` only there, never mid-document.
"""

from __future__ import annotations

import json
import os
from array import array
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from .memory_map import MemoryMap, PathLike

SPLIT_BYTES = b" .,!?"
FORMAT = "megatron_tfree.aligned_memory_map"
VERSION = 1
MIN_MAX_BYTES = 8


class Segment(NamedTuple):
    """The bytes of one document inside an item, and whether they reach that document's end."""

    text: bytes
    ends_document: bool


class AlignedIndexError(ValueError, UserError):
    """An aligned index is missing, incomplete or does not match its MemoryMap (names the file)."""


def aligned_index_paths(prefix: PathLike, max_bytes: int) -> tuple[Path, Path]:
    """``(.idx, .meta.json)`` paths of the aligned index of ``prefix`` for ``max_bytes``."""
    base = f"{prefix}.aligned_{int(max_bytes)}"
    return Path(base + ".idx"), Path(base + ".meta.json")


def _char_boundary(doc: np.ndarray, lo: int, cut: int) -> int:
    """Move ``cut`` left (not below ``lo + 1``) off UTF-8 continuation bytes; ``cut`` if that fails."""
    c = cut
    while c > lo and (int(doc[c]) & 0xC0) == 0x80:
        c -= 1
    return c if c > lo else cut


def plan_items(mm: MemoryMap, max_bytes: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Group the documents of ``mm`` into items; returns ``(item_starts [n+1], segments [S, 3])``.

    Pure function of the MemoryMap and ``max_bytes`` (see the module docstring for the rules).
    """
    if max_bytes < MIN_MAX_BYTES:
        raise ValueError(f"max_bytes must be >= {MIN_MAX_BYTES}, got {max_bytes}")
    if mm.dtype != np.uint8:
        raise ValueError(f"{mm.prefix}: aligned index needs a uint8 (UTF-8 text) MemoryMap, got {mm.dtype}")
    tolerance = min(100, max_bytes // 10)  # a smaller remainder closes the item instead of a tiny chunk
    starts = array("Q", [0])
    segs = array("Q")
    used = 0  # bytes in the open item

    sizes = mm.sizes.tolist()
    for d in tqdm(range(len(sizes)), desc="aligning", unit="doc", disable=not progress, mininterval=1.0):
        size = sizes[d]
        pos = 0
        doc = None
        while pos < size:
            rest, room = size - pos, max_bytes - used
            if rest <= room:  # the rest of the document fits
                segs.extend((d, pos, rest))
                used += rest
                if used == max_bytes:
                    starts.append(len(segs) // 3)
                    used = 0
                break
            if used and room <= tolerance:
                starts.append(len(segs) // 3)
                used = 0
                continue
            if doc is None:
                doc = mm[d]
            window = doc[pos + 1 : pos + room + 1].tobytes()  # cut candidates pos+1 .. pos+room
            k = max(window.rfind(bytes((c,))) for c in SPLIT_BYTES)
            if k >= 0:
                cut = pos + 1 + k
            elif used:  # no word boundary in reach: start this chunk in a fresh item
                starts.append(len(segs) // 3)
                used = 0
                continue
            else:  # max_bytes without a boundary: hard cut, never inside a UTF-8 character
                cut = _char_boundary(doc, pos, pos + room)
            segs.extend((d, pos, cut - pos))
            starts.append(len(segs) // 3)
            used = 0
            pos = cut
    if used:
        starts.append(len(segs) // 3)
    return np.frombuffer(starts, dtype=np.uint64), np.frombuffer(segs, dtype=np.uint64).reshape(-1, 3)


def build_aligned_index(prefix: PathLike, max_bytes: int, overwrite: bool = False, progress: bool = True) -> "AlignedMemoryMap":
    """Build ``{prefix}.aligned_{max_bytes}.*`` over the MemoryMap at ``prefix``; returns the reader.

    Raises ``FileExistsError`` if a (complete or stale) index exists and ``overwrite`` is False.
    Writes temp files (unique per process) and renames them, ``.meta.json`` last, so an interrupted
    build leaves nothing a reader accepts and concurrent builders (e.g. several ranks) do not clash.
    """
    idx_path, meta_path = aligned_index_paths(prefix, max_bytes)
    if meta_path.exists() and not overwrite:
        raise FileExistsError(f"refusing to overwrite existing {meta_path} (pass overwrite=True / --overwrite)")
    mm = MemoryMap(prefix)
    item_starts, segs = plan_items(mm, max_bytes, progress=progress)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "max_bytes": int(max_bytes),
        "split_bytes": SPLIT_BYTES.decode("ascii"),
        "item_count": len(item_starts) - 1,
        "segment_count": len(segs),
        "source_document_count": len(mm),
        "source_total_size": mm.total_size,
        "source_fingerprint": mm.fingerprint,
    }
    tag = f".tmp{os.getpid()}"
    tmp_idx, tmp_meta = Path(str(idx_path) + tag), Path(str(meta_path) + tag)
    try:
        with open(tmp_idx, "wb") as f:
            f.write(item_starts.tobytes())
            f.write(segs.tobytes())
            f.flush()
            os.fsync(f.fileno())
        tmp_meta.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if meta_path.exists():
            meta_path.unlink(missing_ok=True)  # invalidate the old index before replacing it
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_meta, meta_path)
    finally:
        tmp_idx.unlink(missing_ok=True)
        tmp_meta.unlink(missing_ok=True)
    return AlignedMemoryMap(prefix, max_bytes, memory_map=mm)


def aligned_index_exists(prefix: PathLike, max_bytes: int) -> bool:
    """True if a complete aligned index matching the MemoryMap at ``prefix`` exists."""
    try:
        AlignedMemoryMap(prefix, max_bytes)
    except (AlignedIndexError, FileNotFoundError):
        return False
    return True


def ensure_aligned_index(prefix: PathLike, max_bytes: int, progress: bool = False) -> "AlignedMemoryMap":
    """Open the aligned index, building (or rebuilding a stale/incomplete) one first if needed."""
    try:
        return AlignedMemoryMap(prefix, max_bytes)
    except (AlignedIndexError, FileNotFoundError) as e:
        if not Path(f"{prefix}.meta.json").is_file():
            raise FileNotFoundError(f"no MemoryMap at {prefix} to align: {e}") from e
        return build_aligned_index(prefix, max_bytes, overwrite=True, progress=progress)


class AlignedMemoryMap:
    """Reader: ``am[i]`` is item ``i`` as a list of :class:`Segment` (bytes, ends_document).

    Args:
        prefix: the MemoryMap prefix (the index files sit next to it).
        max_bytes: which aligned index to open.
        memory_map: an already open MemoryMap of ``prefix`` to reuse (optional).
    """

    def __init__(self, prefix: PathLike, max_bytes: int, memory_map: MemoryMap | None = None) -> None:
        self.prefix = Path(prefix)
        self.max_bytes = int(max_bytes)
        self._open(memory_map)

    def _open(self, memory_map: MemoryMap | None = None, check_source: bool = True) -> None:
        self.path_idx, self.path_meta = aligned_index_paths(self.prefix, self.max_bytes)
        for path in (self.path_meta, self.path_idx):
            if not path.is_file():
                raise FileNotFoundError(f"aligned index file not found: {path} (build it with build_aligned_index "
                                        f"or tools/align_data.py)")
        mm = memory_map if memory_map is not None else MemoryMap(self.prefix, validate=check_source)
        try:
            meta = json.loads(self.path_meta.read_text(encoding="utf-8"))
            n, s = int(meta["item_count"]), int(meta["segment_count"])
            ok = meta.get("format") == FORMAT and int(meta["max_bytes"]) == self.max_bytes
        except (ValueError, KeyError, TypeError) as e:
            raise AlignedIndexError(f"{self.path_meta}: malformed aligned index meta ({e!r})") from e
        if not ok or meta.get("version") != VERSION:
            raise AlignedIndexError(f"{self.path_meta}: not a version-{VERSION} aligned index for max_bytes={self.max_bytes}")
        if (meta.get("source_document_count"), meta.get("source_total_size")) != (len(mm), mm.total_size):
            raise AlignedIndexError(
                f"{self.path_meta}: built for a MemoryMap of {meta.get('source_document_count')} documents / "
                f"{meta.get('source_total_size')} bytes, but {self.prefix} has {len(mm)} / {mm.total_size}; "
                f"stale index, rebuild with overwrite=True"
            )
        if check_source and meta.get("source_fingerprint") != mm.fingerprint:
            raise AlignedIndexError(f"{self.path_meta}: built for other contents of {self.prefix} (the MemoryMap was "
                                    f"re-converted since: fingerprint {meta.get('source_fingerprint')} != "
                                    f"{mm.fingerprint}); stale index, rebuild with overwrite=True")
        want = (n + 1 + 3 * s) * 8
        got = self.path_idx.stat().st_size
        if got != want:
            raise AlignedIndexError(f"{self.path_idx}: size {got} bytes, expected {want}; truncated or stale index")
        raw = np.memmap(self.path_idx, mode="r", dtype=np.uint64)
        self.memory_map = mm
        self.item_count, self.segment_count = n, s
        self._item_starts = raw[: n + 1]
        self._segs = raw[n + 1 :].reshape(s, 3)

    def __getstate__(self) -> dict:
        return {"prefix": str(self.prefix), "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict) -> None:  # a DataLoader worker: checked when the parent opened it
        self.prefix, self.max_bytes = Path(state["prefix"]), state["max_bytes"]
        self._open(check_source=False)

    def __len__(self) -> int:
        return self.item_count

    def spans(self, idx: int) -> np.ndarray:
        """Item ``idx`` as an ``[k, 3]`` array of ``(document, offset in document, length)``."""
        if not isinstance(idx, (int, np.integer)) or isinstance(idx, bool):
            raise TypeError(f"item index must be an int, got {type(idx).__name__}")
        i = int(idx) + (self.item_count if idx < 0 else 0)
        if not 0 <= i < self.item_count:
            raise IndexError(f"item {idx} out of range for {self.item_count} items in {self.path_idx}")
        a, b = int(self._item_starts[i]), int(self._item_starts[i + 1])
        return np.asarray(self._segs[a:b], dtype=np.int64)

    def __getitem__(self, idx: int) -> list[Segment]:
        out = []
        for doc, off, length in self.spans(idx).tolist():
            start, size = self.memory_map.start_and_length(doc)
            text = self.memory_map.read(start + off, length).tobytes()
            out.append(Segment(text, off + length == size))
        return out

    def item_size(self, idx: int) -> int:
        """Number of bytes in item ``idx``."""
        return int(self.spans(idx)[:, 2].sum())

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"AlignedMemoryMap({str(self.prefix)!r}, max_bytes={self.max_bytes}, items={len(self)})"
