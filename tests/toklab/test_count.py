"""toklab count: the counts equal a direct encoding, in parallel, resumed, merged, and from id MemoryMaps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_tfree.toklab import count as count_mod
from megatron_tfree.toklab.count import Counts, count_tokens, merge_counts
from megatron_tfree.toklab.sources import parse_corpus
from megatron_tfree.toklab.specs import BpeSpec


def _direct(tokenizer_path, corpus: str) -> np.ndarray:
    spec = BpeSpec(tokenizer_path)
    docs = [d for s in parse_corpus(corpus) for d in s.documents()]
    ids = [i for e in spec.tokenizer.encode_batch(docs, add_special_tokens=False) for i in e.ids]
    return np.bincount(ids, minlength=spec.vocab_size)


def test_counts_equal_encoding_the_documents(probe_bpe, tmp_path):
    want = _direct(probe_bpe, "multilingual")
    one = count_tokens(probe_bpe, ["multilingual"], tmp_path / "one.json", workers=1, progress=False)
    two = count_tokens(probe_bpe, ["multilingual"], tmp_path / "two.json", workers=2, progress=False)
    assert np.array_equal(one.counts, want) and np.array_equal(two.counts, want)
    assert one.tokens == int(want.sum()) and one.documents == 7 and one.shards == 7
    read = Counts.read(tmp_path / "one.json")
    assert np.array_equal(read.counts, want) and read.corpora == ["multilingual"]
    assert not (tmp_path / "one.json.progress.json").exists()


def test_a_rerun_skips_the_finished_shards(probe_bpe, tmp_path, monkeypatch):
    out = tmp_path / "counts.json"
    full = count_tokens(probe_bpe, ["multilingual"], out, progress=False)
    shards = [s for src in parse_corpus("multilingual") for s in src.shards]
    # an interrupted run that finished the first two shards
    count_mod._SPEC = BpeSpec(probe_bpe)
    first = [count_mod._count_shard(s) for s in shards[:2]]
    partial = Counts(full.tokenizer, full.tokenizer_sha256, full.vocab_size, ["multilingual"], 2,
                     sum(f[1] for f in first), sum(f[2] for f in first), sum(f[3] for f in first),
                     first[0][4] + first[1][4])
    (tmp_path / "counts.json.progress.json").write_text(json.dumps({**partial.to_json(),
                                                                     "done": [s.key for s in shards[:2]]}))
    seen = []
    real = count_mod._count_shard
    monkeypatch.setattr(count_mod, "_count_shard", lambda s: seen.append(s.key) or real(s))
    resumed = count_tokens(probe_bpe, ["multilingual"], out, progress=False)
    assert seen == [s.key for s in shards[2:]]
    assert np.array_equal(resumed.counts, full.counts) and resumed.shards == 7 and resumed.bytes == full.bytes


def test_a_progress_file_of_another_corpus_is_refused(probe_bpe, tmp_path):
    (tmp_path / "c.json.progress.json").write_text(json.dumps({"tokenizer_sha256": "x", "corpora": ["default"]}))
    with pytest.raises(ValueError, match="another tokenizer or corpus"):
        count_tokens(probe_bpe, ["multilingual"], tmp_path / "c.json", progress=False)


def test_merge_adds_counts_of_one_tokenizer(probe_bpe, tmp_path):
    en = count_tokens(probe_bpe, [f"en={parse_corpus('multilingual')[0].shards[0].path}"], tmp_path / "en.json",
                      progress=False)
    all_ = count_tokens(probe_bpe, ["multilingual"], tmp_path / "all.json", progress=False)
    merged = merge_counts([tmp_path / "en.json", tmp_path / "all.json"], tmp_path / "m.json")
    assert np.array_equal(merged.counts, en.counts + all_.counts) and merged.tokens == en.tokens + all_.tokens
    other = json.loads((tmp_path / "en.json").read_text())
    other["tokenizer_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="different tokenizers"):
        merge_counts([tmp_path / "all.json", tmp_path / "other.json"])


def test_a_memory_map_of_ids_is_counted_directly(probe_bpe, tmp_path):
    from megatron_tfree.data.memory_map import MemoryMapBuilder

    docs = [np.array([1, 2, 2, 300], dtype=np.uint16), np.array([], dtype=np.uint16), np.array([5], dtype=np.uint16)]
    with MemoryMapBuilder(tmp_path / "ids", dtype=np.uint16) as b:
        for d in docs:
            b.add(d)
    c = count_tokens(probe_bpe, [str(tmp_path / "ids")], tmp_path / "c.json", progress=False)
    assert c.tokens == 5 and c.documents == 3 and (c.counts[1], c.counts[2], c.counts[300], c.counts[5]) == (1, 2, 1, 1)
    with MemoryMapBuilder(tmp_path / "big", dtype=np.uint16) as b:
        b.add(np.array([7, 9999], dtype=np.uint16))
    with pytest.raises(ValueError, match=r"document 0 holds id 9999, outside the tokenizer's 600 ids"):
        count_tokens(probe_bpe, [str(tmp_path / "big")], tmp_path / "d.json", progress=False)
