"""DecodeDictionary: patterns, the spec-4 score formula on a hand-computed example, reduce_to,
add_words isolation, save/load and the word-count readers."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

from megatron_tfree.tokenizer import TrigramTokenizer
from megatron_tfree.tokenizer.dictionary import DecodeDictionary, read_word_counts, write_word_counts
from megatron_tfree.tokenizer.words import SPECIAL_WORDS


def tok(**kw):
    base = dict(vocab_size=512, vocab_population=4)
    base.update(kw)
    return TrigramTokenizer(**base)


def logit(p):
    return math.log(p / (1 - p))


P = [0.9, 0.8, 0.1, 0.1, 0.2, 0.5, 0.5, 0.5]  # sum = 3.6


def hand_dictionary():
    # v = 8, m = 2. A: N={0}, Edge={1}, c=1 (m c = 2). B: N={}, Edge={2,3,4}, c=2 (m c = 4).
    return DecodeDictionary.from_patterns([("A", [0], [1], 1, 5), ("B", [], [2, 3, 4], 2, 3)], vocab_size=8,
                                          vocab_population=2)


def test_score_hand_computed():
    d = hand_dictionary()
    logits = torch.tensor([[logit(p) for p in P]])
    # e = 1: S_A = 0.9 + 0.8 = 1.7 -> 1.7/2 + (1.7 - 3.6)/6 = 0.85 - 0.3166..  = 0.53333..
    #        S_B = 0.1 + 0.1 + 0.2 = 0.4 -> 0.4/4 + (0.4 - 3.6)/4 = 0.1 - 0.8 = -0.7
    assert d.score(logits).tolist()[0] == pytest.approx([0.85 - 1.9 / 6, -0.7], abs=1e-6)
    # e = 0.5: S_A = 0.9 + 0.4 = 1.3 -> 0.65 + (1.3 - 3.6)/6;  S_B = 0.2 -> 0.05 + (0.2 - 3.6)/4 = -0.8
    assert d.score(logits, edge_weight=0.5).tolist()[0] == pytest.approx([0.65 - 2.3 / 6, -0.8], abs=1e-6)
    lp = d.log_probs(logits)[0]
    a, b = 0.85 - 1.9 / 6, -0.7
    assert lp.tolist() == pytest.approx([a - math.log(math.exp(a) + math.exp(b)), b - math.log(math.exp(a) + math.exp(b))],
                                        abs=1e-6)


def test_denominator_clamped_when_word_fills_vocab():
    d = DecodeDictionary.from_patterns([("X", [0, 1], [2, 3], 2, 0)], vocab_size=4, vocab_population=2)
    s = d.score(torch.zeros(1, 4))  # p = 0.5 everywhere, S = 2, sum = 2, v - m c = 0 -> clamped to 1
    assert s.tolist() == [[pytest.approx(0.5)]]


@pytest.mark.parametrize("kw", [dict(), dict(vocab_population_partial_lowercase=2, lowercase=True),
                                dict(initialize="fast", entire_words=True)])
def test_patterns_match_tokenizer_and_brute_force_scores(kw):
    t = tok(**kw)
    words = ["Hello", "World", "!", "a", "aaaa", "The", "über", "x y", "Straße"]
    d = DecodeDictionary.build(t, {w: i for i, w in enumerate(words)})
    for w in words + list(SPECIAL_WORDS):
        n, e, c = d.patterns(w)
        n2, e2, c2 = t.word_patterns(w)
        assert np.array_equal(np.sort(n), n2) and np.array_equal(np.sort(e), e2) and c == c2, w
    logits = torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    p = torch.sigmoid(logits).double()
    got = d.score(logits, edge_weight=0.7)
    for j, w in enumerate(d.words):
        n, e, c = t.word_patterns(w)
        s = p[:, torch.as_tensor(n, dtype=torch.long)].sum(1) + 0.7 * p[:, torch.as_tensor(e, dtype=torch.long)].sum(1)
        mc = 4 * c
        want = s / mc + (s - p.sum(1)) / (512 - mc)
        assert torch.allclose(got[:, j].double(), want, atol=1e-5), w


def test_build_sorted_by_count_and_specials_always_present():
    d = DecodeDictionary.build(tok(), {"rare": 1, "common": 10, "mid": 5})
    assert d.words[:3] == ["common", "mid", "rare"]
    assert all(w in d for w in SPECIAL_WORDS)
    assert "<|endoftext|>" in d


def test_reduce_to_keeps_special_words():
    counts = {f"w{i}": 100 - i for i in range(50)}
    counts["<|ws|>"] = 0
    d = DecodeDictionary.build(tok(), counts)
    r = d.reduce_to(3)
    assert [w for w in r.words if "<|" not in w] == ["w0", "w1", "w2"]
    assert set(SPECIAL_WORDS) <= set(r.words)
    assert len(r) == 3 + len(SPECIAL_WORDS)
    for w in ("w1", "<|no_ws|>"):  # patterns survive the gather
        assert all(np.array_equal(a, b) for a, b in zip(r.patterns(w)[:2], d.patterns(w)[:2]))
    assert len(d.reduce_to(0)) == len(SPECIAL_WORDS)
    with pytest.raises(ValueError):
        d.reduce_to(-1)


def test_add_words_does_not_leak():
    t = tok()
    base = DecodeDictionary.build(t, {"alpha": 3})
    n = len(base)
    ext = base.add_words(["beta", "alpha", "gamma"])
    assert len(ext) == n + 2 and "beta" in ext and "gamma" in ext
    assert len(base) == n and "beta" not in base and base.words == [w for w in ext.words if w not in ("beta", "gamma")]
    other = base.add_words(["delta"])
    assert "beta" not in other and "delta" in other and "delta" not in ext
    logits = torch.randn(1, 512)
    assert torch.equal(ext.score(logits)[:, :n], base.score(logits))
    assert base.add_words(["alpha"]) is base


def test_save_load_round_trip(tmp_path):
    t = tok()
    d = DecodeDictionary.build(t, {"Hello": 4, "World": 2}).add_words(["line\nbreak"])
    tp, jp = d.save(tmp_path / "dd.safetensors")
    assert tp.name == "dd.safetensors" and jp.name == "dd.json"
    e = DecodeDictionary.load(tmp_path / "dd", tokenizer=t)
    assert e.words == d.words and e.counts.tolist() == d.counts.tolist()
    logits = torch.randn(2, 512)
    assert torch.allclose(e.score(logits, 0.5), d.score(logits, 0.5))
    assert "x" in e.add_words(["x"])  # the attached tokenizer is used
    with pytest.raises(ValueError, match="does not match"):
        DecodeDictionary.load(tmp_path / "dd", tokenizer=tok(vocab_size=256))
    meta = json.loads(jp.read_text())
    del meta["words"]
    jp.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dd.json: missing key 'words'"):
        DecodeDictionary.load(tmp_path / "dd")


def test_word_counts_json_and_tsv(tmp_path):
    counts = {"Hello": 3, "<|\n|>": 2, "a\tb": 1, "\\": 7}
    for name in ("c.json", "c.tsv"):
        write_word_counts(tmp_path / name, counts)
        assert read_word_counts(tmp_path / name) == counts


def test_word_counts_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_text("Hello\t3\nWorld three\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected 'word<TAB>count'"):
        read_word_counts(p)
    p.write_text("Hello\t3\n\nWorld\tx\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3: count 'x' is not an integer"):
        read_word_counts(p)
    p.write_text("Hello\t-3\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: count must be a non-negative integer"):
        read_word_counts(p)
    j = tmp_path / "bad.json"
    j.write_text('{"Hello": 3,\n "World": }')
    with pytest.raises(ValueError, match=r"bad.json:2: not valid JSON"):
        read_word_counts(j)
    j.write_text('{"Hello": 3, "World": "many"}')
    with pytest.raises(ValueError, match=r"bad.json: key 'World': count must be"):
        read_word_counts(j)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_word_counts(tmp_path / "missing.tsv")


def test_pickle_refused_without_flag(tmp_path):
    p = tmp_path / "counts.pkl"
    p.write_bytes(pickle.dumps({"Hello": 2}))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        read_word_counts(p)
    assert read_word_counts(p, allow_pickle=True) == {"Hello": 2}
