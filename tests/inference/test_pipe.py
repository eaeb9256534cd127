"""InferencePipe: batched == row-by-row, KV cache == recompute, per-call words, stopping, checkpoint
loading (stored dictionary used without recomputation), the CLI, and the echo test."""

import json
import time

import numpy as np
import pytest
import torch

from megatron_tfree import generate as generate_cli
from megatron_tfree.config import Config, ModelConfig, TokenizerConfig
from megatron_tfree.data.batch import Batch
from megatron_tfree.data.dataset import positions_and_documents
from megatron_tfree.inference import InferencePipe
from megatron_tfree.inference import loading
from megatron_tfree.model import GPTModel
from megatron_tfree.tokenizer import ClassicTokenizer, TrigramTokenizer
from megatron_tfree.tokenizer.dictionary import DecodeDictionary

V = 256
PROMPTS = ["Hello", "the cat sat on the", "a b", "Once upon a time there was"]
WORDS = {"cat": 5, "dog": 4, "the": 9, "sat": 2, "on": 3, "mat": 1, "Hello": 2, "World": 2, "!": 3}


def model_cfg(**kw):
    base = dict(hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, attention="sdpa")
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def tfree_pipe():
    tok = TrigramTokenizer(vocab_size=V, vocab_population=4)
    return InferencePipe(GPTModel(model_cfg(), "tfree", V, seed=3), tok, word_counts=WORDS)


@pytest.fixture(scope="module")
def classic_pipe():
    texts = ["Hello World! the cat sat on the mat. Once upon a time there was a dog."] * 20
    tok = ClassicTokenizer.train(texts, vocab_size=300, min_frequency=1)
    return InferencePipe(GPTModel(model_cfg(), "classic", tok.vocab_size, seed=4), tok)


