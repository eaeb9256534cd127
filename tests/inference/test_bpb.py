"""Bits per byte: known cases with a stub model whose logits are fixed, for T-Free and classic, on
texts and on Batches, and the training-loop entry point."""

import math

import numpy as np
import pytest
import torch

from megatron_tfree.data.batch import Batch
from megatron_tfree.inference.bpb import bits_per_byte, evaluate_bits_per_byte
from megatron_tfree.tokenizer import ClassicTokenizer, TrigramTokenizer
from megatron_tfree.tokenizer.dictionary import DecodeDictionary
from megatron_tfree.tokenizer.words import SPECIAL_WORDS

V = 64


class FixedLogits(torch.nn.Module):
    """Every position outputs ``row``; records the batches it saw."""

    def __init__(self, row):
        super().__init__()
        self.register_buffer("row", torch.as_tensor(row, dtype=torch.float32))
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, batch, kv_cache=None):
        self.seen.append(batch)
        B, S = batch.shape
        return self.row.expand(B, S, -1).clone()


def formula_log_probs(tok, words, logits, e=1.0):
    """log softmax over ``words`` of the spec-4 scores, computed independently in float64."""
    p = [1 / (1 + math.exp(-x)) for x in logits.tolist()]
    total, m, v = sum(p), tok.vocab_population, tok.vocab_size
    scores = []
    for w in words:
        n, edge, c = tok.word_patterns(w)
        s = sum(p[i] for i in n) + e * sum(p[i] for i in edge)
        scores.append(s / (m * c) + (s - total) / (v - m * c))
    z = math.log(sum(math.exp(s) for s in scores))
    return {w: s - z for w, s in zip(words, scores)}


def test_tfree_text_known_case():
    tok = TrigramTokenizer(vocab_size=V, vocab_population=2)
    logits = torch.linspace(-3, 3, V)
    model = FixedLogits(logits)
    text = "ab cd"  # words ab, cd; targets ab, cd, <|endoftext|>; 5 bytes
    bpb, details = bits_per_byte(model, tok, text, scoring="score")
    words = list(SPECIAL_WORDS) + ["ab", "cd"]  # base = special words, the text's words join
    lp = formula_log_probs(tok, words, logits)
    want = -(lp["ab"] + lp["cd"] + lp["<|endoftext|>"]) / math.log(2) / 5
    assert bpb == pytest.approx(want, rel=1e-5)
    assert details["bytes"] == 5 and details["units"] == 3 and details["text_words_added"] == 2
    assert "own words" in details["note"]
    # the input: <|endoftext|> (document 0), then the words at positions 0.. of document 1
    seen = model.seen[-1]
    assert seen.position_ids.tolist() == [[0, 0, 1]] and seen.document_ids.tolist() == [[0, 1, 1]]


def test_tfree_text_edge_weight_and_base_dictionary():
    tok = TrigramTokenizer(vocab_size=V, vocab_population=2)
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0))
    base = DecodeDictionary.build(tok, {"xy": 3, "ab": 1})
    bpb, details = bits_per_byte(FixedLogits(logits), tok, ["ab", "ab ab"], dictionary=base, edge_weight=0.5,
                                 scoring="score")
    lp = formula_log_probs(tok, base.words, logits, e=0.5)
    bits = -(3 * lp["ab"] + 2 * lp["<|endoftext|>"]) / math.log(2)
    assert bpb == pytest.approx(bits / 7, rel=1e-5)
    assert details["text_words_added"] == 0 and details["dictionary_words"] == len(base)


def test_unicode_bytes_counted():
    tok = TrigramTokenizer(vocab_size=V, vocab_population=2)
    _, details = bits_per_byte(FixedLogits(torch.zeros(V)), tok, "Straße  über\n\nx")
    assert details["bytes"] == len("Straße  über\n\nx".encode("utf-8"))


@pytest.fixture(scope="module")
def classic():
    return ClassicTokenizer.train(["hello world, hello there."] * 10, vocab_size=270, min_frequency=1)


def test_classic_text_known_case(classic):
    Vc = classic.vocab_size
    _, details = bits_per_byte(FixedLogits(torch.zeros(Vc)), classic, "hello world")
    n_tokens = len(classic.encode("hello world").units)
    # uniform logits: every target (tokens + end of text) costs log2(V) bits
    assert details["bits"] == pytest.approx((n_tokens + 1) * math.log2(Vc))
    assert details["bytes"] == 11
    row = torch.zeros(Vc)
    eot = classic.hf_tokenizer.token_to_id("<|endoftext|>")
    row[eot] = 2.0
    bpb, _ = bits_per_byte(FixedLogits(row), classic, "hello world")
    z = math.log(Vc - 1 + math.exp(2.0))
    assert bpb == pytest.approx((n_tokens * z + (z - 2.0)) / math.log(2) / 11)


def make_batch(tok, rows_units, weights, target_bytes):
    """Batch whose targets are ``rows_units`` (inputs are irrelevant to the stub)."""
    flat = [u for row in rows_units for u in row]
    ids = tok.encode_units(flat)
    B, S = len(rows_units), len(rows_units[0])
    off = torch.from_numpy(ids.offsets.astype(np.int64))
    idx = torch.from_numpy(ids.indices.astype(np.int64))
    return Batch(off, idx, off.clone(), idx.clone(), torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long),
                 torch.as_tensor(weights, dtype=torch.float32), torch.as_tensor(target_bytes), rows_units)


