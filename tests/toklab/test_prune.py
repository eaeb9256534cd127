"""toklab prune: leaf pruning of the merge tree on hand-made cases; specials and bytes kept; the round trip;
the checkpoint remap keeps the kept tokens' rows and trains with training.init_from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_tfree.checkpoint.names import EMBEDDING, HEAD
from megatron_tfree.toklab.count import count_tokens
from megatron_tfree.toklab.prune import evaluate, prune_bpe, remap_checkpoint
from megatron_tfree.toklab.sources import parse_corpus
from megatron_tfree.toklab.specs import BpeSpec

from toklab_helpers import byte_level_bpe, rows_of


def _hand_made():
    # ids: 0..255 bytes, 256 "ab", 257 "abc" (= ab + c), 258 "cd", 259 <|endoftext|>
    tok = byte_level_bpe([("a", "b"), ("ab", "c"), ("c", "d")])
    counts = np.zeros(260, dtype=np.int64)
    counts[[256, 257, 258]] = [5, 10, 1]
    counts[ord("x")] = 4
    return json.loads(tok.to_str()), counts


def test_leaves_go_first_least_frequent_first():
    config, counts = _hand_made()
    # one token to drop: of the leaves "abc" (10) and "cd" (1), "cd" goes
    p = prune_bpe(config, counts, 259)
    assert list(p.old_ids) == [*range(258), 259] and p.protected == 257
    # two to drop: then "abc" is the only leaf left ("ab" is made into "abc"), so it goes although it is the most
    # frequent: "abc" cannot be kept without "ab"
    p = prune_bpe(config, counts, 258)
    assert list(p.old_ids) == [*range(257), 259]
    vocab = p.tokenizer_json["model"]["vocab"]
    assert vocab["ab"] == 256 and "abc" not in vocab and "cd" not in vocab
    assert [a["id"] for a in p.tokenizer_json["added_tokens"]] == [257]
    assert p.tokenizer_json["model"]["merges"] in ([["a", "b"]], ["a b"])
    tok = p.hf_tokenizer()
    assert tok.encode("abcd").tokens == ["ab", "c", "d"] and tok.decode(tok.encode("abcd xé").ids) == "abcd xé"
    assert tok.token_to_id("<|endoftext|>") == 257


def test_the_always_kept_tokens_bound_the_size():
    config, counts = _hand_made()
    p = prune_bpe(config, counts, 257)  # bytes + the special token only
    assert list(p.old_ids) == [*range(256), 259] and p.tokenizer_json["model"]["merges"] == []
    with pytest.raises(ValueError, match="--size 256 is below the 257 tokens that are always kept"):
        prune_bpe(config, counts, 256)
    with pytest.raises(ValueError, match="the counts cover 10 ids, the tokenizer has 260"):
        prune_bpe(config, counts[:10], 258)


def test_pruning_a_trained_tokenizer_stays_valid(probe_bpe, tmp_path):
    spec = BpeSpec(probe_bpe)
    counts = count_tokens(probe_bpe, ["multilingual"], tmp_path / "c.json", progress=False).counts
    p = prune_bpe(spec.config, counts, 420)
    assert p.size == 420
    vocab = p.tokenizer_json["model"]["vocab"]
    kept = set(vocab)
    for m in p.tokenizer_json["model"]["merges"]:  # closed under the merges
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        assert a in kept and b in kept and a + b in kept
    old = spec.tokenizer.get_vocab(with_added_tokens=True)
    assert sorted(vocab.values()) == list(range(420))
    assert all(old[t] == p.old_ids[i] for t, i in vocab.items())  # kept tokens in their old order
    assert "<|endoftext|>" in kept
    texts = [d for s in parse_corpus("multilingual") for d in s.documents()]
    report = evaluate(spec, p, counts, texts)  # also checks the round trip
    assert report.documents == 7 and report.size == 420 and report.old_size == 600
    assert report.coverage == pytest.approx(counts[p.old_ids].sum() / counts.sum())
    assert 1.0 < report.nsl < 1.5  # fewer tokens: longer sequences


def test_remap_keeps_the_kept_rows_and_trains_with_init_from(probe_bpe, probe_checkpoint, tmp_path, cfg_factory):
    spec = BpeSpec(probe_bpe)
    counts = count_tokens(probe_bpe, ["multilingual"], tmp_path / "c.json", progress=False).counts
    p = prune_bpe(spec.config, counts, 400)
    out = remap_checkpoint(probe_checkpoint, p, tmp_path / "pruned", original_vocab=spec.tokenizer.get_vocab(True))
    old, new = rows_of(probe_checkpoint), rows_of(out)
    for name in (EMBEDDING, HEAD):
        assert new[name].shape == (400, 32) and torch.equal(new[name], old[name][torch.as_tensor(p.old_ids)])
    assert all(torch.equal(new[n], old[n]) for n in old if n not in (EMBEDDING, HEAD))
    with pytest.raises(ValueError, match="not the one that was pruned"):
        remap_checkpoint(probe_checkpoint, p, tmp_path / "x", original_vocab={"a": 0})
    assert not (tmp_path / "x").exists()

    from distributed import train_rank

    from toklab_helpers import MODEL

    cfg = cfg_factory(tmp_path, "ft", model=MODEL, tokenizer={"kind": "classic"},
                      training={"init_from": str(out), "train_iterations": 1, "micro_batch_size": 1,
                                "global_batch_size": 1, "eval_iterations": 0})
    train_rank(0, 1, cfg)
    from megatron_tfree.checkpoint import CheckpointReader

    trained = CheckpointReader(cfg.training.save_dir)
    assert trained.tokenizer.vocab_size == 400
    assert trained.tokenizer.hf_tokenizer.get_vocab(True) == p.hf_tokenizer().get_vocab(True)