@pytest.mark.parametrize("which", ["tfree_pipe", "classic_pipe"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_batched_equals_row_by_row(request, which, padding):
    pipe = request.getfixturevalue(which)
    batched = pipe.generate(PROMPTS, max_words=6, padding=padding, more_words="zebra")
    rows = [pipe.generate(p, max_words=6, more_words="zebra") for p in PROMPTS]
    assert batched == rows
    assert any(r for r in rows)


@pytest.mark.parametrize("which", ["tfree_pipe", "classic_pipe"])
def test_kv_cache_equals_recompute(request, which):
    pipe = request.getfixturevalue(which)
    assert pipe.generate(PROMPTS, max_words=7) == pipe.generate(PROMPTS, max_words=7, use_kv_cache=False)


def test_logits_shape_and_consistency(tfree_pipe):
    out = tfree_pipe.logits("the cat sat")
    assert out.shape == (3, V) and out.dtype == torch.float32
    assert torch.allclose(tfree_pipe.logits("the cat")[1], out[1], atol=1e-5)  # causal


class FixedLogits(torch.nn.Module):
    """A stub model whose every position outputs the same logits."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("row", torch.as_tensor(logits, dtype=torch.float32))
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def new_kv_cache(self):
        return None

    def forward(self, batch, kv_cache=None):
        B, S = batch.shape
        return self.row.expand(B, S, -1).clone()


def favouring(tok, word):
    logits = torch.full((V,), -8.0)
    logits[torch.as_tensor(tok.word_ids(word))] = 8.0
    return logits


def test_more_words_and_prompt_words_do_not_leak():
    tok = TrigramTokenizer(vocab_size=V, vocab_population=4)
    pipe = InferencePipe(FixedLogits(favouring(tok, "zebra")), tok, word_counts={"cat": 3, "dog": 2})
    n = len(pipe.dictionary)
    assert pipe.generate("a cat", max_words=1, more_words=["zebra crossing"]) == " zebra"
    assert pipe.generate("zebra", max_words=1).strip() == "zebra"  # the prompt's own words join
    plain = pipe.generate("a cat", max_words=1)
    assert "zebra" not in plain and len(pipe.dictionary) == n and "zebra" not in pipe.dictionary
    # batched: the word of row 0's prompt is not offered to row 1
    assert pipe.generate(["zebra", "a cat"], max_words=1) == [pipe.generate("zebra", max_words=1), plain]
    assert pipe.generate("a cat", max_words=1, reduce_to=0) != " zebra"


def test_stop_at_end_of_text_and_stop_words():
    tok = TrigramTokenizer(vocab_size=V, vocab_population=4)
    eot = InferencePipe(FixedLogits(favouring(tok, "<|endoftext|>")), tok)
    assert eot.generate("Hello", max_words=5) == ""
    pipe = InferencePipe(FixedLogits(favouring(tok, "dog")), tok, word_counts={"dog": 1, "cat": 1})
    assert pipe.generate("cat", max_words=3) == " dog dog dog"
    assert pipe.generate("cat", max_words=3, stop_words=["dog"]) == " dog"
    with pytest.raises(ValueError, match="single words"):
        pipe.generate("cat", stop_words=["two words"])


def test_sampling_is_seeded(tfree_pipe):
    a = tfree_pipe.generate("the cat", max_words=5, temperature=0.05, top_k=4, seed=7)
    assert a == tfree_pipe.generate("the cat", max_words=5, temperature=0.05, top_k=4, seed=7)
    assert tfree_pipe.generate("the cat", max_words=3, temperature=1e-6, seed=1) == tfree_pipe.generate("the cat", max_words=3)


# ------------------------------------------------------------------ checkpoints


def write_checkpoint(root, model, cfg, tok, counts, tag="step_5"):
    """The training layout: save_dir/latest + save_dir/<tag>/{config.yaml, tokenizer/, word_counts.json,
    mp_rank_00_model_states.pt}."""
    d = root / tag
    d.mkdir(parents=True)
    cfg.save(d / "config.yaml")
    tok.save(d / "tokenizer")
    (d / "word_counts.json").write_text(json.dumps(counts))
    torch.save({"module": model.state_dict(), "ds_version": "0.0"}, d / "mp_rank_00_model_states.pt")
    (root / "latest").write_text(tag + "\n")
    return d


@pytest.fixture()
def checkpoint(tmp_path):
    cfg = Config(model=model_cfg(), tokenizer=TokenizerConfig(vocab_size=V, vocab_population=4))
    tok = TrigramTokenizer.from_config(cfg.tokenizer)
    model = GPTModel(cfg.model, "tfree", V, seed=11)
    write_checkpoint(tmp_path, model, cfg, tok, WORDS)
    return tmp_path, InferencePipe(model, tok, word_counts=WORDS)


def test_from_checkpoint_matches_in_memory(checkpoint, monkeypatch):
    root, ref = checkpoint
    for path in (root, root / "step_5"):
        pipe = InferencePipe.from_checkpoint(path)
        assert pipe.dictionary.words == ref.dictionary.words
        assert pipe.generate(PROMPTS, max_words=5) == ref.generate(PROMPTS, max_words=5)
    # precomputed dictionary: used as stored, no pattern building
    stored = loading.precompute_dictionary(root, reduce_to=3)
    assert stored == root / "step_5" / "decode_dictionary.safetensors"

    def fail(*a, **k):
        raise AssertionError("patterns recomputed although a stored dictionary exists")

    monkeypatch.setattr("megatron_tfree.tokenizer.dictionary._build_block", fail)
    pipe = InferencePipe.from_checkpoint(root)
    assert [w for w in pipe.dictionary.words if "<|" not in w] == ["the", "cat", "dog"]


def test_checkpoint_errors(tmp_path, checkpoint):
    root, _ = checkpoint
    with pytest.raises(FileNotFoundError, match="neither a save dir"):
        InferencePipe.from_checkpoint(tmp_path / "step_5" / "tokenizer")
    (root / "latest").write_text("step_9\n")
    with pytest.raises(FileNotFoundError, match="names 'step_9'"):
        InferencePipe.from_checkpoint(root)
    torch.save({"module": {"embedding.weight": torch.zeros(0)}}, root / "step_5" / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="ZeRO-3"):
        InferencePipe.from_checkpoint(root / "step_5")


def test_cli(checkpoint, capsys):
    root, ref = checkpoint
    assert generate_cli.main(["--checkpoint", str(root), "--prompt", "the cat", "--max-words", "4"]) == 0
    assert capsys.readouterr().out == "the cat" + ref.generate("the cat", max_words=4) + "\n"
    with pytest.raises(SystemExit) as e:
        generate_cli.main(["--help"])
    assert e.value.code == 0 and "--edge-weight" in capsys.readouterr().out


# ------------------------------------------------------------------ echo test


def echo_batch(tok, copies):
    units = (["Hello", "World", "!", tok.end_of_text] * copies)[:-1]
    ids = tok.encode_units(units)
    n = len(units) - 1
    pos, doc = positions_and_documents(np.asarray([u == tok.end_of_text for u in units[:-1]]))
    inp, tgt = ids.slice(0, n), ids.slice(1, n + 1)
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))  # noqa: E731
    return Batch(t(inp.offsets), t(inp.indices), t(tgt.offsets), t(tgt.indices), t(pos)[None], t(doc)[None],
                 torch.ones(1, n))


def test_echo_hello_world():
    """Acceptance: a tiny model trained on "Hello World!" documents completes "Hello" with " World!"."""
    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # ~1 s alone; extra threads only oversubscribe a shared CPU
    try:
        torch.manual_seed(0)
        tok = TrigramTokenizer(vocab_size=512, vocab_population=4)
        cfg = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, attention="sdpa", loss_pos_weight=10.0)
        model = GPTModel(cfg, "tfree", 512, seed=0)
        batch = echo_batch(tok, 8)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for _ in range(150):
            opt.zero_grad()
            model.loss(batch).backward()
            opt.step()
        counts = {"Hello": 8, "World": 8, "!": 8}
        pipe = InferencePipe(model, tok, DecodeDictionary.build(tok, counts))
        assert pipe.generate("Hello", max_words=5) == " World!"
    finally:
        torch.set_num_threads(threads)
    assert time.time() - start < 60


def test_long_prompt_warns(tfree_pipe, caplog):
    import logging

    tfree_pipe.trained_length = 4
    try:
        with caplog.at_level(logging.WARNING, logger="megatron_tfree.inference.pipe"):
            tfree_pipe.generate(" ".join(["the cat sat on the mat"] * 4), max_words=2)  # 26 units: 6.5x
        assert "span 26 units, 6x the 4 the model was trained on" in caplog.text
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="megatron_tfree.inference.pipe"):
            tfree_pipe.generate("the cat", max_words=2)
        assert caplog.text == ""
    finally:
        tfree_pipe.trained_length = None
