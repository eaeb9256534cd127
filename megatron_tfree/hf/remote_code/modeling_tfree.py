"""T-Free causal LM exported by megatron_tfree (Hugging Face remote code; torch + transformers only).

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    out = model.generate(**tok(["Hello", "Once upon a"], return_tensors="pt", padding=True), max_new_tokens=8)
    tok.batch_decode(out, skip_special_tokens=True)

A token is a word. Its input embedding is the sum of the embedding rows of its trigram ids
(``model.embed_tokens`` holds the ``v`` trigram rows; a word's ids, shared ids counted each time, are
stored for the dictionary words and hashed on the fly for the others, ``tfree_hashing.py``). The body
is a ``transformers`` Llama (``model``); the head ``lm_head`` gives ``trigram_logits [B, S, v]``, one
logit per trigram id (what the model was trained on, with binary cross-entropy). ``logits`` are the
decode scores of spec section 4 for the dictionary words (``tfree_scoring.py``), times
``config.logit_scale``, plus columns for the extra words of this process's table that occur in a row's
input (``-inf`` elsewhere), so ``generate`` (greedy, sampling, beam search, KV cache, batches) works
unchanged. Options of the spec: ``edge_weight`` (forward / generate keyword, default
``config.edge_weight``) and ``more_words`` (extra candidate words for every row).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import GenerationMixin, LlamaModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tfree import TFreeConfig, extra_words
from .tfree_hashing import TrigramHasher
from .tfree_scoring import spec_scores, weight_matrix

_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_LLAMA_CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


@dataclass
class TFreeCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``trigram_logits [B, S, v]`` (the head's raw outputs)."""

    trigram_logits: Optional[torch.FloatTensor] = None


