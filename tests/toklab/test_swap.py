"""toklab swap: FVT copies and means by hand, the random ablation, and classic -> T-Free least squares (the fit
beats the random init; blocks copied; the result starts a T-Free run)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from megatron_tfree.checkpoint import CheckpointReader
from megatron_tfree.checkpoint.names import EMBEDDING, HEAD
from megatron_tfree.tokenizer import TrigramTokenizer
from megatron_tfree.tokenizer.classic import ClassicTokenizer
from megatron_tfree.toklab.rewrite import write_checkpoint
from megatron_tfree.toklab.sources import parse_corpus
from megatron_tfree.toklab.swap import classic_spelling, fvt_rows, tfree_rows

from toklab_helpers import byte_level_bpe, make_checkpoint, rows_of


@pytest.fixture(scope="module")
def hand_checkpoint(tmp_path_factory):
    # old: bytes, 256 "th" (t+h), 257 "Ġt" (Ġ+t), 258 <|endoftext|>
    old = ClassicTokenizer(byte_level_bpe([("t", "h"), ("Ġ", "t")]))
    return make_checkpoint(tmp_path_factory.mktemp("swap") / "old", old)


def test_fvt_copies_known_tokens_and_averages_the_pieces_of_new_ones(hand_checkpoint):
    # new: bytes, 256 "th", 257 "the" (th+e), 258 "Ġthe" (Ġ+the), 259 <|endoftext|>, 260 <|pad|>
    new = byte_level_bpe([("t", "h"), ("th", "e"), ("Ġ", "the")], specials=("<|endoftext|>", "<|pad|>"))
    reader = CheckpointReader(hand_checkpoint)
    old = rows_of(hand_checkpoint)
    rows, stats = fvt_rows(reader, new)
    for name in (EMBEDDING, HEAD):
        r, o = rows[name], old[name]
        assert r.shape == (261, 32)
        assert torch.equal(r[:257], o[:257])  # bytes and "th": same strings, same rows
        assert torch.equal(r[259], o[258])  # <|endoftext|> moved from 258 to 259, its row with it
        assert torch.allclose(r[257], (o[256] + o[ord("e")]) / 2)  # "the" = "th" + "e" in the old tokenizer
        # "Ġthe": the old merges apply by rank, "th" before "Ġt": Ġ (the space byte) + "th" + "e"
        assert torch.allclose(r[258], (o[ord(" ")] + o[256] + o[ord("e")]) / 3)
        assert torch.equal(r[260], o[[ord(c) for c in "<|pad|>"]].mean(0))  # a new special: its text's pieces
    assert stats.to_dict() == {"copied": 258, "averaged": 3, "random": 0}


def test_the_random_ablation_copies_known_tokens_only(hand_checkpoint):
    new = byte_level_bpe([("t", "h"), ("th", "e")])
    old = rows_of(hand_checkpoint)
    rows, stats = fvt_rows(CheckpointReader(hand_checkpoint), new, method="random", seed=3)
    assert stats.to_dict() == {"copied": 258, "averaged": 0, "random": 1}
    assert torch.equal(rows[EMBEDDING][:257], old[EMBEDDING][:257])
    assert not torch.allclose(rows[EMBEDDING][257], (old[EMBEDDING][256] + old[EMBEDDING][ord("e")]) / 2)
    again, _ = fvt_rows(CheckpointReader(hand_checkpoint), new, method="random", seed=3)
    assert torch.equal(again[EMBEDDING], rows[EMBEDDING])  # seeded
    with pytest.raises(ValueError, match="method must be 'fvt' or 'random'"):
        fvt_rows(CheckpointReader(hand_checkpoint), new, method="mean")


def test_fvt_checkpoint_is_the_old_model_with_new_rows(hand_checkpoint, tmp_path):
    new = ClassicTokenizer(byte_level_bpe([("t", "h"), ("th", "e")]))
    reader = CheckpointReader(hand_checkpoint)
    rows, _ = fvt_rows(reader, new.hf_tokenizer)
    out = write_checkpoint(reader, tmp_path / "fvt", new, rows, {"toklab": "swap"})
    got, old = rows_of(out), rows_of(hand_checkpoint)
    assert torch.equal(got[EMBEDDING], rows[EMBEDDING]) and torch.equal(got[HEAD], rows[HEAD])
    assert all(torch.equal(got[n], old[n]) for n in old if n not in (EMBEDDING, HEAD))
    assert CheckpointReader(out).tokenizer.vocab_size == 259


def test_classic_spelling_of_tfree_words():
    tf = TrigramTokenizer(vocab_size=256, vocab_population=2)
    assert [classic_spelling(tf, w) for w in ["Hello", "42", ",", "<|ws|>", "<|\n|>", "<|no_ws|>"]] == \
        [" Hello", " 42", ",", " ", "\n", ""]


@pytest.fixture(scope="module")
def structured_checkpoint(probe_checkpoint, tmp_path_factory):
    """The probe model with embedding and head rows that follow the spelling (the mean of per-byte vectors),
    as a trained model's roughly do: what a fit over some words can carry over to held-out words."""
    reader = CheckpointReader(probe_checkpoint)
    gen = torch.Generator().manual_seed(0)
    per_byte = {name: torch.randn(256, 32, generator=gen) * 0.05 for name in (EMBEDDING, HEAD)}
    spec = reader.tokenizer.hf_tokenizer
    from megatron_tfree.toklab.specs import byte_symbols

    inverse = {c: b for b, c in byte_symbols().items()}
    vocab = sorted(spec.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    spelled = [[inverse[c] for c in t] if all(c in inverse for c in t) else [0] for t, _ in vocab]
    rows = {name: torch.stack([v[b].mean(0) for b in spelled]) for name, v in per_byte.items()}
    return write_checkpoint(reader, tmp_path_factory.mktemp("swap") / "structured", reader.tokenizer, rows, {})


def test_classic_to_tfree_fit_beats_the_random_init(structured_checkpoint, tmp_path, cfg_factory):
    probe_checkpoint = structured_checkpoint
    reader = CheckpointReader(probe_checkpoint)
    tf = TrigramTokenizer(vocab_size=1024, vocab_population=4)
    texts = [d for s in parse_corpus("multilingual") for d in s.documents()]
    rows, fit, counts = tfree_rows(reader, tf, texts, words=400, heldout=0.1)
    assert rows[EMBEDDING].shape == rows[HEAD].shape == (1024, 32)
    assert fit.words + fit.heldout_words == 400 and fit.heldout_words == 40
    for name in (EMBEDDING, HEAD):
        assert fit.residual[name] < 0.5 * fit.residual_init[name]
        assert fit.heldout_residual[name] < fit.heldout_residual_init[name]
    assert counts == Counter(u for t in texts for u in tf.encode(t).units)
    # the embedding bag of a fitted frequent word is close to the classic mean embedding of its tokens
    old = rows_of(probe_checkpoint)
    word = next(w for w, _ in counts.most_common() if w.isalpha())
    bag = rows[EMBEDDING][torch.as_tensor(tf.encode_units([word]).indices, dtype=torch.long)].sum(0)
    target = old[EMBEDDING][torch.as_tensor(reader.tokenizer.encode_ids(" " + word), dtype=torch.long)].mean(0)
    assert torch.nn.functional.cosine_similarity(bag, target, dim=0) > 0.8

    out = write_checkpoint(reader, tmp_path / "tfree", tf, rows, {"toklab": "swap"})
    got = rows_of(out)
    assert all(torch.equal(got[n], old[n]) for n in old if n not in (EMBEDDING, HEAD))  # blocks copied
    from megatron_tfree.training import init_from

    from toklab_helpers import MODEL

    cfg = cfg_factory(tmp_path, "tf", model=MODEL, tokenizer={"kind": "tfree", "vocab_size": 1024,
                                                              "vocab_population": 4},
                      training={"init_from": str(out)})
    assert init_from.open_source(cfg).kind == "tfree"


def test_a_tfree_source_is_refused(tmp_path):
    tf = TrigramTokenizer(vocab_size=256, vocab_population=2)
    reader = CheckpointReader(make_checkpoint(tmp_path / "tf", tf))
    with pytest.raises(ValueError, match="the source must be a classic model, this is a tfree model"):
        tfree_rows(reader, tf, ["a b c"])
    with pytest.raises(ValueError, match="FVT transfers a classic model's rows"):
        fvt_rows(reader, byte_level_bpe([]))
