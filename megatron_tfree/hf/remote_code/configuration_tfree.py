"""Configuration of a T-Free model exported by megatron_tfree (Hugging Face remote code).

This file, ``modeling_tfree.py``, ``tokenization_tfree.py`` and the helpers ``tfree_words.py``,
``tfree_hashing.py``, ``tfree_scoring.py`` are all a T-Free model needs: they import torch,
transformers and numpy (which both require), nothing from megatron_tfree.

Ids: the tokenizer's id of a word is its index in the decode dictionary (``tfree_vocab.json``, the
``dictionary_size`` words the model scores). A word outside the dictionary is still encoded exactly:
it gets the next free id ``dictionary_size + j`` of a process-wide table of extra words
(:func:`extra_words`, shared by this folder's tokenizer and model), and the model computes its
trigram ids on the fly. Generation chooses among the dictionary and the extra words that occur in a
row's own input (the prompt's words), like megatron_tfree's ``InferencePipe``.
"""

from __future__ import annotations

import sys
import types

from transformers import LlamaConfig, PretrainedConfig


class ExtraWords:
    """Out-of-dictionary words by id: ``base + j`` for the j-th word seen (the same id every time)."""

    def __init__(self, base: int):
        self.base = base
        self.words: list[str] = []
        self.ids: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.words)

    def id_of(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = self.base + len(self.words)
            self.words.append(word)
        return self.ids[word]

    def word(self, index: int) -> str:
        j = index - self.base
        if not 0 <= j < len(self.words):
            raise KeyError(f"id {index} is neither a dictionary word (< {self.base}) nor an extra word seen in this "
                           f"process ({len(self.words)}): encode the text with this model's tokenizer, in this process")
        return self.words[j]


def extra_words(fingerprint: str, base: int) -> ExtraWords:
    """The process-wide table of extra words of the dictionary ``fingerprint`` (``base`` = its size).

    transformers loads each remote-code class from its own copy of the folder's modules, so a module
    global would not be shared between tokenizer and model: the tables live in one module object
    registered in ``sys.modules`` under a fixed name instead."""
    store = sys.modules.get(_REGISTRY)
    if store is None:
        store = sys.modules.setdefault(_REGISTRY, types.ModuleType(_REGISTRY, "T-Free extra-word tables"))
        store.tables = {}
    key = f"{fingerprint}:{base}"
    if key not in store.tables:
        store.tables[key] = ExtraWords(base)
    return store.tables[key]


_REGISTRY = "_tfree_extra_words_registry"


class TFreeConfig(PretrainedConfig):
    """A Llama-style decoder over T-Free word embeddings (see ``modeling_tfree.py``).

    Transformer: ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``, ``rms_norm_eps``, ``rope_theta``, ``attention_bias``, ``mlp_bias``.
    Trigram ids (spec of megatron_tfree, section 2): ``trigram_vocab_size`` (v), ``vocab_population``
    (m), ``vocab_population_partial_lowercase``, ``initialize``, ``seed``, ``lowercase``, ``entire_words``.
    Decoding: ``dictionary_size`` words (``vocab_size``), their stored patterns (``dictionary_nnz`` ids)
    and input rows (``input_nnz`` ids); ``edge_weight`` (spec section 4); ``logit_scale``: the spec's
    scores (about [-1, 1]) times this are the ``logits`` generation uses, so ``generate(temperature=t)``
    samples like megatron_tfree's ``InferencePipe.generate(temperature=t / logit_scale)``;
    ``loss_pos_weight``: the training BCE pos_weight (calibrated likelihoods subtract its log).
    """

    model_type = "tfree"

    def __init__(self, hidden_size: int = 256, intermediate_size: int = 683, num_hidden_layers: int = 4,
                 num_attention_heads: int = 4, num_key_value_heads: int | None = None, rms_norm_eps: float = 1e-5,
                 rope_theta: float = 10000.0, attention_bias: bool = False, mlp_bias: bool = False,
                 max_position_embeddings: int = 2048, trigram_vocab_size: int = 8192, vocab_population: int = 10,
                 vocab_population_partial_lowercase: int = 0, initialize: str = "hash", seed: int = 42,
                 lowercase: bool = False, entire_words: bool = False, dictionary_size: int = 0,
                 dictionary_nnz: int = 0, input_nnz: int = 0, dictionary_fingerprint: str = "",
                 edge_weight: float = 1.0, logit_scale: float = 20.0, loss_pos_weight: float = 1.0, **kwargs):
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.max_position_embeddings = max_position_embeddings
        self.trigram_vocab_size = trigram_vocab_size
        self.vocab_population = vocab_population
        self.vocab_population_partial_lowercase = vocab_population_partial_lowercase
        self.initialize = initialize
        self.seed = seed
        self.lowercase = lowercase
        self.entire_words = entire_words
        self.dictionary_size = dictionary_size
        self.dictionary_nnz = dictionary_nnz
        self.input_nnz = input_nnz
        self.dictionary_fingerprint = dictionary_fingerprint
        self.edge_weight = edge_weight
        self.logit_scale = logit_scale
        self.loss_pos_weight = loss_pos_weight
        self.vocab_size = dictionary_size  # the ids the tokenizer produces (without extra words)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def hasher_settings(self) -> dict:
        """The keyword arguments of ``tfree_hashing.TrigramHasher`` for this model."""
        return {"vocab_size": self.trigram_vocab_size, "vocab_population": self.vocab_population,
                "vocab_population_partial_lowercase": self.vocab_population_partial_lowercase,
                "initialize": self.initialize, "seed": self.seed, "lowercase": self.lowercase,
                "entire_words": self.entire_words}

    def llama_config(self) -> LlamaConfig:
        """The transformer body: a Llama whose token embedding is the trigram embedding (v rows)."""
        kwargs = dict(vocab_size=self.trigram_vocab_size, hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
                      num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                      rms_norm_eps=self.rms_norm_eps, attention_bias=self.attention_bias, mlp_bias=self.mlp_bias,
                      max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=False,
                      hidden_act="silu", pad_token_id=None)
        if "rope_parameters" in getattr(LlamaConfig, "__dataclass_fields__", {}):  # transformers >= 5
            kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        else:
            kwargs["rope_theta"] = self.rope_theta
        config = LlamaConfig(**kwargs)
        config._attn_implementation = getattr(self, "_attn_implementation", None) or "sdpa"
        return config
