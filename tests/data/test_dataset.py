"""Datasets, sampler, collate and dataloader, on small corpora built with the real builders."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
import torch

from megatron_tfree.config import Config
from megatron_tfree.data.aligned import build_aligned_index
from megatron_tfree.data.convert import convert_instruct_jsonl
from megatron_tfree.data.dataset import (FinetuningDataset, PretrainingDataset, build_dataloader,
                                         build_dataset, collate, positions_and_documents)
from megatron_tfree.data.memory_map import MemoryMap, MemoryMapBuilder
from megatron_tfree.data.sampler import ResumableSampler
from megatron_tfree.data.unit_bytes import unit_byte_counts
from megatron_tfree.tokenizer.classic import ClassicTokenizer
from megatron_tfree.tokenizer.trigram import TrigramTokenizer

DOCS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "Friends, Romans, countrymen, lend me your ears!  I come to bury Caesar, not to praise him.",
    "",  # an empty document has no bytes, no segment and no end-of-text
    "Ünïcödé façade — 3.14 apples\t(tab)   spaced.\n\n\n\nEnd?",
    "Short.",
    "Now is the winter of our discontent made glorious summer by this sun of York; " * 3,
]
S = 7


@pytest.fixture(scope="module")
def tok():
    return TrigramTokenizer(vocab_size=512, vocab_population=4)


def make_corpus(prefix):
    with MemoryMapBuilder(prefix) as b:
        for d in DOCS:
            b.add(d)
    return prefix, build_aligned_index(prefix, 48, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("pre") / "corpus")


def stream(aligned, tok):
    """The expected unit stream: each segment encoded, end-of-text after a document's last segment."""
    units = []
    for i in range(len(aligned)):
        for raw, ends in aligned[i]:
            units += tok.encode(raw.decode("utf-8")).units
            if ends:
                units.append(tok.end_of_text)
    return units


def rows(ids):
    return [r.tolist() for r in ids.rows()]


