"""Hugging Face Llama folders -> this project (an :class:`~.importing.ImportSource`).

Reads ``config.json`` (a ``LlamaForCausalLM``: SiLU SwiGLU, RMSNorm, default rotary, head dim =
hidden / heads; biases on both attention and MLP or on neither), the safetensors weights (one file or
sharded with ``model.safetensors.index.json``; never pickles) and ``tokenizer.json`` (a classic
tokenizer whose end of text is the model's ``eos_token``). Tied embeddings are copied into the head
(this model's head is untied). Tensors are converted by :func:`.llama_names.from_hf`, one at a time;
missing or unexpected tensors are listed, shapes are checked by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..checkpoint.safetensors_stream import read_weight_map
from ..config import Config
from .llama_names import from_hf, hf_names

IGNORED = ("rotary_emb.inv_freq",)  # buffers some exports carry


class LlamaSource:
    kind = "hf-llama"

    def __init__(self, path: Path):
        self.path = path
        try:
            self.config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / 'config.json'}: not valid JSON: {e}") from None
        c = self.config
        arch = c.get("architectures") or []
        if c.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
            raise ValueError(f"{path / 'config.json'}: model_type {c.get('model_type')!r} / architectures {arch}: only "
                             f"Llama models (LlamaForCausalLM) can be imported")
        self._check()

    def _get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def _check(self) -> None:
        where = self.path / "config.json"
        if self._get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act={self._get('hidden_act')!r}, this model uses silu (SwiGLU)")
        rope = self._get("rope_parameters") or self._get("rope_scaling") or {}
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":
            raise ValueError(f"{where}: rotary scaling {rope} is not supported (only the default rotary embedding)")
        h, heads = self._get("hidden_size"), self._get("num_attention_heads")
        if self._get("head_dim") not in (None, h // heads):
            raise ValueError(f"{where}: head_dim={self._get('head_dim')} differs from hidden_size / "
                             f"num_attention_heads = {h // heads}; not supported")
        if bool(self._get("attention_bias", False)) != bool(self._get("mlp_bias", False)):
            raise ValueError(f"{where}: attention_bias={self._get('attention_bias')} and mlp_bias="
                             f"{self._get('mlp_bias')}: biases must be on both or neither (model.bias)")

    @property
    def rope_theta(self) -> float:
        rope = self._get("rope_parameters") or {}
        return float(rope.get("rope_theta", self._get("rope_theta", 10000.0)))

    def config_dict(self) -> dict[str, Any]:
        c = self.config
        vocab = int(c["vocab_size"])
        return {
            "model": {"hidden_size": c["hidden_size"], "num_layers": c["num_hidden_layers"],
                      "num_attention_heads": c["num_attention_heads"],
                      "num_kv_heads": c.get("num_key_value_heads") or 0, "ffn_hidden_size": c["intermediate_size"],
                      "norm_eps": float(c.get("rms_norm_eps", 1e-6)), "rotary_embedding_base": self.rope_theta,
                      "bias": bool(c.get("attention_bias", False))},
            "tokenizer": {"kind": "classic", "classic_vocab_size": vocab, "end_of_text": self._eos_token()},
            "data": {"seq_len": min(int(c.get("max_position_embeddings", 2048)), 4096)},
        }

    def _eos_token(self) -> str:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = self.path / name
            if path.is_file():
                eos = json.loads(path.read_text()).get("eos_token")
                if isinstance(eos, dict):
                    eos = eos.get("content")
                if eos:
                    return eos
        raise ValueError(f"{self.path}: no eos_token in tokenizer_config.json or special_tokens_map.json (the end of "
                         f"text of this project's classic tokenizer)")

    def tokenizer(self) -> Any:
        from ..tokenizer import ClassicTokenizer

        path = self.path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{self.path}: no tokenizer.json (a fast tokenizer is needed to import the model)")
        tok = ClassicTokenizer.from_file(path, end_of_text=self._eos_token())
        if tok.vocab_size != int(self.config["vocab_size"]):
            raise ValueError(f"{path}: {tok.vocab_size} tokens, but config.json says vocab_size={self.config['vocab_size']} "
                             f"(padded vocabularies are not supported)")
        return tok

    def tensors(self, cfg: Config, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        files = read_weight_map(self.path)
        tied = bool(self._get("tie_word_embeddings", False)) and "lm_head.weight" not in files
        wanted = {n for name in names for n in hf_names(name, cfg.model)}
        if tied:
            wanted.discard("lm_head.weight")
        missing = sorted(wanted - set(files))
        unexpected = sorted(n for n in set(files) - wanted if not n.endswith(IGNORED))
        if missing or unexpected:
            raise ValueError(f"{self.path}: the weights do not fit config.json: missing tensors {missing}, "
                             f"unexpected tensors {unexpected}")
        handles: dict[Path, Any] = {}

        def get(name: str) -> torch.Tensor:
            if tied and name == "lm_head.weight":
                name = "model.embed_tokens.weight"
            f = files[name]
            if f not in handles:
                handles[f] = safe_open(str(f), "pt")
            return handles[f].get_tensor(name).float()

        for name in names:
            try:
                yield name, from_hf(name, get, cfg.model)
            except RuntimeError as e:  # a reshape that does not fit: the weights and config.json disagree
                raise ValueError(f"{self.path}: the tensors of {name!r} ({hf_names(name, cfg.model)}) do not fit "
                                 f"config.json: {e}") from None

    def describe(self) -> dict[str, Any]:
        return {"format": "hf-llama", "path": str(self.path.resolve())}
