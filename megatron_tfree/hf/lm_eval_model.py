"""lm-evaluation-harness model ``tfree``: T-Free checkpoints (native, any layout) and their HF exports.

    python -m megatron_tfree.eval --model tfree --model_args pretrained=runs/tiny --tasks hellaswag
    lm_eval.simple_evaluate(model=TFreeLM("hf/tiny"), tasks=[...])      # Python API (import registers it)

Classic models need nothing of this: their export is a plain Llama for lm-eval's own ``hf`` model.

What the numbers mean (T-Free has no token distribution, so they are defined here):

* ``loglikelihood(context, continuation)``: the sum, over the continuation's words, of the natural log
  of p(word | preceding words), where p is the calibrated word probability that bits per byte uses
  (:meth:`~megatron_tfree.tokenizer.dictionary.DecodeDictionary.likelihood_log_probs`): a softmax over
  the decode dictionary extended with the words of the context and of every continuation requested
  for that context (otherwise an unseen word would have probability 0; one dictionary per context,
  so the choices of a multiple-choice question are scored against the same candidates).
  ``is_greedy``: every continuation word is the most likely word of that extended dictionary. The
  words of the continuation are those of ``context + continuation`` after the longest common prefix
  with the context's words (the word split of the joint text decides boundaries, e.g. the space of
  " Paris" belongs to the continuation).
* ``loglikelihood_rolling(text)``: the same log-probability of every word of the text, predicted once
  (lm-eval's rolling windows of ``max_length`` words when the text is longer), so ``word_perplexity``,
  ``byte_perplexity`` and ``bits_per_byte`` of lm-eval follow from it.
* ``generate_until``: the model's own decoding (spec section 4: dictionary scores, greedy unless
  ``do_sample``; ``max_gen_toks`` counts words), cut at the first ``until`` string.

Every sequence starts from ``<|endoftext|>``, the boundary each document follows in training, so the
first word is scored too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..tokenizer.dictionary import DecodeDictionary


class NativeBackend:
    """A native checkpoint through :class:`~megatron_tfree.inference.InferencePipe`."""

    def __init__(self, path: str, device: str = "cpu"):
        from ..checkpoint import CheckpointReader
        from ..inference import InferencePipe

        reader = CheckpointReader(path)
        self.pipe = InferencePipe.from_checkpoint(path, device=device)
        self.tokenizer, self.dictionary = self.pipe.tokenizer, self.pipe.dictionary
        self.pos_weight = reader.cfg.model.loss_pos_weight
        self.max_length = reader.cfg.data.seq_len

    def unit_logits(self, units: list[str]) -> torch.Tensor:
        return self.pipe.unit_logits(units)

    def generate(self, contexts: list[str], max_words: int, temperature: float, seed: Optional[int]) -> list[str]:
        return self.pipe.generate(contexts, max_words=max_words, temperature=temperature, seed=seed)


class ExportBackend:
    """A Hugging Face export (``tools/convert2hf.py``) through transformers (``trust_remote_code``)."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..tokenizer import TrigramTokenizer

        self.hf_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).to(device).eval()
        c = self.model.config
        self.tokenizer = TrigramTokenizer(**c.hasher_settings(), end_of_text=self.hf_tokenizer.eos_token)
        w = self.model.words
        arrays = {"offsets": w.pattern_offsets.cpu().numpy(), "ids": w.pattern_ids.cpu().numpy(),
                  "edge": w.pattern_edge.cpu().numpy(), "c": w.pattern_c.cpu().numpy()}
        self.dictionary = DecodeDictionary.from_arrays(self.hf_tokenizer.words, arrays, c.trigram_vocab_size,
                                                       c.vocab_population, {}, None)
        self.dictionary._tokenizer = self.tokenizer
        self.pos_weight = c.loss_pos_weight
        self.max_length = c.max_position_embeddings
        self.device = device

    @torch.no_grad()
    def unit_logits(self, units: list[str]) -> torch.Tensor:
        ids = torch.as_tensor([self.hf_tokenizer.convert_tokens_to_ids(units)], device=self.device)
        return self.model(input_ids=ids, word_logits=False).trigram_logits[0].float().cpu()

    @torch.no_grad()
    def generate(self, contexts: list[str], max_words: int, temperature: float, seed: Optional[int]) -> list[str]:
        tok = self.hf_tokenizer
        batch = tok(contexts, return_tensors="pt", padding=True).to(self.device)
        sample = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(**batch, max_new_tokens=max_words, **sample)
        new = out[:, batch["input_ids"].shape[1]:]
        texts = []
        for context, ids in zip(contexts, new.tolist()):
            words = tok.convert_ids_to_tokens(ids)
            if tok.eos_token in words:
                words = words[: words.index(tok.eos_token)]
            units = self.tokenizer.encode(context).units or [tok.eos_token]
            full, before = tok.convert_tokens_to_string(units + words), tok.convert_tokens_to_string(units)
            texts.append(full[len(before):])
        return texts


