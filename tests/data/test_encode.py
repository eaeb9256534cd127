"""encode_texts: a batch of texts -> CSR inputs, next-unit targets, weights, positions, bytes."""

import numpy as np
import pytest
import torch

from megatron_tfree.data.encode import encode_texts
from megatron_tfree.model import GPTModel
from megatron_tfree.config import ModelConfig
from megatron_tfree.tokenizer import ClassicTokenizer, TrigramTokenizer

EOT = "<|endoftext|>"


def rows(offsets, ids):
    o = offsets.tolist()
    return [sorted(set(ids[o[i]:o[i + 1]].tolist())) for i in range(len(o) - 1)]


def test_layout_targets_and_padding():
    tok = TrigramTokenizer(vocab_size=1024, vocab_population=4)
    texts = ["Hello World!", "A,B and more words here"]
    b = encode_texts(tok, texts)
    longest = len(tok.encode(texts[1]))
    B, S = b.shape
    assert (B, S) == (2, longest + 1)
    words0 = tok.encode(texts[0]).units  # [Hello, World, !]
    inputs = rows(b.input_offsets, b.input_ids)
    targets = rows(b.target_offsets, b.target_ids)
    # row 0: inputs <eot> Hello World ! <eot> <pad...>; targets Hello World ! <eot> <pad...>
    assert inputs[0] == tok.word_ids(EOT) and inputs[1] == tok.word_ids("Hello")
    assert [targets[i] for i in range(4)] == [tok.word_ids(w) for w in words0 + [EOT]]
    assert b.loss_weights[0].tolist() == [1.0] * 4 + [0.0] * (S - 4)
    assert b.loss_weights[1].tolist() == [1.0] * S
    # positions restart after the leading end of text; document ids separate it
    assert b.position_ids[0, :4].tolist() == [0, 0, 1, 2] and b.document_ids[0, :4].tolist() == [0, 1, 1, 1]
    # exact bytes: the targets of each row sum to the text's UTF-8 length
    for i, t in enumerate(texts):
        assert int(b.target_bytes[i].sum()) == len(t.encode("utf-8"))
    assert b.target_units[0][:4] == words0 + [EOT] and b.target_units[0][4] == ""


def test_truncation_weights_and_errors():
    tok = TrigramTokenizer(vocab_size=1024, vocab_population=4)
    b = encode_texts(tok, ["one two three four five six"], seq_len=3, loss_weights=[0.5])
    assert b.shape == (1, 3) and b.loss_weights.tolist() == [[0.5, 0.5, 0.5]]
    assert rows(b.target_offsets, b.target_ids)[2] == tok.word_ids("three")
    with pytest.raises(ValueError, match="non-empty sequence"):
        encode_texts(tok, "a string")
    with pytest.raises(ValueError, match="loss_weights has 2 entries for 1 texts"):
        encode_texts(tok, ["x"], loss_weights=[1, 2])


def test_classic_one_id_per_position_and_model_runs():
    tok = ClassicTokenizer.train(["hello world, hello there. " * 20], vocab_size=300, min_frequency=1)
    b = encode_texts(tok, ["hello world", "hello there again"])
    B, S = b.shape
    assert b.input_ids.numel() == B * S and b.target_ids.numel() == B * S
    assert torch.equal(b.input_ids.view(B, S)[:, 1:], b.target_ids.view(B, S)[:, :-1])  # shifted by one
    model = GPTModel(ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2), "classic", tok.vocab_size, seed=0)
    assert np.isfinite(float(model.loss(b)))