class TFreeWords(nn.Module):
    """The dictionary words' input rows and decode patterns (buffers, stored with the weights), and the
    extra words of this process (hashed on demand)."""

    def __init__(self, config: TFreeConfig):
        super().__init__()
        n = config.dictionary_size
        self.register_buffer("input_offsets", torch.zeros(n + 1, dtype=torch.int64))
        self.register_buffer("input_ids", torch.zeros(config.input_nnz, dtype=torch.int32))
        self.register_buffer("pattern_offsets", torch.zeros(n + 1, dtype=torch.int64))
        self.register_buffer("pattern_ids", torch.zeros(config.dictionary_nnz, dtype=torch.int32))
        self.register_buffer("pattern_edge", torch.zeros(config.dictionary_nnz, dtype=torch.uint8))
        self.register_buffer("pattern_c", torch.zeros(n, dtype=torch.int32))
        self.config = config
        self.extra = extra_words(config.dictionary_fingerprint, n)
        self._hasher: Optional[TrigramHasher] = None
        self._extra_cache: dict = {}
        self._matrices: dict = {}

    @property
    def hasher(self) -> TrigramHasher:
        if self._hasher is None:
            self._hasher = TrigramHasher(**self.config.hasher_settings())
        return self._hasher

    def _extra_arrays(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """CSR input rows and patterns of the extra words known so far (rebuilt when the table grows)."""
        key = (len(self.extra), str(device))
        if key not in self._extra_cache:
            words = self.extra.words
            offsets, ids = self.hasher.encode_words(words) if words else (torch.zeros(1, dtype=torch.int64), [])
            p_off, p_ids, p_edge, p_c = [0], [], [], []
            for w in words:
                inner, edge, c = self.hasher.word_patterns(w)
                row = sorted(set(inner.tolist()) | set(edge.tolist()))
                edge_set = set(edge.tolist())
                p_ids += row
                p_edge += [i in edge_set for i in row]
                p_off.append(len(p_ids))
                p_c.append(c)
            self._extra_cache = {key: (torch.as_tensor(offsets, dtype=torch.int64, device=device),
                                       torch.as_tensor(ids, dtype=torch.int32, device=device),
                                       torch.as_tensor(p_off, dtype=torch.int64, device=device),
                                       torch.as_tensor(p_ids, dtype=torch.int32, device=device),
                                       torch.as_tensor(p_edge, dtype=torch.uint8, device=device),
                                       torch.as_tensor(p_c, dtype=torch.int32, device=device))}
        return self._extra_cache[key]

    def input_csr(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(offsets [N + 1], ids)`` of the trigram ids of every position of ``input_ids`` (flattened)."""
        flat = input_ids.reshape(-1).long()
        n = self.config.dictionary_size
        offsets, ids = self.input_offsets, self.input_ids
        if bool((flat >= n).any()) or bool((flat < 0).any()):
            if bool((flat < 0).any()):
                raise ValueError("input ids must be >= 0")
            for i in flat[flat >= n].unique().tolist():
                self.extra.word(i)  # raises a clear error for an id this process never gave out
            e_off, e_ids = self._extra_arrays(flat.device)[:2]
            offsets = torch.cat([offsets, e_off[1:] + offsets[-1]])
            ids = torch.cat([ids, e_ids])
        starts, ends = offsets[flat], offsets[flat + 1]
        lengths = ends - starts
        out_offsets = torch.zeros(flat.numel() + 1, dtype=torch.int64, device=flat.device)
        out_offsets[1:] = lengths.cumsum(0)
        rows = torch.repeat_interleave(starts - out_offsets[:-1], lengths) + torch.arange(
            int(out_offsets[-1]), device=flat.device)
        return out_offsets, ids[rows].long()

    def matrices(self, edge_weight: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(W [n + e, v], c [n + e], e)``: the weight matrix and trigram counts of the dictionary plus
        the ``e`` extra words known so far."""
        e = len(self.extra)
        key = (float(edge_weight), str(device), e)
        if key not in self._matrices:
            offsets, ids, edge, c = self.pattern_offsets, self.pattern_ids, self.pattern_edge, self.pattern_c
            if e:
                _, _, e_off, e_ids, e_edge, e_c = self._extra_arrays(device)
                offsets = torch.cat([offsets, e_off[1:] + offsets[-1]])
                ids, edge, c = torch.cat([ids, e_ids]), torch.cat([edge, e_edge]), torch.cat([c, e_c])
            matrix = weight_matrix(offsets.cpu(), ids.cpu(), edge.cpu(), self.config.trigram_vocab_size, edge_weight)
            self._matrices = {key: (matrix.to(device), c.to(device), e)}
        return self._matrices[key]

    def present_extra(self, input_ids: torch.Tensor, more_words=None) -> torch.Tensor:
        """``[B, e]`` bool: which extra words occur in each row of ``input_ids`` (or are ``more_words``)."""
        if more_words:
            for w in [more_words] if isinstance(more_words, str) else more_words:
                self.extra.id_of(w)
        n, e = self.config.dictionary_size, len(self.extra)
        present = torch.zeros(input_ids.shape[0], e, dtype=torch.bool, device=input_ids.device)
        ids = input_ids.long()
        rows, cols = torch.nonzero(ids >= n, as_tuple=True)
        present[rows, ids[rows, cols] - n] = True
        if more_words:
            for w in [more_words] if isinstance(more_words, str) else more_words:
                present[:, self.extra.id_of(w) - n] = True
        return present


class TFreePreTrainedModel(PreTrainedModel):
    config_class = TFreeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


class TFreeForCausalLM(TFreePreTrainedModel, GenerationMixin):
    """See the module docstring."""

    def __init__(self, config: TFreeConfig):
        super().__init__(config)
        self.model = LlamaModel(config.llama_config())
        self.lm_head = nn.Linear(config.hidden_size, config.trigram_vocab_size, bias=False)
        self.words = TFreeWords(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, S, h]``: per position, the sum of the embedding rows of the word's trigram ids."""
        offsets, ids = self.words.input_csr(input_ids)
        weight = self.model.embed_tokens.weight
        out = nn.functional.embedding_bag(ids, weight, offsets[:-1], mode="sum", include_last_offset=False)
        return out.view(*input_ids.shape, weight.shape[1])

    def word_logits(self, trigram_logits: torch.Tensor, present: torch.Tensor, edge_weight: float) -> torch.Tensor:
        """``[B, S, n + e]``: ``logit_scale`` x decode scores of the dictionary and extra words (extra words
        absent from a row's input are ``-inf`` there)."""
        B, S, v = trigram_logits.shape
        matrix, c, e = self.words.matrices(edge_weight, trigram_logits.device)
        scores = spec_scores(trigram_logits.reshape(B * S, v), matrix, c, self.config.vocab_population)
        scores = scores.view(B, S, -1) * self.config.logit_scale
        if e:
            n = self.config.dictionary_size
            mask = present[:, None, :e].expand(B, S, e)
            scores[..., n:] = scores[..., n:].masked_fill(~mask, float("-inf"))
        return scores

    def forward(self, input_ids: Optional[torch.LongTensor] = None, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, past_key_values=None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                use_cache: Optional[bool] = None, logits_to_keep: int = 0, edge_weight: Optional[float] = None,
                more_words=None, extra_words_present: Optional[torch.Tensor] = None, word_logits: bool = True,
                **kwargs) -> TFreeCausalLMOutput:
        """``logits`` (word scores, see the module docstring; not computed with ``word_logits=False``) and
        ``trigram_logits``; ``labels`` (word ids, -100 ignored) give ``loss``: the cross-entropy of the
        scaled scores (an evaluation figure; the model was trained with the trigram BCE)."""
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids (word ids from the T-Free tokenizer) or inputs_embeds")
            inputs_embeds = self.embed(input_ids)
        outputs = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, **{_LLAMA_CACHE_ARG: cache}, **kwargs)
        hidden = outputs[0]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        trigram_logits = self.lm_head(hidden).float()
        if not word_logits:
            return TFreeCausalLMOutput(trigram_logits=trigram_logits, **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD, None)})
        if extra_words_present is None:
            ids = input_ids if input_ids is not None else torch.zeros(hidden.shape[0], 0, dtype=torch.long)
            extra_words_present = self.words.present_extra(ids, more_words)
        logits = self.word_logits(trigram_logits, extra_words_present,
                                  self.config.edge_weight if edge_weight is None else edge_weight)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss = nn.functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
        return TFreeCausalLMOutput(loss=loss, logits=logits, trigram_logits=trigram_logits,
                                   hidden_states=getattr(outputs, "hidden_states", None),
                                   attentions=getattr(outputs, "attentions", None),
                                   **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD, None)})

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args, **kwargs):
        """As GenerationMixin's, plus which extra words each row's whole sequence holds (a cached step
        only sees its newest word)."""
        more_words = kwargs.get("more_words")
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        inputs["extra_words_present"] = self.words.present_extra(input_ids, more_words)
        return inputs
