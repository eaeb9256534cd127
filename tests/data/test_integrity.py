"""Data integrity: a corrupt MemoryMap index is refused at open (file and first bad entry named); caches
derived from a map (aligned index, unit counts) are keyed on its fingerprint, so a re-converted corpus of
the same size and document count rebuilds them; a conversion that writes no document leaves nothing;
invalid UTF-8 is skipped or repaired as asked, counted either way; a missing Parquet column lists the
columns there are."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from megatron_tfree.data.aligned import AlignedIndexError, AlignedMemoryMap, ensure_aligned_index
from megatron_tfree.data.convert import convert_text_files, main as convert_main
from megatron_tfree.data.dataset import PretrainingDataset
from megatron_tfree.data.memory_map import MemoryMap, MemoryMapBuilder, MemoryMapError
from megatron_tfree.tokenizer import TrigramTokenizer

DOCS = ["the king rides. ", "a lady sings of the sea. ", "my lord speaks. "]


def _map(tmp_path, docs=DOCS, name="m"):
    with MemoryMapBuilder(tmp_path / name) as b:
        for d in docs:
            b.add(d)
    return tmp_path / name


def _corrupt(prefix, fn):
    idx = np.fromfile(f"{prefix}.idx", dtype=np.uint64).reshape(-1, 2)
    fn(idx)
    idx.tofile(f"{prefix}.idx")


@pytest.mark.parametrize("case,fn,match", [
    ("start moved", lambda i: i.__setitem__((1, 0), i[1, 0] + 1), r"document 1 has start 17 .* must start at 16"),
    ("lengths shifted, same sum", lambda i: (i.__setitem__((0, 1), i[0, 1] - 2), i.__setitem__((1, 1), i[1, 1] + 2)),
     "document 1 has start 16 .* must start at 14"),
    ("high byte of a start flipped", lambda i: i.__setitem__((2, 0), i[2, 0] ^ (1 << 63)), "document 2 has start"),
    ("high byte of a length flipped", lambda i: i.__setitem__((0, 1), i[0, 1] ^ (1 << 56)), "lengths in .*m.idx sum"),
])
def test_corrupt_index_is_refused_naming_the_entry(tmp_path, case, fn, match):
    prefix = _map(tmp_path)
    MemoryMap(prefix)
    _corrupt(prefix, fn)
    with pytest.raises(MemoryMapError, match=match) as e:
        MemoryMap(prefix)
    assert "m.idx" in str(e.value) or "m.bin" in str(e.value)


def test_reconverted_corpus_rebuilds_aligned_index_and_unit_counts(tmp_path):
    tok = TrigramTokenizer(vocab_size=256, vocab_population=4)
    prefix = _map(tmp_path, ["aaaa bbbb. cccc dddd. "] * 3)
    first = PretrainingDataset(ensure_aligned_index(prefix, 16), tok, seq_len=4)
    units_before = int(first.item_units.sum())
    bin_path = Path(f"{prefix}.bin")
    os.utime(bin_path, (bin_path.stat().st_atime + 3600, bin_path.stat().st_mtime + 3600))  # copied without times
    assert len(AlignedMemoryMap(prefix, 16)) == len(first.aligned)  # the index is still valid: no rebuild
    # different text, same byte size and document count (so the same lengths and an identical .idx)
    with MemoryMapBuilder(prefix, overwrite=True) as b:
        for _ in range(3):
            b.add("x y z w v u t s r q p ")
    with pytest.raises(AlignedIndexError, match="re-converted"):
        AlignedMemoryMap(prefix, 16)
    second = PretrainingDataset(ensure_aligned_index(prefix, 16), tok, seq_len=4)
    assert int(second.item_units.sum()) != units_before  # recounted, not the stale cache
    uncached = PretrainingDataset(AlignedMemoryMap(prefix, 16), tok, seq_len=4, cache_units=False)
    assert np.array_equal(second.item_units, uncached.item_units)


def test_zero_document_conversion_writes_nothing(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"\xff\xfe broken")
    assert convert_main(["text", str(src), "-o", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "nothing was created" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert convert_main(["text", str(src), "-o", str(tmp_path / "out"), "--no-progress", "--invalid-utf8",
                         "replace"]) == 0  # the corrected re-run is not blocked
    assert MemoryMap(tmp_path / "out").document_bytes(0).decode() == "\ufffd\ufffd broken"


def test_invalid_utf8_skip_or_replace_is_counted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("fine text")
    (src / "bad.txt").write_bytes(b"caf\xe9 au lait")
    skipped = convert_text_files([src], tmp_path / "skip", progress=False)
    assert skipped.documents_written == 1 and skipped.skipped["invalid_utf8"] == 1
    repaired = convert_text_files([src], tmp_path / "replace", progress=False, invalid_utf8="replace")
    assert repaired.documents_written == 2 and repaired.repaired["invalid_utf8_replaced"] == 1
    assert "repaired and kept 1 documents" in repaired.report() and "bad.txt:1" in repaired.report()
    with pytest.raises(ValueError, match="invalid_utf8"):
        convert_text_files([src], tmp_path / "x", invalid_utf8="ignore")


def test_missing_parquet_column_lists_the_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a"], "id": [1]}), tmp_path / "d.parquet")
    summary = convert_text_files([tmp_path / "d.parquet"], tmp_path / "o", progress=False)
    assert summary.documents_written == 0 and "columns: content, id" in summary.report()


def test_existing_output_and_missing_input_are_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("text")
    assert convert_main(["text", str(src), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert convert_main(["text", str(src), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    assert convert_main(["text", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("megatron-tfree-prepare-data: error: refusing to overwrite existing") and "out.bin" in err[0]
    assert err[1].startswith("megatron-tfree-prepare-data: error: ") and "nowhere" in err[1] and len(err) == 2
