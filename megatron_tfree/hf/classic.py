"""Classic-tokenizer models -> a standard ``LlamaForCausalLM`` folder (no custom code).

``config.json`` and ``generation_config.json`` come from the installed ``transformers`` classes (so
they match its version), the tokenizer is the run's byte-level BPE as a ``PreTrainedTokenizerFast``
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``): ``<|endoftext|>`` is
end of text, beginning of sequence and padding (left padding, for batched generation); no token is
added around a text, as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointReader
from ..model.transformer import mlp_inner_size


def llama_config(cfg: Any, vocab_size: int, eot_id: int, dtype: str) -> Any:
    """A ``transformers.LlamaConfig`` of the model of ``cfg`` (our Config)."""
    from transformers import LlamaConfig

    m = cfg.model
    kwargs = dict(vocab_size=vocab_size, hidden_size=m.hidden_size, intermediate_size=mlp_inner_size(m),
                  num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_key_value_heads=m.num_kv_heads or m.num_attention_heads,
                  head_dim=m.hidden_size // m.num_attention_heads, hidden_act="silu",
                  max_position_embeddings=cfg.data.seq_len, rms_norm_eps=m.norm_eps, attention_bias=m.bias,
                  mlp_bias=m.bias, tie_word_embeddings=False, bos_token_id=eot_id, eos_token_id=eot_id,
                  pad_token_id=eot_id)
    if "rope_parameters" in getattr(LlamaConfig, "__dataclass_fields__", {}):  # transformers >= 5
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": m.rotary_embedding_base}
    else:
        kwargs["rope_theta"] = m.rotary_embedding_base
    config = LlamaConfig(**kwargs)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return config


def generation_config(eot_id: int) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id)


class ClassicTarget:
    """The :class:`~.export.ExportTarget` of classic (BPE) models."""

    def __init__(self, reader: CheckpointReader, **_: Any):
        self.reader = reader
        self.tokenizer = reader.tokenizer
        eot_id = self.tokenizer.hf_tokenizer.token_to_id(self.tokenizer.end_of_text)
        if eot_id is None:
            raise ValueError(f"the classic tokenizer has no end-of-text token {self.tokenizer.end_of_text!r} "
                             f"(tokenizer.end_of_text)")
        self.eot_id = int(eot_id)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def write_files(self, directory: Path, dtype: str) -> None:
        from transformers import PreTrainedTokenizerFast

        cfg = self.reader.cfg
        llama_config(cfg, self.tokenizer.vocab_size, self.eot_id, dtype).save_pretrained(directory)
        generation_config(self.eot_id).save_pretrained(directory)
        eot = self.tokenizer.end_of_text
        fast = PreTrainedTokenizerFast(tokenizer_object=self.tokenizer.hf_tokenizer, bos_token=eot, eos_token=eot,
                                       pad_token=eot, padding_side="left", model_max_length=cfg.data.seq_len,
                                       clean_up_tokenization_spaces=False)
        fast.save_pretrained(directory)

    def card(self) -> dict[str, str]:
        eot = self.tokenizer.end_of_text
        return {
            "architecture": "a standard `LlamaForCausalLM` (no custom code)",
            "tokenizer": f"byte-level BPE, {self.tokenizer.vocab_size} tokens (`tokenizer.json`); `{eot}` ends a "
                         "document and pads (left); nothing is added around a text",
            "usage": '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
out = model.generate(**tok(["ROMEO:", "To be"], return_tensors="pt", padding=True), max_new_tokens=20)
print(tok.batch_decode(out, skip_special_tokens=True))
print(pipeline("text-generation", model=path)("ROMEO:", max_new_tokens=20))
```''',
            "notes": "Rotary: megatron_tfree rotates adjacent channel pairs; the export permutes the q and k rows "
                     "of every head so that Llama's rotate-half convention computes the same attention.",
        }
