"""T-Free reference checkpoints (Aleph-Alpha/trigrams layout), built here: imported weights give the logits
of a forward written from the reference architecture (separate q/k/v, complex rotary, swiglu with
dense_in/swiglu/dense_out, embedding = per-trigram sum or mean of its m rows, summed over the word's
distinct trigrams), with and without biases; pickles are never opened; training continues from it."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from megatron_tfree.hf.importing import import_checkpoint
from megatron_tfree.inference import InferencePipe
from megatron_tfree.tokenizer import TrigramTokenizer, text_to_words
from megatron_tfree.tokenizer.hashing import word_trigrams

H, HEADS, LAYERS, V, M, K, MLP = 32, 4, 2, 256, 4, 1, 2.7
TEXT = "The King and the queen speak of Verona: a storm at sea!"


class Boom:
    """Unpickling this creates a file: proof that a pickle was opened."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def make_reference(root: Path, bias: bool, aggregation: str, seed: int = 0) -> Path:
    it = root / "000000000004"
    (it / "transformer").mkdir(parents=True)
    (it / "tokenizer").mkdir()
    (it / "words_target").mkdir()
    (root / "latest").write_text("000000000004")
    ffn = int(H * MLP)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"transformer.embeddings.embedding.weight": rnd(V, H), "transformer.norm.weight": 1 + rnd(H),
          "lm_head.weight": rnd(V, H)}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rnd(H)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(H)
        for n, shape in (("attention.query", (H, H)), ("attention.key", (H, H)), ("attention.value", (H, H)),
                         ("attention.dense", (H, H)), ("mlp.dense_in", (ffn, H)), ("mlp.swiglu", (ffn, H)),
                         ("mlp.dense_out", (H, ffn))):
            sd[p + n + ".weight"] = rnd(*shape)
            if bias:
                sd[p + n + ".bias"] = rnd(shape[0])
    torch.save({k: v.to(torch.bfloat16).float() for k, v in sd.items()}, it / "transformer" / "transformer.pt")
    model_cfg = {"use_flash": True, "embedding_normalization": False, "embedding_aggregation": aggregation,
                 "norm": "rms", "mlp_type": "swiglu", "init": "pythia", "bias_terms": bias, "vocab_size": V,
                 "hidden_size": H, "num_layers": LAYERS, "num_attention_heads": HEADS, "rotary_embedding_base": 10000,
                 "sequence_length": 64, "mlp_factor": MLP, "precision": "float32", "layernorm_epsilon": 1e-5,
                 "init_std_global_gain": 1.0}
    (it / "transformer" / "transformer_config.yaml").write_text(json.dumps(model_cfg, indent=4))
    tok_cfg = {"lowercase": False, "vocab_size": V, "sequence_length": 64, "vocab_population": M,
               "vocab_population_partial_lowercase": K, "do_classic_tokenization": False,
               "prefix_path_tokenizer_file": "", "seed": 42, "initialize": "hash", "entire_words": False,
               "end_of_text": "<|endoftext|>", "word_edge_weight": 1, "cache_dir": None}
    (it / "tokenizer" / "tokenizer_config.yaml").write_text(json.dumps(tok_cfg, indent=4))
    marker = root / "UNPICKLED"
    (it / "tokenizer" / "tokenizer.pt").write_bytes(pickle.dumps(Boom(marker)))
    (it / "words_target" / "words_target_rank_0.pt").write_bytes(pickle.dumps(Boom(marker)))
    return root


