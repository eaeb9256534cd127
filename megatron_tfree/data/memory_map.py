"""MemoryMap: documents stored back to back in one flat file, indexed by (start, length) pairs.

On-disk layout (spec section 5; identical to the reference implementation, so maps it wrote load
unchanged):

* ``{prefix}.bin``       raw elements of every document, back to back, in ``dtype``
* ``{prefix}.idx``       per document two integers in ``index_dtype``: start element, length
* ``{prefix}.meta.json`` ``{"dtype": "uint8", "index_dtype": "uint64", "document_count": N}``

Text corpora use ``uint8`` (UTF-8 bytes) and ``uint64``, so 101 documents give a 1,616-byte index.

Atomicity: :class:`MemoryMapBuilder` writes ``*.partial`` files and renames them into place only
in :meth:`MemoryMapBuilder.finalize`, ``.meta.json`` last. :class:`MemoryMap` refuses a prefix
without ``.meta.json`` and checks that the sizes of ``.idx`` and ``.bin`` agree with it, so a
conversion killed half-way is never mistaken for a complete one; re-running it simply succeeds.
Opening also validates the whole index once (documents back to back inside ``.bin``; the error names
the first bad entry), and :attr:`MemoryMap.fingerprint` keys the caches derived from a map.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Union

import numpy as np

from ..errors import UserError

PathLike = Union[str, os.PathLike]
PARTIAL_SUFFIX = ".partial"
_FLUSH_EVERY = 65536  # index pairs buffered before a write
_VALIDATE_BLOCK = 1 << 20  # index rows checked per vectorised block
_SAMPLED_BLOCKS = 64  # 4 KiB blocks of .bin in the fingerprint


class MemoryMapError(ValueError, UserError):
    """A MemoryMap on disk is missing, incomplete or inconsistent (the message names the file)."""


def memory_map_paths(prefix: PathLike) -> tuple[Path, Path, Path]:
    """The ``(.bin, .idx, .meta.json)`` paths of ``prefix`` (suffixes appended, never replaced)."""
    p = str(prefix)
    return Path(p + ".bin"), Path(p + ".idx"), Path(p + ".meta.json")


def memory_map_exists(prefix: PathLike) -> bool:
    """True if a *complete* MemoryMap is at ``prefix`` (it opens and passes the size checks)."""
    try:
        MemoryMap(prefix)
    except (MemoryMapError, FileNotFoundError):
        return False
    return True


def _open_array(path: Path, dtype: np.dtype) -> np.ndarray:
    """Read-only memmap of a whole file; an empty array for an empty file (mmap cannot map 0 bytes)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, mode="r", dtype=dtype, order="C")


