"""AlignedMemoryMap: lossless ordered packing, word-boundary cuts, no dropped tail, atomicity."""

import json
import random

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megatron_tfree.data.aligned import (
    AlignedIndexError,
    AlignedMemoryMap,
    Segment,
    aligned_index_exists,
    aligned_index_paths,
    build_aligned_index,
    ensure_aligned_index,
)
from megatron_tfree.data.memory_map import MemoryMapBuilder


def write_map(prefix, docs, overwrite=False):
    with MemoryMapBuilder(prefix, overwrite=overwrite) as b:
        for d in docs:
            b.add(d)


def random_corpus(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    alphabet = ["a", "b", "word", " ", ".", ",", "!", "?", "\n", "ä", "€", "😀", "中", "ё"]
    docs = []
    for i in range(80):
        if i % 9 == 0:
            docs.append(b"")
            continue
        docs.append("".join(rng.choice(alphabet) for _ in range(rng.choice([1, 3, 20, 120]))).encode())
    docs.insert(10, ("lorem ipsum, dolor! " * 3000).encode())  # huge, many boundaries
    docs.insert(40, ("€" * 1000 + "😀" * 500).encode())  # huge, no boundary at all, multi-byte only
    return docs


def check_items(am: AlignedMemoryMap, docs: list[bytes], max_bytes: int) -> None:
    """Every byte exactly once in order; flags, sizes and cut points as promised."""
    rebuilt, pieces = [], []
    for i in range(len(am)):
        item = am[i]
        assert item, f"item {i} is empty"
        assert sum(len(s.text) for s in item) <= max_bytes
        pieces.extend(item)
    current = b""
    for seg in pieces:
        assert isinstance(seg, Segment) and seg.text
        current += seg.text
        if seg.ends_document:
            rebuilt.append(current)
            current = b""
        else:  # a cut inside a document: before a split char, or a hard cut at a char boundary
            seg.text.decode("utf-8")
    assert current == b""
    assert rebuilt == [d for d in docs if d]
    for seg_a, seg_b in zip(pieces, pieces[1:]):
        if not seg_a.ends_document:
            # a cut inside a document is before a cut character, unless the piece had no usable one:
            # a space at its first byte cannot be cut before (that would leave an empty chunk)
            assert seg_b.text[:1] in (b" ", b".", b",", b"!", b"?") or b" " not in seg_a.text[1:]


@pytest.mark.parametrize("max_bytes", [64, 1000, 20000])
def test_every_byte_once_in_order(tmp_path, max_bytes):
    docs = random_corpus(max_bytes)
    write_map(tmp_path / "c", docs)
    am = build_aligned_index(tmp_path / "c", max_bytes, progress=False)
    check_items(am, docs, max_bytes)
    assert aligned_index_paths(tmp_path / "c", max_bytes)[0].name == f"c.aligned_{max_bytes}.idx"
    assert am[-1] == am[len(am) - 1]
    with pytest.raises(IndexError):
        am[len(am)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=st.lists(st.text(alphabet=st.sampled_from("ab .,!?\nä€😀"), max_size=80), max_size=25),
       max_bytes=st.integers(8, 60))
@example(docs=[" \U0001F600\U0001F600"], max_bytes=8)  # only cut point at offset 0: hard cut at a char boundary
def test_property_lossless(tmp_path_factory, docs, max_bytes):
    prefix = tmp_path_factory.mktemp("p") / "c"
    encoded = [d.encode() for d in docs]
    write_map(prefix, encoded)
    check_items(build_aligned_index(prefix, max_bytes, progress=False), encoded, max_bytes)


def test_tail_kept_and_items_well_filled(tmp_path):
    docs = [f"doc number {i}.".encode() for i in range(1000)]  # 13..15 bytes each
    write_map(tmp_path / "c", docs)
    am = build_aligned_index(tmp_path / "c", 200, progress=False)
    sizes = [am.item_size(i) for i in range(len(am))]
    assert sum(sizes) == sum(len(d) for d in docs)  # nothing dropped, incl. the last group
    assert all(s > 200 - 16 for s in sizes[:-1])
    assert all(seg.ends_document for i in range(len(am)) for seg in am[i][:-1])
    assert am[len(am) - 1][-1] == Segment(docs[-1], True)


def test_long_document_cut_before_word_boundaries(tmp_path):
    doc = ("alpha beta, gamma. " * 100).encode()
    write_map(tmp_path / "c", [doc])
    am = build_aligned_index(tmp_path / "c", 50, progress=False)
    segs = [s for i in range(len(am)) for s in am[i]]
    assert b"".join(s.text for s in segs) == doc
    assert [s.ends_document for s in segs] == [False] * (len(segs) - 1) + [True]
    for s in segs[1:]:
        assert s.text[:1] in (b" ", b".", b",")  # each chunk starts at a cut char: words stay whole


def test_overwrite_refused_and_stale_index_detected(tmp_path):
    write_map(tmp_path / "c", [b"one two three"])
    build_aligned_index(tmp_path / "c", 8, progress=False)
    with pytest.raises(FileExistsError, match="aligned_8.meta.json"):
        build_aligned_index(tmp_path / "c", 8, progress=False)
    write_map(tmp_path / "c", [b"one two three", b"four"], overwrite=True)
    with pytest.raises(AlignedIndexError, match="stale"):
        AlignedMemoryMap(tmp_path / "c", 8)
    assert not aligned_index_exists(tmp_path / "c", 8)
    am = ensure_aligned_index(tmp_path / "c", 8)
    assert [s.text for i in range(len(am)) for s in am[i]] == [b"one two", b" three", b"four"]


def test_interrupted_build_not_accepted_and_rerun_succeeds(tmp_path):
    write_map(tmp_path / "c", [b"hello world"] * 5)
    idx, meta = aligned_index_paths(tmp_path / "c", 16)
    # simulate a kill: temp files and a renamed .idx, but no .meta.json
    (tmp_path / (idx.name + ".tmp999")).write_bytes(b"\0" * 24)
    idx.write_bytes(b"\0" * 40)
    with pytest.raises(FileNotFoundError, match=r"aligned_16\.meta\.json"):
        AlignedMemoryMap(tmp_path / "c", 16)
    am = build_aligned_index(tmp_path / "c", 16, progress=False)  # no overwrite needed
    check_items(am, [b"hello world"] * 5, 16)
    # a truncated .idx with a valid meta is refused, naming the file
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(AlignedIndexError, match=r"aligned_16\.idx"):
        AlignedMemoryMap(tmp_path / "c", 16)
    assert json.loads(meta.read_text())["item_count"] == len(am)


def test_max_bytes_too_small(tmp_path):
    write_map(tmp_path / "c", [b"x"])
    with pytest.raises(ValueError, match="max_bytes"):
        build_aligned_index(tmp_path / "c", 2, progress=False)