def reference_logits(root: Path, text: str) -> torch.Tensor:
    """The reference architecture, written out: fp32, causal, one document."""
    it = root / "000000000004"
    sd = torch.load(it / "transformer" / "transformer.pt", weights_only=True)
    cfg = json.loads((it / "transformer" / "transformer_config.yaml").read_text())
    tok = TrigramTokenizer(vocab_size=V, vocab_population=M, vocab_population_partial_lowercase=K)
    E = sd["transformer.embeddings.embedding.weight"]
    pool = (lambda x: x.mean(0)) if cfg["embedding_aggregation"] == "mean" else (lambda x: x.sum(0))
    rows = []
    for w in text_to_words(text):
        if "<|" in w:
            rows.append(pool(E[torch.as_tensor(tok.word_row(w), dtype=torch.long)]))
        else:  # the set of distinct trigrams, each its m ids
            rows.append(sum(pool(E[torch.as_tensor(tok.trigram_ids(t))]) for t in set(word_trigrams(w))))
    x = torch.stack(rows)
    S, d = x.shape[0], H // HEADS
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    cis = torch.polar(torch.ones(S, d // 2), torch.outer(torch.arange(S).float(), freqs))

    def rms(t, w):
        return (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5)) * w

    def lin(t, name):
        b = sd.get(name + ".bias")
        return t @ sd[name + ".weight"].T + (b if b is not None else 0)

    def rot(t):  # [S, heads, d], adjacent pairs as complex numbers
        c = torch.view_as_complex(t.reshape(S, HEADS, d // 2, 2))
        return torch.view_as_real(c * cis[:, None]).reshape(S, HEADS, d)

    mask = torch.tril(torch.ones(S, S)) < 0.5
    for i in range(LAYERS):
        p = f"transformer.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q, k, v = (lin(h, p + f"attention.{n}").reshape(S, HEADS, d) for n in ("query", "key", "value"))
        q, k = rot(q), rot(k)
        scores = torch.einsum("shd,thd->hst", q, k) / math.sqrt(d)
        probs = torch.softmax(scores.masked_fill(mask, -10000.0), dim=-1)
        x = x + lin(torch.einsum("hst,thd->shd", probs, v).reshape(S, H), p + "attention.dense")
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        x = x + lin(torch.nn.functional.silu(lin(h, p + "mlp.dense_in")) * lin(h, p + "mlp.swiglu"), p + "mlp.dense_out")
    return rms(x, sd["transformer.norm.weight"]) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("bias,aggregation", [(False, "sum"), (True, "mean")], ids=["7b-style", "bias-mean"])
def test_imported_reference_gives_its_logits(tmp_path, bias, aggregation):
    src = make_reference(tmp_path / "ref", bias, aggregation)
    out = import_checkpoint(src, tmp_path / "native")
    pipe = InferencePipe.from_checkpoint(out)
    torch.testing.assert_close(pipe.logits(TEXT), reference_logits(src, TEXT), rtol=0, atol=1e-5)
    assert pipe.model.cfg.bias is bias and pipe.tokenizer.vocab_population_partial_lowercase == K
    assert not (src / "UNPICKLED").exists()  # tokenizer.pt and words_target/*.pt were never opened
    assert pipe.generate("The King", max_words=3) is not None


def test_training_continues_from_the_reference(tmp_path, cfg_factory):
    from megatron_tfree.training.loop import train

    src = make_reference(tmp_path / "ref", False, "sum")
    out = import_checkpoint(src, tmp_path / "native", overrides=["model.loss_pos_weight=3.0"])
    cfg = cfg_factory(tmp_path, "continued",
                      model={"hidden_size": H, "num_layers": LAYERS, "num_attention_heads": HEADS,
                             "ffn_hidden_size": int(H * MLP), "loss_pos_weight": 3.0},
                      tokenizer={"kind": "tfree", "vocab_size": V, "vocab_population": M,
                                 "vocab_population_partial_lowercase": K},
                      training={"init_from": str(out), "train_iterations": 2, "eval_iterations": 0})
    losses = train(cfg).losses
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())


def test_refused_and_broken_references(tmp_path):
    src = make_reference(tmp_path / "ref", False, "sum")
    it = src / "000000000004"
    cfg_path = it / "transformer" / "transformer_config.yaml"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "embedding_normalization": True}))
    with pytest.raises(ValueError, match="embedding_normalization"):
        import_checkpoint(src, tmp_path / "o1")
    cfg_path.write_text(json.dumps({**cfg, "mlp_type": "simple_gelu"}))
    with pytest.raises(ValueError, match="mlp_type='simple_gelu'"):
        import_checkpoint(src, tmp_path / "o2")
    cfg_path.write_text(json.dumps(cfg))
    weights = it / "transformer" / "transformer.pt"
    sd = torch.load(weights, weights_only=True)
    del sd["transformer.layers.1.mlp.swiglu.weight"]
    torch.save(sd, weights)
    with pytest.raises(ValueError, match=r"missing keys \['transformer.layers.1.mlp.swiglu.weight'\]"):
        import_checkpoint(src, tmp_path / "o3")
    torch.save({"w": Boom(src / "UNPICKLED")}, weights)  # a crafted file: weights_only refuses it
    with pytest.raises(ValueError, match="cannot be read with torch.load\\(weights_only=True\\)"):
        import_checkpoint(src, tmp_path / "o4")
    assert not (src / "UNPICKLED").exists()
    (src / "latest").write_text("000000000009")
    with pytest.raises(FileNotFoundError, match="names '000000000009'"):
        import_checkpoint(src, tmp_path / "o5")