class MemoryMap:
    """Read-only view of a MemoryMap: ``mm[i]`` is document ``i`` as a zero-copy ``np.memmap`` slice.

    Args:
        prefix: path prefix; the files are ``prefix + ".bin"`` etc.
        in_memory_index: copy the (start, length) table into RAM (faster random access).

    Raises:
        FileNotFoundError: a file is missing (the map was never finalized); names the file.
        MemoryMapError: the files disagree (truncated, or left over from an interrupted write).
    """

    def __init__(self, prefix: PathLike, in_memory_index: bool = False, validate: bool = True) -> None:
        self.prefix = Path(prefix)
        self.in_memory_index = in_memory_index
        self._fingerprint = None
        self._open(validate)

    # -- opening and validation -------------------------------------------------------------
    def _open(self, validate: bool = True) -> None:
        self.path_bin, self.path_idx, self.path_meta = memory_map_paths(self.prefix)
        for path in (self.path_meta, self.path_idx, self.path_bin):
            if not path.is_file():
                hint = " (incomplete conversion? re-run it)" if path == self.path_meta else ""
                raise FileNotFoundError(f"MemoryMap file not found: {path}{hint}")
        try:
            meta = json.loads(self.path_meta.read_text(encoding="utf-8"))
            self.dtype = np.dtype(meta["dtype"])
            self.index_dtype = np.dtype(meta["index_dtype"])
            count = meta["document_count"]
        except (ValueError, KeyError, TypeError) as e:
            raise MemoryMapError(f"{self.path_meta}: malformed MemoryMap meta ({e!r})") from e
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise MemoryMapError(f"{self.path_meta}: document_count must be an int >= 0, got {count!r}")
        if self.index_dtype.kind not in "iu":
            raise MemoryMapError(f"{self.path_meta}: index_dtype must be an integer type, got {self.index_dtype}")
        self.document_count = count

        idx_bytes = self.path_idx.stat().st_size
        want = 2 * count * self.index_dtype.itemsize
        if idx_bytes != want:
            raise MemoryMapError(
                f"{self.path_idx}: size {idx_bytes} bytes, expected {want} "
                f"(2 * {count} documents * {self.index_dtype.itemsize}); truncated or stale index"
            )
        bin_bytes = self.path_bin.stat().st_size
        if bin_bytes % self.dtype.itemsize:
            raise MemoryMapError(f"{self.path_bin}: size {bin_bytes} is not a multiple of {self.dtype} itemsize")
        self._data = _open_array(self.path_bin, self.dtype)
        index = _open_array(self.path_idx, self.index_dtype).reshape(count, 2)
        self._index = np.array(index) if self.in_memory_index else index

        total = int(self._index[:, 1].sum(dtype=np.uint64)) if count else 0
        if total != len(self._data):
            raise MemoryMapError(
                f"{self.path_bin}: holds {len(self._data)} elements but the lengths in "
                f"{self.path_idx} sum to {total}; truncated or stale data"
            )
        if validate:
            self._validate_index()

    def _validate_index(self) -> None:
        """Every document starts where the previous one ended (the first at 0) and ends inside ``.bin``:
        one vectorised pass over the index in blocks; the error names the file and the first bad entry."""
        expected, n = 0, len(self._data)
        for a in range(0, self.document_count, _VALIDATE_BLOCK):
            block = np.asarray(self._index[a : a + _VALIDATE_BLOCK]).astype(np.int64)  # uint64 > 2**63: negative, caught
            starts, lengths = block[:, 0], block[:, 1]
            ends = starts + lengths
            want = np.empty_like(starts)
            want[0] = expected
            want[1:] = ends[:-1]
            bad = np.flatnonzero((starts != want) | (lengths < 0) | (ends > n) | (starts < 0))
            if bad.size:
                i = int(bad[0])
                raise MemoryMapError(
                    f"{self.path_idx}: document {a + i} has start {int(block[i, 0])} and length {int(block[i, 1])}, but "
                    f"documents are stored back to back: it must start at {int(want[i])} and end within the "
                    f"{n} elements of {self.path_bin}; corrupt or stale index")
            expected = int(ends[-1])

    @property
    def fingerprint(self) -> str:
        """A digest of this map's index, its data's size and sampled data blocks: what caches derived from
        the map (aligned index, unit counts) are keyed on, so that a re-converted corpus does not reuse them
        (also when its size and document count are the same). Not the modification time: a corpus copied
        without keeping times (``cp``, ``rsync`` without ``-t``) keeps its caches."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            with open(self.path_idx, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            st = self.path_bin.stat()
            h.update(f"{self.dtype.str}|{st.st_size}".encode())
            raw = self._data.view(np.uint8) if len(self._data) else np.zeros(0, np.uint8)
            for off in np.linspace(0, max(len(raw) - 4096, 0), num=_SAMPLED_BLOCKS, dtype=np.int64):
                h.update(raw[int(off) : int(off) + 4096].tobytes())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    # pickling (DataLoader workers): reopen the files instead of copying the mapped arrays
    def __getstate__(self) -> dict:
        return {"prefix": str(self.prefix), "in_memory_index": self.in_memory_index}

    def __setstate__(self, state: dict) -> None:  # validated when first opened; the sizes are checked again
        self.prefix = Path(state["prefix"])
        self.in_memory_index = state["in_memory_index"]
        self._fingerprint = None
        self._open(validate=False)

    # -- access -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.document_count

    def _check(self, idx: int) -> int:
        if not isinstance(idx, (int, np.integer)) or isinstance(idx, bool):
            raise TypeError(f"MemoryMap index must be an int, got {type(idx).__name__}")
        i = int(idx)
        if i < 0:
            i += self.document_count
        if not 0 <= i < self.document_count:
            raise IndexError(f"document {idx} out of range for {self.document_count} documents in {self.prefix}")
        return i

    def start_and_length(self, idx: int) -> tuple[int, int]:
        """``(start element, length)`` of document ``idx``."""
        start, length = self._index[self._check(idx)]
        return int(start), int(length)

    def __getitem__(self, idx: int) -> np.ndarray:
        """Document ``idx`` as a read-only zero-copy view (``np.memmap``) into ``.bin``."""
        start, length = self.start_and_length(idx)
        return self._data[start : start + length]

    def read(self, start: int, length: int) -> np.ndarray:
        """``length`` elements starting at absolute element ``start`` of ``.bin`` (zero-copy)."""
        if start < 0 or length < 0 or start + length > len(self._data):
            raise IndexError(f"range [{start}, {start + length}) outside {self.path_bin} ({len(self._data)} elements)")
        return self._data[start : start + length]

    def document_bytes(self, idx: int) -> bytes:
        """The raw bytes of document ``idx`` (for text maps: its UTF-8 encoding)."""
        return self[idx].tobytes()

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def sizes(self) -> np.ndarray:
        """Length (elements) of every document, as an int64 array."""
        return np.asarray(self._index[:, 1], dtype=np.int64)

    @property
    def starts(self) -> np.ndarray:
        """Start element of every document, as an int64 array."""
        return np.asarray(self._index[:, 0], dtype=np.int64)

    @property
    def total_size(self) -> int:
        """Number of elements in ``.bin`` (bytes, for a uint8 text map)."""
        return len(self._data)

    def __repr__(self) -> str:
        return f"MemoryMap({str(self.prefix)!r}, documents={len(self)}, dtype={self.dtype}, total_size={self.total_size})"


class MemoryMapBuilder:
    """Write a MemoryMap document by document; nothing is visible under ``prefix`` until :meth:`finalize`.

    Use as a context manager: a normal exit finalizes, an exception aborts (temp files removed)::

        with MemoryMapBuilder("out/corpus") as b:
            b.add("text")          # str (uint8 maps), bytes, or a 1-D array
        MemoryMap("out/corpus")

    Args:
        prefix: output path prefix; parent directories are created.
        dtype: element dtype of ``.bin`` (uint8 for UTF-8 text).
        index_dtype: integer dtype of ``.idx`` (uint64 is the reference layout).
        overwrite: replace an existing map at ``prefix``; otherwise ``FileExistsError``.
    """

    def __init__(self, prefix: PathLike, dtype=np.uint8, index_dtype=np.uint64, overwrite: bool = False) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.index_dtype = np.dtype(index_dtype)
        if self.index_dtype.kind not in "iu":
            raise ValueError(f"index_dtype must be an integer dtype, got {self.index_dtype}")
        self.overwrite = overwrite
        self.paths = memory_map_paths(self.prefix)
        if not overwrite:
            for path in self.paths:
                if path.exists():
                    raise FileExistsError(f"refusing to overwrite existing {path} (pass overwrite=True / --overwrite)")
        self.paths[0].parent.mkdir(parents=True, exist_ok=True)
        self.tmp_paths = tuple(Path(str(p) + PARTIAL_SUFFIX) for p in self.paths)
        # leftovers of an interrupted earlier run are ours to replace
        self._bin = open(self.tmp_paths[0], "wb")
        self._idx = open(self.tmp_paths[1], "wb")
        self._pending: list[int] = []
        self.document_count = 0
        self.total_size = 0
        self.finalized = False
        self.aborted = False

    def _as_array(self, doc) -> np.ndarray:
        if isinstance(doc, str):
            if self.dtype != np.uint8:
                raise TypeError(f"str documents need a uint8 builder, this one is {self.dtype}")
            doc = doc.encode("utf-8")
        if isinstance(doc, (bytes, bytearray, memoryview)):
            raw = bytes(doc)
            if len(raw) % self.dtype.itemsize:
                raise ValueError(f"{len(raw)} bytes are not a whole number of {self.dtype} elements")
            return np.frombuffer(raw, dtype=self.dtype)
        arr = np.asarray(doc)
        if arr.ndim != 1:
            raise ValueError(f"documents must be 1-D, got shape {arr.shape}")
        if arr.dtype == self.dtype:
            return arr
        cast = arr.astype(self.dtype)
        if arr.size and not np.array_equal(cast, arr):
            raise ValueError(f"document values do not fit {self.dtype} (got {arr.dtype}, range {arr.min()}..{arr.max()})")
        return cast

    def add(self, doc) -> int:
        """Append one document (str, bytes-like or 1-D array); returns its index."""
        if self.finalized or self.aborted:
            raise RuntimeError(f"MemoryMapBuilder for {self.prefix} is already closed")
        arr = np.ascontiguousarray(self._as_array(doc))
        self._bin.write(arr.tobytes())
        self._pending += (self.total_size, len(arr))
        self.total_size += len(arr)
        self.document_count += 1
        if len(self._pending) >= 2 * _FLUSH_EVERY:
            self._flush_index()
        return self.document_count - 1

    def _flush_index(self) -> None:
        if self._pending:
            self._idx.write(np.asarray(self._pending, dtype=self.index_dtype).tobytes())
            self._pending = []

    def finalize(self) -> "MemoryMap":
        """Flush, sync and rename the files into place (``.meta.json`` last); returns the reader."""
        if self.aborted:
            raise RuntimeError(f"MemoryMapBuilder for {self.prefix} was aborted")
        if not self.finalized:
            self._flush_index()
            for f in (self._bin, self._idx):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            meta = {"dtype": self.dtype.name, "index_dtype": self.index_dtype.name,
                    "document_count": self.document_count}
            self.tmp_paths[2].write_text(json.dumps(meta), encoding="utf-8")
            bin_path, idx_path, meta_path = self.paths
            if meta_path.exists():  # overwrite: invalidate the old map before replacing its data
                meta_path.unlink()
            os.replace(self.tmp_paths[0], bin_path)
            os.replace(self.tmp_paths[1], idx_path)
            os.replace(self.tmp_paths[2], meta_path)
            self.finalized = True
        return MemoryMap(self.prefix)

    def abort(self) -> None:
        """Close and delete the temp files; the prefix is left as it was."""
        if self.finalized or self.aborted:
            return
        self.aborted = True
        for f in (self._bin, self._idx):
            f.close()
        for p in self.tmp_paths:
            p.unlink(missing_ok=True)

    def __enter__(self) -> "MemoryMapBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self.aborted:
            self.finalize()
        else:
            self.abort()

    def __len__(self) -> int:
        return self.document_count
