"""Soft tokenizer: byte encoding by hand; the soft tokenizer learns a toy table whose rows are a function of
the token's bytes (held-out tokens retrieved well above chance) but not a table of random rows; every
loss alone and combined trains; retrieval accuracy is plain dot-product argmax; save/load round trip;
a tiny classic checkpoint end to end with bits per byte; T-Free checkpoints are refused."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from megatron_tfree.toklab.soft import (BOS, EOS, PAD, SoftConfig, encode_bytes, load, retrieval_accuracy, save,
                                        soft_from_checkpoint, train_soft)
from megatron_tfree.toklab.specs import vocab_bytes

FAST = dict(hidden=32, layers=1, heads=4, batch_size=128, lr=3e-3, warmup=20, holdout=0.2, log_every=20)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy():
    """256 distinct tokens of 1-3 bytes over 'abcdefgh'; row = sum over positions of a random vector per
    (position, byte), times 0.05 (a small scale, as real tables): a held-out token's row is predictable
    from the (position, byte) pairs seen in training."""
    g = torch.Generator().manual_seed(0)
    every = [bytes(p) for n in (1, 2, 3) for p in itertools.product(b"abcdefgh", repeat=n)]
    tokens = [every[i] for i in torch.randperm(len(every), generator=g)[:256].tolist()]
    parts = torch.randn(3, 256, 32, generator=g)
    table = torch.stack([sum(parts[i, b] for i, b in enumerate(t)) for t in tokens]) * 0.05
    return tokens, table


@pytest.fixture(scope="module")
def learned(toy):
    tokens, table = toy
    return train_soft(tokens, table, SoftConfig(**FAST, steps=300, losses=("mse", "retrieval")))


def test_encode_bytes_by_hand():
    ids, mask = encode_bytes([b"a", b"abc", b""])
    assert ids.tolist() == [[BOS, 97, EOS, PAD, PAD], [BOS, 97, 98, 99, EOS], [BOS, EOS, PAD, PAD, PAD]]
    assert mask.tolist() == [[False, False, False, True, True], [False] * 5, [False, False, True, True, True]]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    ids, mask = encode_bytes(["é".encode(), b"\x00"], max_len=6)
    assert ids.tolist() == [[BOS, 0xC3, 0xA9, EOS, PAD, PAD], [BOS, 0, EOS, PAD, PAD, PAD]]
    assert mask.sum().item() == 5
    with pytest.raises(ValueError, match=r"b'abc'.*max_len=4"):
        encode_bytes([b"ab", b"abc"], max_len=4)


def test_retrieval_accuracy_by_hand():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    pred = torch.tensor([[1.0, 0.2], [0.1, 1.0], [-1.0, 0.0]])  # dots: row 0 -> id 0, row 1 -> id 1, row 2 -> id 2
    assert retrieval_accuracy(pred, table, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    assert retrieval_accuracy(pred, table, torch.tensor([0, 1, 2])) == 1.0
    # plain dot product, not cosine: the long row [3, 3] wins for [1, 0.1] although [1, 0] points the same way
    assert retrieval_accuracy(torch.tensor([[1.0, 0.1]]), torch.tensor([[1.0, 0.0], [3.0, 3.0]]),
                              torch.tensor([1])) == 1.0
    assert math.isnan(retrieval_accuracy(pred[:0], table, torch.tensor([], dtype=torch.long)))


def test_the_soft_tokenizer_learns_a_toy_table(toy, learned):
    tokens, table = toy
    V = len(tokens)
    assert len(learned.heldout_ids) == round(0.2 * V) and len(learned.train_ids) == V - len(learned.heldout_ids)
    assert set(learned.train_ids.tolist()).isdisjoint(learned.heldout_ids.tolist())
    assert learned.train_accuracy > 0.85
    assert learned.heldout_accuracy > 0.6  # chance is 1/256
    pred = learned.predict(tokens)
    assert pred.shape == table.shape
    assert float(((pred - table) ** 2).mean() / table.var()) < 0.5  # in the table's scale, not the scaled one
    held = learned.heldout_ids
    assert retrieval_accuracy(pred[held], table, held) == learned.heldout_accuracy
    summary = learned.to_dict()
    assert summary["heldout_accuracy"] == learned.heldout_accuracy and summary["chance_accuracy"] == 1 / V
    json.dumps(summary)

    # control: rows unrelated to the bytes can be memorised, but held-out tokens stay near chance
    noise = torch.randn(V, 32, generator=torch.Generator().manual_seed(1))
    control = train_soft(tokens, noise, SoftConfig(**FAST, steps=150))
    assert control.heldout_accuracy < 0.05


@pytest.mark.parametrize("losses,weights", [(("mse",), None), (("l1",), None), (("retrieval",), None),
                                            (("mse", "l1", "retrieval"), (1.0, 0.5, 2.0))],
                         ids=["mse", "l1", "retrieval", "combined"])
def test_each_loss_alone_and_combined_trains(toy, losses, weights):
    tokens, table = toy
    cfg = SoftConfig(**{**FAST, "log_every": 10}, steps=60, losses=losses, weights=weights)
    result = train_soft(tokens, table, cfg)
    first, last = result.history[0], result.history[-1]
    assert [h["step"] for h in result.history] == [1, 10, 20, 30, 40, 50, 60]
    assert set(first) == {"step", "loss", "lr", *losses}
    assert last["loss"] < 0.7 * first["loss"]
    for name in losses:
        assert last[name] < first[name], name
    w = dict(zip(losses, weights or (1.0,) * len(losses)))
    assert first["loss"] == pytest.approx(sum(w[k] * first[k] for k in losses))


def test_training_is_deterministic(toy):
    tokens, table = toy
    cfg = SoftConfig(**FAST, steps=15)
    a, b = train_soft(tokens, table, cfg), train_soft(tokens, table, cfg)
    assert a.history == b.history and torch.equal(a.heldout_ids, b.heldout_ids)
    assert torch.equal(a.predict(tokens[:20]), b.predict(tokens[:20]))
    c = train_soft(tokens, table, SoftConfig(**{**FAST, "seed": 1}, steps=15))
    assert not torch.equal(a.heldout_ids, c.heldout_ids)


def test_config_errors_name_the_field(toy):
    with pytest.raises(ValueError, match=r"unknown loss 'cosine'; known: mse, l1, retrieval"):
        SoftConfig(losses=("mse", "cosine"))
    for kwargs, field in [({"holdout": 1.0}, "holdout"), ({"temperature": 0}, "temperature"),
                          ({"hidden": 30, "heads": 4}, "heads"), ({"weights": (1.0,)}, "weights"),
                          ({"steps": 0}, "steps"), ({"schedule": "linear"}, "schedule"), ({"losses": ()}, "losses")]:
        with pytest.raises(ValueError, match=field):
            SoftConfig(**kwargs)
    tokens, table = toy
    with pytest.raises(ValueError, match="table must be"):
        train_soft(tokens[:10], table, SoftConfig(steps=1))


def test_save_load_round_trip(toy, learned, tmp_path):
    tokens, _ = toy
    out = save(learned, tmp_path / "soft")
    assert sorted(p.name for p in out.iterdir()) == ["soft.json", "soft_encoder.safetensors"]  # no temp files left
    meta = json.loads((out / "soft.json").read_text())
    assert meta["summary"]["heldout_accuracy"] == learned.heldout_accuracy
    assert meta["heldout_ids"] == learned.heldout_ids.tolist() and meta["config"]["losses"] == ["mse", "retrieval"]
    encoder = load(out)
    assert torch.equal(encoder.embed(tokens), learned.predict(tokens))
    with pytest.raises(ValueError, match="max_len"):
        encoder.embed([b"x" * 10])
    with pytest.raises(FileNotFoundError, match="soft.json"):
        load(tmp_path)


# ------------------------------------------------------------------ checkpoints
CORPUS = ["the king and the queen speak of the storm at sea, the lord and the lady hear the rain."] * 30


def _checkpoint(path, kind: str):
    """A tiny random-weights consolidated checkpoint (hidden 32, one layer) of ``kind``."""
    from megatron_tfree.tokenizer import ClassicTokenizer, TrigramTokenizer

    from toklab_helpers import make_checkpoint

    if kind == "classic":
        tok = ClassicTokenizer.train(CORPUS, vocab_size=300, min_frequency=1)
    else:
        tok = TrigramTokenizer(vocab_size=256, vocab_population=2)
    return make_checkpoint(path, tok), tok


def test_soft_from_a_classic_checkpoint(tmp_path):
    path, tok = _checkpoint(tmp_path / "classic", "classic")
    tokens = vocab_bytes(tok.hf_tokenizer)
    assert len(tokens) == tok.vocab_size
    text = "the queen hears the storm"
    assert b"".join(tokens[i] for i in tok.encode_ids(text)) == text.encode()  # bytes aligned with ids
    assert tokens[tok.hf_tokenizer.token_to_id("<|endoftext|>")] == b"<|endoftext|>"

    cfg = SoftConfig(**FAST, steps=20)
    result, report = soft_from_checkpoint(path, cfg, eval_texts=[text, "the lord and the lady"])
    assert report["vocab_size"] == tok.vocab_size == result.vocab_size
    assert report["heldout_share"] == pytest.approx(0.2, abs=0.01)
    assert report["losses"]["step"] == 20 and 0 <= report["train_accuracy"] <= 1
    for key in ("bpb_original", "bpb_soft", "bpb_change", "bpb_soft_heldout_rows"):
        assert math.isfinite(report[key]) and (key == "bpb_change" or report[key] > 0), key
    assert report["bpb_change"] == pytest.approx(report["bpb_soft"] - report["bpb_original"])
    assert report["bpb_soft"] != report["bpb_original"]
    json.dumps(report)
    assert result.predict(tokens[:3]).shape == (3, 32)

    _, plain = soft_from_checkpoint(path, SoftConfig(**FAST, steps=2))
    assert "bpb_original" not in plain


def test_tfree_checkpoints_are_refused(tmp_path):
    path, _ = _checkpoint(tmp_path / "tfree", "tfree")
    with pytest.raises(ValueError, match="T-Free has no vocabulary tokens"):
        soft_from_checkpoint(path, SoftConfig(steps=1))
