"""MemoryMap / MemoryMapBuilder: round trips, reference layout, overwrite refusal, atomicity."""

import json
import pickle
import random

import numpy as np
import pytest

from megatron_tfree.data.memory_map import (
    MemoryMap,
    MemoryMapBuilder,
    MemoryMapError,
    memory_map_exists,
)


def random_documents(seed: int, n: int = 60) -> list[bytes]:
    """Random unicode documents incl. empty ones, a huge one and multi-byte characters."""
    rng = random.Random(seed)
    alphabet = "abc xyz .,!?\n\täöü߀😀中文ё"
    docs = []
    for i in range(n):
        if i % 7 == 0:
            docs.append(b"")
            continue
        length = rng.choice([1, 5, 50, 500])
        docs.append("".join(rng.choice(alphabet) for _ in range(length)).encode("utf-8"))
    docs.insert(n // 2, ("huge " * 40000 + "😀").encode("utf-8"))
    return docs


def test_round_trip_every_byte_once_in_order(tmp_path):
    docs = random_documents(0)
    with MemoryMapBuilder(tmp_path / "c") as b:
        for d in docs:
            b.add(d)
    mm = MemoryMap(tmp_path / "c")
    assert len(mm) == len(docs)
    assert [mm.document_bytes(i) for i in range(len(mm))] == docs
    assert mm.sizes.tolist() == [len(d) for d in docs]
    assert mm.total_size == sum(len(d) for d in docs)
    assert isinstance(mm[1], np.memmap) and mm.dtype == np.uint8
    assert (tmp_path / "c.bin").read_bytes() == b"".join(docs)
    assert mm[-1].tobytes() == docs[-1]
    with pytest.raises(IndexError, match="out of range"):
        mm[len(docs)]


def test_str_array_and_non_uint8_dtypes(tmp_path):
    with MemoryMapBuilder(tmp_path / "t", dtype=np.int32, index_dtype=np.int64) as b:
        b.add(np.array([1, -2, 3]))
        b.add([])
        b.add(np.arange(10, dtype=np.int64))
    mm = MemoryMap(tmp_path / "t")
    assert mm.dtype == np.int32 and mm.index_dtype == np.int64
    assert mm[0].tolist() == [1, -2, 3] and mm[1].tolist() == [] and mm[2].tolist() == list(range(10))
    with MemoryMapBuilder(tmp_path / "s") as b:
        b.add("héllo")
        with pytest.raises(ValueError, match="do not fit"):
            b.add(np.array([300]))
    assert MemoryMap(tmp_path / "s").document_bytes(0) == "héllo".encode()


def test_empty_map(tmp_path):
    MemoryMapBuilder(tmp_path / "e").finalize()
    mm = MemoryMap(tmp_path / "e")
    assert len(mm) == 0 and mm.total_size == 0 and list(mm) == []


def test_reference_layout_written_by_hand_loads_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8) for _ in range(101)]
    starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
    index = np.stack([starts, [len(d) for d in docs]], axis=1).astype(np.uint64)
    (tmp_path / "ref.bin").write_bytes(b"".join(d.tobytes() for d in docs))
    (tmp_path / "ref.idx").write_bytes(index.tobytes(order="C"))
    (tmp_path / "ref.meta.json").write_text(json.dumps({"dtype": "uint8", "index_dtype": "uint64", "document_count": 101}))
    assert (tmp_path / "ref.idx").stat().st_size == 1616
    mm = MemoryMap(tmp_path / "ref")
    assert len(mm) == 101
    for i, d in enumerate(docs):
        assert np.array_equal(mm[i], d)
    # and the builder writes byte-identical files
    with MemoryMapBuilder(tmp_path / "ours") as b:
        for d in docs:
            b.add(d)
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()
    assert json.loads((tmp_path / "ours.meta.json").read_text()) == {"dtype": "uint8", "index_dtype": "uint64", "document_count": 101}


def test_overwrite_refused_unless_asked(tmp_path):
    with MemoryMapBuilder(tmp_path / "o") as b:
        b.add(b"old")
    with pytest.raises(FileExistsError, match="o.bin"):
        MemoryMapBuilder(tmp_path / "o")
    with MemoryMapBuilder(tmp_path / "o", overwrite=True) as b:
        b.add(b"new")
        b.add(b"docs")
    mm = MemoryMap(tmp_path / "o")
    assert [mm.document_bytes(i) for i in range(2)] == [b"new", b"docs"]


def test_not_finalized_is_not_accepted_then_rerun_succeeds(tmp_path):
    b = MemoryMapBuilder(tmp_path / "k")
    b.add(b"half")
    b._bin.flush()  # simulate a process killed before finalize(): temp files stay behind
    assert not memory_map_exists(tmp_path / "k")
    with pytest.raises(FileNotFoundError, match=r"k\.meta\.json"):
        MemoryMap(tmp_path / "k")
    with MemoryMapBuilder(tmp_path / "k") as b2:  # leftover temp files do not block a rerun
        b2.add(b"full")
    assert MemoryMap(tmp_path / "k").document_bytes(0) == b"full"


def test_exception_inside_context_aborts(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with MemoryMapBuilder(tmp_path / "x") as b:
            b.add(b"abc")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with MemoryMapBuilder(tmp_path / "x") as b:
        b.add(b"abc")
    assert len(MemoryMap(tmp_path / "x")) == 1


def test_inconsistent_files_rejected_with_file_name(tmp_path):
    with MemoryMapBuilder(tmp_path / "m") as b:
        b.add(b"hello")
        b.add(b"world")
    (tmp_path / "m.idx").write_bytes((tmp_path / "m.idx").read_bytes()[:-8])
    with pytest.raises(MemoryMapError, match=r"m\.idx"):
        MemoryMap(tmp_path / "m")
    with MemoryMapBuilder(tmp_path / "n") as b:
        b.add(b"hello")
    (tmp_path / "n.bin").write_bytes(b"hell")
    with pytest.raises(MemoryMapError, match=r"n\.bin"):
        MemoryMap(tmp_path / "n")
    (tmp_path / "n.meta.json").write_text("{not json")
    with pytest.raises(MemoryMapError, match=r"n\.meta\.json"):
        MemoryMap(tmp_path / "n")


def test_pickle_reopens(tmp_path):
    with MemoryMapBuilder(tmp_path / "p") as b:
        b.add(b"abc")
    mm = pickle.loads(pickle.dumps(MemoryMap(tmp_path / "p", in_memory_index=True)))
    assert mm.document_bytes(0) == b"abc" and isinstance(mm[0], np.memmap)
