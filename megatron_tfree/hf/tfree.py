"""T-Free models -> a Hugging Face folder with its own configuration, modeling and tokenization code.

Loaded with ``trust_remote_code=True`` (``auto_map`` names ``TFreeConfig``, ``TFreeForCausalLM``,
``TFreeTokenizer``); the code (``remote_code/`` of this package, plus this package's standalone
:mod:`~megatron_tfree.tokenizer.words`, :mod:`~megatron_tfree.tokenizer.hashing` and
:mod:`~megatron_tfree.tokenizer.scoring` copied as ``tfree_words.py``, ``tfree_hashing.py``,
``tfree_scoring.py``) imports torch and transformers only. The decode dictionary (the checkpoint's
stored one, else built from its training word counts) becomes the tokenizer's vocabulary
(``tfree_vocab.json``) and, as buffers beside the weights, each word's input row (its trigram ids
with multiplicity) and its decode pattern.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..checkpoint import CheckpointReader
from ..model.transformer import mlp_inner_size
from ..tokenizer import hashing, scoring, words

REMOTE_CODE = Path(__file__).resolve().parent / "remote_code"
CODE_FILES = {"configuration_tfree.py": REMOTE_CODE / "configuration_tfree.py",
              "modeling_tfree.py": REMOTE_CODE / "modeling_tfree.py",
              "tokenization_tfree.py": REMOTE_CODE / "tokenization_tfree.py",
              "tfree_words.py": Path(words.__file__), "tfree_hashing.py": Path(hashing.__file__),
              "tfree_scoring.py": Path(scoring.__file__)}
VOCAB_FILE = "tfree_vocab.json"
AUTO_MAP = {"AutoConfig": "configuration_tfree.TFreeConfig", "AutoModelForCausalLM": "modeling_tfree.TFreeForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_tfree.TFreeTokenizer", None]}


class TFreeTarget:
    """The :class:`~.export.ExportTarget` of T-Free models."""

    def __init__(self, reader: CheckpointReader, reduce_to: Optional[int] = None,
                 word_counts: Optional[str | os.PathLike] = None, logit_scale: float = 20.0, **_: Any):
        from ..inference.loading import checkpoint_dictionary

        if logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
        self.reader = reader
        self.tokenizer = reader.tokenizer
        dictionary = checkpoint_dictionary(reader.tag_dir, self.tokenizer, word_counts)
        self.dictionary = dictionary.reduce_to(reduce_to) if reduce_to is not None else dictionary
        self.words = self.dictionary.words
        self.fingerprint = hashlib.sha256(json.dumps(self.words, ensure_ascii=False).encode()).hexdigest()[:16]
        self.eot_id = self.words.index(self.tokenizer.end_of_text)
        self.logit_scale = float(logit_scale)
        self._extra: Optional[dict[str, torch.Tensor]] = None

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        if self._extra is None:
            self._extra = self._buffers()
        return self._extra

    def _buffers(self) -> dict[str, torch.Tensor]:
        rows = self.tokenizer.encode_units(self.words)
        arrays = self.dictionary.arrays()
        as_tensor = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a, dtype=dt))  # noqa: E731
        return {"words.input_offsets": as_tensor(rows.offsets, np.int64),
                "words.input_ids": as_tensor(rows.indices, np.int32),
                "words.pattern_offsets": as_tensor(arrays["offsets"], np.int64),
                "words.pattern_ids": as_tensor(arrays["ids"], np.int32),
                "words.pattern_edge": as_tensor(arrays["edge"], np.uint8),
                "words.pattern_c": as_tensor(arrays["c"], np.int32)}

    def config(self, dtype: str) -> dict[str, Any]:
        cfg, tok = self.reader.cfg, self.tokenizer
        m = cfg.model
        extra = self.extra_tensors()
        settings = {k: v for k, v in tok.config_dict().items() if k not in ("kind", "vocab_size", "end_of_text", "cache_size")}
        return {"architectures": ["TFreeForCausalLM"], "model_type": "tfree", "auto_map": AUTO_MAP,
                "hidden_size": m.hidden_size, "intermediate_size": mlp_inner_size(m),
                "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
                "num_key_value_heads": m.num_kv_heads or m.num_attention_heads, "rms_norm_eps": m.norm_eps,
                "rope_theta": m.rotary_embedding_base, "attention_bias": m.bias, "mlp_bias": m.bias,
                "max_position_embeddings": cfg.data.seq_len, "trigram_vocab_size": tok.vocab_size, **settings,
                "dictionary_size": len(self.words), "dictionary_nnz": int(extra["words.pattern_ids"].numel()),
                "input_nnz": int(extra["words.input_ids"].numel()), "dictionary_fingerprint": self.fingerprint,
                "edge_weight": 1.0, "logit_scale": self.logit_scale, "loss_pos_weight": m.loss_pos_weight,
                "bos_token_id": self.eot_id, "eos_token_id": self.eot_id, "pad_token_id": self.eot_id,
                "tie_word_embeddings": False, "torch_dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]}

    def write_files(self, directory: Path, dtype: str) -> None:
        from .classic import generation_config

        (directory / "config.json").write_text(json.dumps(self.config(dtype), indent=2) + "\n")
        generation_config(self.eot_id).save_pretrained(directory)
        for name, source in CODE_FILES.items():
            shutil.copyfile(source, directory / name)
        eot = self.tokenizer.end_of_text
        (directory / VOCAB_FILE).write_text(json.dumps({"words": self.words}, ensure_ascii=False))
        specials = {"bos_token": eot, "eos_token": eot, "pad_token": eot}
        tok_config = {"tokenizer_class": "TFreeTokenizer", "auto_map": TOKENIZER_AUTO_MAP, **specials,
                      "dictionary_fingerprint": self.fingerprint, "lowercase": self.tokenizer.lowercase,
                      "padding_side": "left", "clean_up_tokenization_spaces": False,
                      "model_max_length": self.reader.cfg.data.seq_len}
        (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, ensure_ascii=False) + "\n")

    def card(self) -> dict[str, str]:
        tok = self.tokenizer
        return {
            "architecture": "T-Free (Deiseroth et al. 2024): a Llama decoder (`transformers.LlamaModel`) over "
                            "word embeddings that are sums of hashed trigram embeddings; remote code "
                            "(`trust_remote_code=True`), which needs torch and transformers only",
            "tokenizer": f"T-Free words (lossless word split, whitespace as marker words); trigram ids: "
                         f"v={tok.vocab_size}, m={tok.vocab_population} ids per trigram, "
                         f"{tok.vocab_population_partial_lowercase} shared with the lower-case trigram, "
                         f"`{tok.initialize}` hashing. Token ids index the {len(self.words)}-word decode "
                         "dictionary (`tfree_vocab.json`); any other word still encodes exactly (an extra id of "
                         "this process)",
            "usage": f'''```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
batch = tok(["ROMEO:", "To be"], return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=20)                       # greedy
out = model.generate(**batch, max_new_tokens=20, do_sample=True, temperature=1.0, top_k=50)
out = model.generate(**batch, max_new_tokens=20, num_beams=4)
print(tok.batch_decode(out, skip_special_tokens=True))
print(pipeline("text-generation", model=path, trust_remote_code=True)("ROMEO:", max_new_tokens=20))
model(**batch).trigram_logits                                          # [B, S, {tok.vocab_size}] raw head outputs
model.generate(**batch, max_new_tokens=20, edge_weight=0.5, more_words=["Verona"])   # spec decoding options
```''',
            "notes": f"`logits` are the spec's decode scores (about [-1, 1]) times `logit_scale` = {self.logit_scale:g}, "
                     f"so `generate(temperature=t)` samples like megatron_tfree's "
                     f"`InferencePipe.generate(temperature=t / {self.logit_scale:g})`; greedy decoding is the same "
                     "either way. A row's candidates are the dictionary plus the row's own out-of-dictionary words "
                     "(and `more_words`).",
        }