@pytest.mark.parametrize("seq_len", [1, S, 64])
def test_every_unit_used_in_order_and_shifted(corpus, tok, seq_len):
    _, aligned = corpus
    ds = PretrainingDataset(aligned, tok, seq_len, seed=0)
    want = stream(aligned, tok)
    assert ds.total_units == len(want) and len(ds) == -(-(len(want) - 1) // seq_len)
    got = []
    for j in range(len(ds)):
        s = ds[j]
        assert len(s.ids) == len(s.units) == seq_len + 1
        real = int((s.loss_weights > 0).sum()) + 1
        assert np.all(s.loss_weights[: real - 1] == 1) and np.all(s.loss_weights[real - 1:] == 0)
        got += s.units[:seq_len] if j < len(ds) - 1 else s.units[:real]
        assert rows(s.ids) == rows(tok.encode_units([u or tok.end_of_text for u in s.units]))
        if j + 1 < len(ds):  # the last target of sample j is the first input of sample j + 1
            assert s.units[seq_len] == ds[j + 1].units[0]
    assert got == want


def test_positions_and_documents_reset_after_end_of_text(corpus, tok):
    _, aligned = corpus
    ds = PretrainingDataset(aligned, tok, S, seed=0)
    eot = tok.end_of_text
    seen_reset = 0
    for j in range(len(ds)):
        s = ds[j]
        assert s.position_ids[0] == 0 and s.document_ids[0] == 0
        for t in range(1, S):
            if s.units[t - 1] == eot or s.units[t - 1] == "":
                assert s.position_ids[t] == 0 and s.document_ids[t] == s.document_ids[t - 1] + 1
                seen_reset += 1
            else:
                assert s.position_ids[t] == s.position_ids[t - 1] + 1 and s.document_ids[t] == s.document_ids[t - 1]
    assert seen_reset >= 3


def test_positions_and_documents_helper():
    pos, doc = positions_and_documents(np.array([0, 1, 0, 0, 1, 1, 0], dtype=bool))
    assert pos.tolist() == [0, 1, 0, 1, 2, 0, 0] and doc.tolist() == [0, 0, 1, 1, 1, 2, 3]


def test_target_bytes_sum_to_corpus_bytes(corpus, tok):
    prefix, aligned = corpus
    ds = PretrainingDataset(aligned, tok, S, seed=0)
    first = ds[0].units[0]
    total = len(tok.decode([first]).encode("utf-8")) + sum(int(ds[j].target_bytes.sum()) for j in range(len(ds)))
    assert total == MemoryMap(prefix).total_size
    s = ds[0]
    assert (s.target_bytes[np.array(s.units[1:]) == tok.end_of_text] == 0).all()


def test_classic_tokenizer_target_bytes_exact(corpus):
    _, aligned = corpus
    ctok = ClassicTokenizer.train(DOCS * 3, vocab_size=300)
    ds = PretrainingDataset(aligned, ctok, S, seed=0)
    want = stream(aligned, ctok)
    assert ds.total_units == len(want)
    total = len(want[0]) + sum(int(ds[j].target_bytes.sum()) for j in range(len(ds)))
    assert total == sum(len(d.encode("utf-8")) for d in DOCS)
    assert all(len(r) == 1 for r in ds[0].ids.rows())


def test_unit_counts_are_cached_beside_the_index(tmp_path, tok, monkeypatch):
    prefix, aligned = make_corpus(tmp_path / "corpus")
    first = PretrainingDataset(aligned, tok, S, seed=0)
    files = list(prefix.parent.glob(f"{prefix.name}.aligned_48.units-*.npy"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(tok, "encode", lambda text: calls.append(text))
    again = PretrainingDataset(aligned, tok, S, seed=0)  # no encoding: the counts come from the file
    assert calls == [] and np.array_equal(again.item_units, first.item_units)
    other = TrigramTokenizer(vocab_size=256, vocab_population=2, lowercase=True)
    PretrainingDataset(aligned, other, S, seed=0)  # another tokenizer config, another cache file
    assert len(list(prefix.parent.glob(f"{prefix.name}.aligned_48.units-*.npy"))) == 2
    # two BPEs of the same size (the same config_dict) but other merges: other counts, another file
    a = ClassicTokenizer.train(DOCS * 3, vocab_size=300)
    b = ClassicTokenizer.train([" ".join(reversed(d.split())) for d in DOCS] * 3, vocab_size=300)
    assert a.config_dict() == b.config_dict() and a.identity() != b.identity()
    ca, cb = PretrainingDataset(aligned, a, S, seed=0), PretrainingDataset(aligned, b, S, seed=0)
    assert len(list(prefix.parent.glob(f"{prefix.name}.aligned_48.units-*.npy"))) == 4
    assert not np.array_equal(ca.item_units, cb.item_units)
    assert np.array_equal(cb.item_units, PretrainingDataset(aligned, b, S, seed=0, cache_units=False).item_units)


# -- finetuning ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    src = d / "data.jsonl"
    import json

    records = [
        [{"has_loss": False, "type": "text", "content": "Question: who wrote Hamlet?"},
         {"has_loss": True, "type": "text", "content": " Shakespeare."}],
        [{"has_loss": False, "type": "text", "content": "Say hi."},
         {"has_loss": True, "type": "text", "content": " Hi"},
         {"has_loss": False, "type": "text", "content": " (user)"},
         {"has_loss": True, "type": "text", "content": " there, friend!"}],
        [{"has_loss": True, "type": "text", "content": "word " * 40}],
    ]
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    convert_instruct_jsonl([src], d / "ft", progress=False)
    return MemoryMap(d / "ft"), records


def test_finetuning_weights_follow_has_loss(instruct, tok):
    mm, records = instruct
    ds = FinetuningDataset(mm, tok, seq_len=32)
    assert len(ds) == 3
    for i in (0, 1):
        s = ds[i]
        piece_weights, units = [], []
        for p in records[i]:
            u = tok.encode(p["content"]).units
            units += u
            piece_weights += [float(p["has_loss"])] * len(u)
        units.append(tok.end_of_text)
        piece_weights.append(float(records[i][-1]["has_loss"]))  # end-of-text: weight of the last piece
        n = len(units)
        assert s.units[:n] == units and s.units[n:] == [""] * (33 - n)
        assert s.loss_weights[: n - 1].tolist() == piece_weights[1:]
        assert (s.loss_weights[n - 1:] == 0).all() and (s.target_bytes[n - 1:] == 0).all()
        assert s.document_ids[: n].max() == 0 and s.position_ids[:n].tolist() == list(range(n))
        assert rows(s.ids)[n:] == [tok.eot_ids().row(0).tolist()] * (33 - n)  # padding: eot ids
        content_bytes = sum(len(p["content"].encode()) for p in records[i])
        assert len(tok.decode([units[0]]).encode()) + int(s.target_bytes.sum()) == content_bytes


def test_finetuning_truncates(instruct, tok):
    mm, _ = instruct
    s = FinetuningDataset(mm, tok, seq_len=10)[2]
    assert s.units == ["word"] * 11 and (s.loss_weights == 1).all() and s.position_ids.tolist() == list(range(10))


# -- sampler ------------------------------------------------------------------------------------


def take(it, n):
    return [next(it) for _ in range(n)]


def test_sampler_deterministic_and_epoch_permutations():
    a = take(iter(ResumableSampler(10, seed=3)), 30)
    assert a == take(iter(ResumableSampler(10, seed=3)), 30)
    assert a != take(iter(ResumableSampler(10, seed=4)), 30)
    for e in range(3):
        assert sorted(a[10 * e: 10 * e + 10]) == list(range(10))
    assert a[:10] != a[10:20]  # every epoch reshuffled
    assert take(iter(ResumableSampler(5, seed=0, shuffle=False)), 7) == [0, 1, 2, 3, 4, 0, 1]


def test_sampler_shards_disjoint_and_complete():
    n, w = 11, 3
    full = ResumableSampler(n, seed=1).global_order(0, 33).tolist()
    shards = [take(iter(ResumableSampler(n, seed=1, dp_rank=r, dp_world=w)), 11) for r in range(w)]
    for r in range(w):
        assert shards[r] == full[r::w]
    # interleaving the ranks gives back the global order: nothing duplicated, nothing missed
    assert [shards[p % w][p // w] for p in range(33)] == full
    for e in range(3):
        assert sorted(full[e * n:(e + 1) * n]) == list(range(n))


@pytest.mark.parametrize("consumed", [0, 1, 6, 9, 10, 23])
def test_sampler_resume_is_tail_of_uninterrupted_order(consumed):
    n, w = 10, 2
    for r in range(w):
        whole = take(iter(ResumableSampler(n, 7, r, w)), 40)
        positions = list(range(r, 80, w))
        tail = [s for s, p in zip(whole, positions) if p >= consumed]
        resumed = take(iter(ResumableSampler(n, 7, r, w, consumed_samples=consumed)), len(tail))
        assert resumed == tail


def test_sampler_finite_epochs_and_errors():
    s = ResumableSampler(10, 0, dp_rank=1, dp_world=3, consumed_samples=4, num_epochs=2)
    assert len(list(s)) == len(s) == len(range(4, 20)[(1 - 4) % 3::3])
    with pytest.raises(ValueError, match="empty"):
        ResumableSampler(0, 0)
    with pytest.raises(ValueError, match="dp_rank"):
        ResumableSampler(5, 0, dp_rank=2, dp_world=2)


# -- collate and loader -------------------------------------------------------------------------


def test_collate_shapes_and_csr(corpus, tok):
    _, aligned = corpus
    ds = PretrainingDataset(aligned, tok, S, seed=0)
    samples = [ds[0], ds[3], ds[len(ds) - 1]]
    b = collate(samples)
    assert b.shape == (3, S)
    assert b.input_offsets.shape == b.target_offsets.shape == (3 * S + 1,)
    assert b.input_offsets[-1] == len(b.input_ids) and b.target_offsets[-1] == len(b.target_ids)
    assert b.loss_weights.dtype == torch.float32 and b.target_bytes.dtype == torch.int64
    for bi, s in enumerate(samples):
        sample_rows = rows(s.ids)
        for t in range(S):
            r = bi * S + t
            assert b.input_ids[b.input_offsets[r]:b.input_offsets[r + 1]].tolist() == sample_rows[t]
            assert b.target_ids[b.target_offsets[r]:b.target_offsets[r + 1]].tolist() == sample_rows[t + 1]
            assert b.target_units[bi][t] == (s.units[t + 1] if s.loss_weights[t] > 0 else "")
        assert torch.equal(b.position_ids[bi], torch.from_numpy(s.position_ids))
        assert torch.equal(b.document_ids[bi], torch.from_numpy(s.document_ids))


def _cfg(prefix, **data):
    return Config.from_dict({"data": {"prefix_paths": [str(prefix)], "seq_len": S, "aligned_max_bytes": 48, **data},
                             "training": {"micro_batch_size": 2}})


def test_build_dataloader_resume_and_shards(corpus, tok):
    prefix, _ = corpus
    cfg = _cfg(prefix)
    full = build_dataloader(cfg, tok, 0, 1, 0, progress=False)
    ds = full.dataset
    whole = [b for _, b in zip(range(6), full)]
    assert all(b.shape == (2, S) for b in whole)
    order = ResumableSampler(len(ds), cfg.data.seed).global_order(0, 12)
    assert torch.equal(whole[0].position_ids, collate([ds[int(i)] for i in order[:2]]).position_ids)
    resumed = build_dataloader(cfg, tok, 0, 1, consumed_samples=6, progress=False)
    for a, b in zip(whole[3:], resumed):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target_offsets, b.target_offsets)
    r1 = build_dataloader(cfg, tok, 1, 2, 0, progress=False)
    b1 = next(iter(r1))
    assert torch.equal(b1.input_ids, collate([ds[int(order[1])], ds[int(order[3])]]).input_ids)
    assert build_dataloader(cfg, tok, split="valid", progress=False) is None


def test_build_dataset_errors_name_the_key(tmp_path, tok, instruct):
    with pytest.raises(FileNotFoundError, match=r"data.prefix_paths\[0\]"):
        build_dataset(_cfg(tmp_path / "missing"), tok)
    mm, _ = instruct
    ds = build_dataset(_cfg(mm.prefix, finetuning=True), tok)
    assert isinstance(ds, FinetuningDataset) and len(ds) == 3


def test_worker_processes_give_the_same_batches(corpus, tok):
    prefix, _ = corpus
    main = build_dataloader(_cfg(prefix), tok, 0, 1, 4, progress=False)
    workers = build_dataloader(_cfg(prefix, num_workers=1), tok, 0, 1, 4, progress=False)
    for a, b, _ in zip(main, workers, range(3)):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.target_bytes, b.target_bytes)
        assert a.target_units == b.target_units


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab Zé1.,!?-_'\"()<|>\n\t ")), max_size=40))
def test_unit_byte_counts_telescope_to_the_text_length(text):
    tok = TrigramTokenizer(vocab_size=64, vocab_population=2)
    enc = tok.encode(text)
    counts = unit_byte_counts(tok, enc.units, [None] + enc.units[:-1])
    assert (counts >= 0).all() and int(counts.sum()) == len(text.encode("utf-8"))