def test_batches_use_target_bytes_and_weights():
    tok = TrigramTokenizer(vocab_size=V, vocab_population=2)
    logits = torch.linspace(2, -2, V)
    units = [["ab", "cd", "<|endoftext|>"], ["cd", "ab", "ab"]]
    batch = make_batch(tok, units, [[1, 1, 1], [1, 0, 1]], [[2, 3, 0], [2, 3, 3]])
    model = FixedLogits(logits)
    base = DecodeDictionary.build(tok, {"ab": 2})
    bpb, details = bits_per_byte(model, tok, [batch], dictionary=base, scoring="score")
    lp = formula_log_probs(tok, base.words + ["cd"], logits)
    bits = -(2 * lp["ab"] + 2 * lp["cd"] + lp["<|endoftext|>"]) / math.log(2)  # weight-0 "ab" skipped
    assert details["bytes"] == 2 + 3 + 0 + 2 + 3 and details["units"] == 5
    assert bpb == pytest.approx(bits / 10, rel=1e-5)
    model.train()
    bpb_likelihood, _ = bits_per_byte(model, tok, [batch], dictionary=base)  # the default scoring
    assert evaluate_bits_per_byte(model, tok, iter([batch]), word_counts={"ab": 2}) == pytest.approx(bpb_likelihood, rel=1e-6)
    assert model.training  # mode restored


def test_batch_errors():
    tok = TrigramTokenizer(vocab_size=V, vocab_population=2)
    batch = make_batch(tok, [["ab"]], [[1]], [[2]])
    batch.target_units = None
    with pytest.raises(ValueError, match="target_units"):
        bits_per_byte(FixedLogits(torch.zeros(V)), tok, batch)
    batch = make_batch(tok, [["ab"]], [[1]], [[2]])
    batch.target_bytes = None
    with pytest.raises(ValueError, match="target_bytes"):
        bits_per_byte(FixedLogits(torch.zeros(V)), tok, batch)


def test_make_bits_fn_matches_bits_per_byte():
    """The training loop's estimator (model, batch, logits) -> (bits, bytes) agrees with bits_per_byte."""
    from megatron_tfree.inference.bpb import make_bits_fn

    tok = TrigramTokenizer(vocab_size=V, vocab_population=2)
    batch = make_batch(tok, [["ab", "cd", "<|endoftext|>"]], [[1, 1, 1]], [[2, 3, 0]])
    model = FixedLogits(torch.linspace(-1, 1, V))
    _, details = bits_per_byte(model, tok, batch, dictionary=DecodeDictionary.build(tok, {"xy": 4}))
    bits, nbytes = make_bits_fn(tok, word_counts={"xy": 4})(model, batch, model(batch))
    assert bits == pytest.approx(details["bits"], rel=1e-6) and nbytes == 5.0


def likelihood_log_probs(tok, words, logits, pos_weight=1.0):
    """log p(word) restricted to ``words``: the normalised geometric mean of sigmoid(l - log pw) over
    each word's distinct ids, computed independently in float64."""
    l = [x - math.log(pos_weight) for x in logits.tolist()]
    logp = {}
    for w in words:
        ids = set(tok.word_ids(w))
        logp[w] = sum(-math.log1p(math.exp(-l[i])) for i in ids) / len(ids)
    z = math.log(sum(math.exp(x) for x in logp.values()))
    return {w: x - z for w, x in logp.items()}


@pytest.mark.parametrize("pos_weight", [1.0, 30.0])
def test_tfree_likelihood_known_case(pos_weight):
    tok = TrigramTokenizer(vocab_size=V, vocab_population=2)
    logits = torch.linspace(-3, 3, V)
    model = FixedLogits(logits)
    model.output = torch.nn.Module()  # the loss' pos_weight lives on the head, as in GPTModel
    model.output.head = torch.nn.Module()
    model.output.head.pos_weight = pos_weight
    bpb, details = bits_per_byte(model, tok, "ab cd")  # likelihood is the default
    lp = likelihood_log_probs(tok, list(SPECIAL_WORDS) + ["ab", "cd"], logits, pos_weight)
    want = -(lp["ab"] + lp["cd"] + lp["<|endoftext|>"]) / math.log(2) / 5
    assert bpb == pytest.approx(want, rel=1e-5)
    assert details["scoring"] == "likelihood"
    with pytest.raises(ValueError, match="scoring"):
        bits_per_byte(model, tok, "ab", scoring="nope")


def test_likelihood_tracks_the_right_word_but_spec_scores_stay_flat():
    """A head that puts high logits exactly on one word's ids: the likelihood gives that word almost
    all the mass; the spec-score softmax stays near uniform (why bits per byte uses the likelihood)."""
    tok = TrigramTokenizer(vocab_size=4096, vocab_population=4)
    words = ["hello", "world"]
    d = DecodeDictionary.build(tok, {w: 1 for w in words})
    # calibration: the head says "hello" with 0.7, "world" with 0.3 (their ids get those probabilities)
    p = torch.full((1, 4096), 1e-6)
    p[0, tok.word_ids("hello")] = 0.7
    p[0, tok.word_ids("world")] = 0.3
    assert not set(tok.word_ids("hello")) & set(tok.word_ids("world"))  # the disjoint case
    lp = d.likelihood_log_probs(torch.log(p / (1 - p)))[0].exp()
    assert float(lp[d.index_of("hello")]) / float(lp[d.index_of("world")]) == pytest.approx(0.7 / 0.3, rel=1e-4)
    tok = TrigramTokenizer(vocab_size=512, vocab_population=4)
    words = list(SPECIAL_WORDS) + ["hello", "world", "again", "other", "thing"]
    d = DecodeDictionary.build(tok, {w: 1 for w in words})
    logits = torch.full((1, 512), -8.0)
    logits[0, tok.word_ids("world")] = 8.0
    i = d.index_of("world")
    assert float(d.likelihood_log_probs(logits)[0, i].exp()) > 0.99
    assert float(d.log_probs(logits)[0, i].exp()) < 0.3