def load_backend(pretrained: str, device: str = "cpu") -> Any:
    """The backend of a native checkpoint or an HF export (a folder whose config.json is a T-Free model)."""
    config = Path(pretrained) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("model_type") == "tfree":
        return ExportBackend(pretrained, device)
    return NativeBackend(pretrained, device)


@register_model("tfree")
class TFreeLM(LM):
    """See the module docstring. ``pretrained``: a native checkpoint or an HF export of a T-Free model;
    ``max_length``: words per forward (default: the training sequence length)."""

    def __init__(self, pretrained: str, device: Optional[str] = None, max_length: Optional[int] = None,
                 batch_size: int = 1, **kwargs: Any):
        super().__init__()
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI asks for cuda by default
        self.backend = load_backend(str(pretrained), device)
        self.max_length = int(max_length or self.backend.max_length)
        self.batch_size = int(batch_size)
        self.eot = self.backend.tokenizer.end_of_text

    # ------------------------------------------------------------------ scoring
    def _extended(self, words: tuple[str, ...]) -> DecodeDictionary:
        """The dictionary plus ``words`` (the last one kept: the choices of a question come in a row)."""
        if getattr(self, "_last", (None,))[0] != words:
            self._last = (words, self.backend.dictionary.add_words(list(words)))
        return self._last[1]

    def units(self, text: str) -> list[str]:
        return self.backend.tokenizer.encode(text).units

    def _score(self, context: list[str], targets: list[str], extra_words: Sequence[str]) -> tuple[float, bool]:
        """ln p of ``targets`` after ``[eot] + context``, greedy flag. Each forward sees at most
        ``max_length`` words: the targets are scored in chunks of ``max_length``, each after the words just
        before it (a continuation longer than ``max_length`` is scored window by window)."""
        if not targets:
            return 0.0, True
        full = [self.eot] + context + targets
        rows = []
        for a in range(len(full) - len(targets), len(full), self.max_length):
            b = min(a + self.max_length, len(full))  # predict full[a:b] from the words before each
            rows.append(self.backend.unit_logits(full[max(0, b - 1 - self.max_length):b - 1])[-(b - a):])
        logits = torch.cat(rows)
        ext = self._extended(tuple(dict.fromkeys([*extra_words, *targets])))
        logp = ext.likelihood_log_probs(logits, self.backend.pos_weight)
        index = torch.as_tensor([ext.index_of(w) for w in targets])
        picked = logp.gather(1, index[:, None])[:, 0]
        greedy = bool((logp.argmax(dim=1) == index).all())
        return float(picked.double().sum()), greedy

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        split = []  # (context words, continuation words) per request
        words_of: dict[str, dict[str, None]] = {}  # context -> the words of all its requests, in order
        for req in requests:
            context, continuation = req.args
            whole, ctx = self.units(context + continuation), self.units(context)
            p = 0
            while p < min(len(whole), len(ctx)) and whole[p] == ctx[p]:
                p += 1
            split.append((whole[:p], whole[p:]))
            words_of.setdefault(context, {}).update(dict.fromkeys(whole))
        out = []
        for req, (context_words, targets) in tqdm(list(zip(requests, split)), desc="tfree loglikelihood",
                                                   disable=disable_tqdm):
            result = self._score(context_words, targets, list(words_of[req.args[0]]))
            out.append(result)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in tqdm(requests, desc="tfree loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            words = self.units(text)
            total = 0.0
            windows = get_rolling_token_windows(token_list=words, prefix_token=self.eot, max_seq_len=self.max_length,
                                                context_len=1)
            for context, targets in map(make_disjoint_window, windows):
                context = list(context[1:] if context[:1] == [self.eot] else context)  # _score adds the eot
                total += self._score(context, list(targets), words)[0]
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="tfree generate_until", disable=disable_tqdm):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_words = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            text = self.backend.generate([context], max_words, temperature, kwargs.pop("seed", None))[0]
            cut = min((text.find(s) for s in until if s and s in text), default=-1)
            text = text[:cut] if cut >= 0 else text
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out
