"""T-Free reference checkpoints (Aleph-Alpha/trigrams layout) -> this project (an :class:`~.importing.ImportSource`).

A reference save dir holds ``latest`` (the name of the newest iteration dir, e.g. ``000000001000``) and
per iteration ``transformer/transformer.pt`` (a state dict), ``transformer/transformer_config.yaml``
and ``tokenizer/tokenizer_config.yaml`` (both JSON text). Only these three are read: the weights with
``torch.load(weights_only=True)``; ``tokenizer/tokenizer.pt``, ``words_target/*.pt`` and the optimizer
files are pickles and are never opened (pass ``--word-counts`` for a decode dictionary).

The reference's ids are the ones ``tokenizer.initialize=hash`` reproduces, so training continues where
it stopped. Architecture mapping (its ``transformer.`` keys -> ours): embeddings.embedding -> embedding
(``embedding_aggregation: mean`` averages a trigram's m rows: the same function as summing rows scaled
by 1/m, so the rows are scaled); layers.{i}.input_layernorm / post_attention_layernorm -> norms;
attention.query/key/value -> the fused QKV (one KV group per head; the rotary convention, adjacent
pairs, is already ours); attention.dense -> dense; mlp ``dense_out(silu(dense_in(x)) * swiglu(x))`` ->
gate = dense_in, up = swiglu, down = dense_out; biases when ``bias_terms`` (``model.bias``); norm ->
output.norm; lm_head -> the head. Not representable here (clear errors): ``embedding_normalization``,
``mlp_type: simple_gelu``, ``norm: layer``, ``initialize: orthogonal``, classic tokenization.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import yaml

from ..checkpoint.safe_load import load_weights_only
from ..config import Config

TRANSFORMER_DIR, TOKENIZER_DIR = "transformer", "tokenizer"
WEIGHTS, MODEL_CONFIG, TOKENIZER_CONFIG = "transformer.pt", "transformer_config.yaml", "tokenizer_config.yaml"


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (a T-Free reference checkpoint needs it)")
    try:
        data = yaml.safe_load(path.read_text())  # JSON text (JSON is YAML)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid JSON/YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


class ReferenceSource:
    kind = "tfree-reference"

    @staticmethod
    def iteration_dir(path: Path) -> Path:
        latest = path / "latest"
        if latest.is_file():
            name = latest.read_text().strip()
            if not (path / name).is_dir():
                raise FileNotFoundError(f"{latest} names {name!r} but {path / name} does not exist")
            return path / name
        return path

    @classmethod
    def matches(cls, path: Path) -> bool:
        if (path / "latest").is_file():
            return True
        return (path / TRANSFORMER_DIR).is_dir() and (path / TOKENIZER_DIR).is_dir()

    def __init__(self, path: Path):
        self.path = self.iteration_dir(path)
        self.model = _read(self.path / TRANSFORMER_DIR / MODEL_CONFIG)
        self.tok = _read(self.path / TOKENIZER_DIR / TOKENIZER_CONFIG)
        self._check()

    def _check(self) -> None:
        where = self.path / TRANSFORMER_DIR / MODEL_CONFIG
        m = self.model
        for key, needed in (("norm", "rms"), ("mlp_type", "swiglu")):
            if m.get(key, needed) != needed:
                raise ValueError(f"{where}: {key}={m.get(key)!r}; this trainer's model needs {key}={needed!r}")
        if m.get("embedding_normalization", False):
            raise ValueError(f"{where}: embedding_normalization=true (dividing a word's input by its trigram count) "
                             f"has no counterpart in this model")
        if m.get("embedding_aggregation", "mean") not in ("sum", "mean"):
            raise ValueError(f"{where}: embedding_aggregation={m.get('embedding_aggregation')!r}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads"):
            if not m.get(key):
                raise ValueError(f"{where}: {key} is missing or 0")
        tw = self.path / TOKENIZER_DIR / TOKENIZER_CONFIG
        if self.tok.get("do_classic_tokenization", False):
            raise ValueError(f"{tw}: do_classic_tokenization=true is not a T-Free tokenizer")
        if self.tok.get("initialize", "hash") != "hash":
            raise ValueError(f"{tw}: initialize={self.tok.get('initialize')!r}: only the md5 'hash' ids are reproduced")
        if int(self.tok["vocab_size"]) != int(m["vocab_size"]):
            raise ValueError(f"{tw}: vocab_size {self.tok['vocab_size']} differs from {where}'s {m['vocab_size']}")

    @property
    def mean_aggregation(self) -> bool:
        return self.model.get("embedding_aggregation", "mean") == "mean"

    def config_dict(self) -> dict[str, Any]:
        m, t = self.model, self.tok
        h = int(m["hidden_size"])
        return {
            "model": {"hidden_size": h, "num_layers": int(m["num_layers"]),
                      "num_attention_heads": int(m["num_attention_heads"]),
                      "ffn_hidden_size": int(h * float(m.get("mlp_factor", 4.0))),
                      "mlp_factor": float(m.get("mlp_factor", 4.0)), "norm_eps": float(m.get("layernorm_epsilon", 1e-5)),
                      "rotary_embedding_base": float(m.get("rotary_embedding_base", 10000)),
                      "bias": bool(m.get("bias_terms", True)), "init": "pythia"},
            "tokenizer": {"kind": "tfree", "vocab_size": int(t["vocab_size"]),
                          "vocab_population": int(t["vocab_population"]),
                          "vocab_population_partial_lowercase": int(t.get("vocab_population_partial_lowercase", 0)),
                          "initialize": "hash", "seed": int(t.get("seed", 42)), "lowercase": bool(t.get("lowercase", False)),
                          "entire_words": bool(t.get("entire_words", False)),
                          "end_of_text": t.get("end_of_text", "<|endoftext|>")},
            "data": {"seq_len": int(m.get("sequence_length", t.get("sequence_length", 2048)))},
        }

    def tokenizer(self) -> Any:
        from ..tokenizer import TrigramTokenizer

        t = self.config_dict()["tokenizer"]
        return TrigramTokenizer(**{k: v for k, v in t.items() if k != "kind"})

    def _mapping(self, cfg: Config) -> dict[str, list[str]]:
        """Our name -> the reference keys it is made of."""
        out = {"embedding.weight": ["transformer.embeddings.embedding.weight"],
               "output.norm.weight": ["transformer.norm.weight"], "output.head.linear.weight": ["lm_head.weight"]}
        for i in range(cfg.model.num_layers):
            r, o = f"transformer.layers.{i}.", f"blocks.{i}."
            out[o + "input_norm.weight"] = [r + "input_layernorm.weight"]
            out[o + "post_attention_norm.weight"] = [r + "post_attention_layernorm.weight"]
            for kind in ("weight", "bias"):
                out[o + f"attention.qkv.{kind}"] = [r + f"attention.{n}.{kind}" for n in ("query", "key", "value")]
                out[o + f"attention.dense.{kind}"] = [r + f"attention.dense.{kind}"]
                out[o + f"mlp.gate_up.{kind}"] = [r + f"mlp.dense_in.{kind}", r + f"mlp.swiglu.{kind}"]
                out[o + f"mlp.down.{kind}"] = [r + f"mlp.dense_out.{kind}"]
        return out

    def tensors(self, cfg: Config, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        path = self.path / TRANSFORMER_DIR / WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing")
        state = load_weights_only(path, mmap=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        mapping = self._mapping(cfg)
        wanted = {k for n in names for k in mapping[n]}
        missing, unexpected = sorted(wanted - set(state)), sorted(set(state) - wanted)
        if missing or unexpected:
            raise ValueError(f"{path}: the weights do not fit {MODEL_CONFIG}: missing keys {missing}, unexpected keys "
                             f"{unexpected}")
        heads = cfg.model.num_attention_heads
        d = cfg.model.hidden_size // heads
        for name in names:
            parts = [state[k].float() for k in mapping[name]]
            try:
                if ".qkv." in name:  # one KV group per head: [head][q, k, v][d]
                    q, k, v = (p.reshape(heads, 1, d, *p.shape[1:]) for p in parts)
                    value = torch.cat([q, k, v], dim=1).reshape(3 * heads * d, *parts[0].shape[1:])
                elif len(parts) == 2:
                    value = torch.cat(parts, dim=0)
                else:
                    value = parts[0]
            except RuntimeError as e:
                raise ValueError(f"{path}: {mapping[name]} do not fit {MODEL_CONFIG} ({name!r}): {e}") from None
            if name == "embedding.weight" and self.mean_aggregation:
                value = value / cfg.tokenizer.vocab_population
            yield name, value

    def describe(self) -> dict[str, Any]:
        return {"format": "tfree-reference", "path": str(self.path.resolve()),
                "embedding_aggregation": self.model.get("embedding_aggregation", "mean"),
                "word_edge_weight": self.tok.get("word_edge_weight", 1)}
