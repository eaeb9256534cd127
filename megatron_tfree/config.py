"""The one typed configuration of megatron_tfree.

A config is a tree of dataclasses (model, tokenizer, data, training, parallel), loaded from YAML and
then patched with ``section.key=value`` overrides from the command line. Everything is validated at
load time: unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key
(and the file) so a user never learns about a typo from a stack trace an hour into a run.

    cfg = load_config("configs/tiny.yaml", ["training.train_iterations=10", "model.hidden_size=64"])
    cfg.save("run/config.yaml")          # the resolved config, stored with every checkpoint
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError


class ConfigError(ValueError, UserError):
    """A config value is missing, unknown, of the wrong type or impossible. The message names the key."""


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    """How text becomes model inputs. Names follow the T-Free reference config where one exists."""

    kind: Literal["tfree", "classic"] = "tfree"
    # T-Free (spec section 2)
    vocab_size: int = 8192
    vocab_population: int = 10  # m: ids per trigram
    vocab_population_partial_lowercase: int = 0  # k: of the m ids, shared with the lower-case trigram
    initialize: Literal["hash", "fast"] = "hash"  # hash = reference-compatible md5; fast = seeded 64-bit
    seed: int = 42  # seed of the `fast` hash family (the md5 family has no seed)
    lowercase: bool = False
    entire_words: bool = False  # hash whole words instead of their trigrams
    end_of_text: str = "<|endoftext|>"
    cache_size: int = 1_000_000  # words kept in the word -> ids cache
    # classic tokenizer (Hugging Face `tokenizers` file); trained on the corpus when the file is missing
    tokenizer_file: str = ""
    classic_vocab_size: int = 32000


@dataclass
class ModelConfig:
    """A Llama-style decoder. The T-Free and classic variants differ only in embedding, head and loss."""

    hidden_size: int = 256
    num_layers: int = 4
    num_attention_heads: int = 4
    num_kv_heads: int = 0  # 0 = same as num_attention_heads (no grouped KV)
    mlp_factor: float = 2.66796875  # SwiGLU inner size = int(mlp_factor * hidden_size) ...
    ffn_hidden_size: int = 0  # ... unless set here (> 0): the SwiGLU inner size itself (e.g. imported models)
    bias: bool = False  # biases on the attention (q, k, v, out) and MLP linears (the reference's bias_terms)
    norm_eps: float = 1e-5
    rotary_embedding_base: float = 10000.0
    dropout: float = 0.0
    init: Literal["pythia", "normal"] = "pythia"
    init_std: float = 0.02  # used by init=normal
    attention: Literal["auto", "flash", "sdpa"] = "auto"
    activation_checkpointing: bool = False
    # T-Free loss (spec section 3): BCE with logits * pos_weight on positives, * loss_scale
    loss_pos_weight: float = 1.0
    loss_scale: float = 1.0
    # T-Free training: head matmul + loss in one op over head_chunk_size vocabulary rows at a time, so
    # the [tokens, v] logits and their gradient never exist in full (evaluation still forms logits)
    fused_head_loss: bool = True
    head_chunk_size: int = 4096


@dataclass
class DataConfig:
    """Where samples come from. An empty ``prefix_paths`` means the built-in default corpus."""

    prefix_paths: list[str] = field(default_factory=list)  # MemoryMap prefixes (aligned or not)
    valid_prefix_paths: list[str] = field(default_factory=list)
    finetuning: bool = False  # prefix_paths hold instruction data (has_loss pieces)
    seq_len: int = 128  # words (T-Free) or tokens (classic) per sample
    aligned_max_bytes: int = 20000  # AlignedMemoryMap item size
    cache_dir: str = ""  # default corpus cache; "" = $MEGATRON_TFREE_CACHE or ~/.cache/megatron_tfree
    num_workers: int = 0
    seed: int = 42
    # multiple-round training: a sample index (.npy of training-set sample ids, written by
    # `python -m megatron_tfree.multiround sample`); when set, training reads exactly these ids in this
    # order, repeated, instead of the shuffled epochs of data.seed ("" = the normal order)
    sample_index: str = ""


@dataclass
class TrainingConfig:
    train_iterations: int = 200
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    # sequences per optimizer step over all data-parallel ranks; 0 = micro_batch_size *
    # gradient_accumulation_steps * dp. When set, gradient_accumulation_steps is derived from it.
    global_batch_size: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_iters: int = 0  # 0 = train_iterations
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    gradient_clipping: float = 1.0  # 0 disables clipping
    seed: int = 42
    save_dir: str = "runs/tiny"
    save_interval: int = 100  # steps; a checkpoint is also written at the end
    load_dir: str = ""  # resume from here ("" = resume from save_dir when it has a `latest`)
    # start a new run from these weights (any checkpoint: run dir, tag dir of any layout, consolidated or
    # imported dir) with a fresh optimizer and schedule; ignored once save_dir has a checkpoint to resume
    init_from: str = ""
    # a collective that does not finish within this many seconds (a hung or dead rank) stops every rank
    collective_timeout: float = 600.0
    # the run owns save_dir (save_dir/owner.lock); a lock of another host is stale after this many
    # seconds without a heartbeat (same host: when its process is gone; same SLURM job: on requeue)
    lock_stale_after: float = 600.0
    keep_checkpoints: int = 0  # keep the newest N checkpoints (0 = all); `latest` is always kept ...
    keep_every: int = 0  # ... and every checkpoint whose step is a multiple of this (0 = none)
    log_interval: int = 10
    eval_interval: int = 100
    eval_iterations: int = 4
    max_skipped_steps: int = 10  # non-finite losses tolerated before the run stops with an error
    tensorboard: bool = True
    sample_prompt: str = ""  # when set, `python -m megatron_tfree.train` prints a generation at the end
    sample_words: int = 40
    sample_temperature: float = 0.0  # 0 = greedy; T-Free decode scores lie in about [-1, 1]: use ~0.02-0.1
    sample_top_k: int = 0  # 0 = no top-k restriction


@dataclass
class ParallelConfig:
    """Layout. Data parallelism is world_size / (tensor * pipe)."""

    tensor: int = 1
    pipe: int = 1
    zero_stage: int = 0
    sequence_parallel: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    # ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML, atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "Config":
        cfg = _build(cls, data, prefix="", source=source)
        validate(cfg, source)
        return cfg


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML; None = all defaults), apply ``section.key=value`` overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    apply_overrides(data, overrides or [])
    return Config.from_dict(data, source=source)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a config dict (in place; also returned)."""
    for ov in overrides:
        _apply_override(data, ov)
    return data


def parse_value(text: str) -> Any:
    """Parse an override's value with YAML rules (``1e-3`` -> float, ``true`` -> bool, ``[a,b]`` -> list)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, _, raw = override.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {override!r}: key must be section.key (e.g. training.lr=1e-3)")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node = nxt
    node[parts[-1]] = _Override(raw, parse_value(raw))


@dataclasses.dataclass(frozen=True)
class _Override:
    """A command-line value: its raw text (kept for string keys, so `sample_prompt=ROMEO:` stays a
    string) and its YAML-parsed value (for every other type)."""

    raw: str
    parsed: Any


def build_section(cls: type, data: Any, prefix: str, source: str) -> Any:
    """An instance of the dataclass ``cls`` from the mapping ``data``, with the checks the config's own
    sections get (unknown keys, types; errors name ``prefix + key`` and ``source``): for tools whose YAML
    carries a section of their own beside the config's (e.g. ``compare:``)."""
    return _build(cls, data, prefix, source)


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} (known keys in {where}: {known})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    if isinstance(value, _Override):
        value = value.raw if tp is str else value.parsed
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".", source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            if isinstance(value, str):  # a single path given on the command line
                value = [value]
            else:
                raise ConfigError(f"{source}: {key} must be a list, got {type(value).__name__}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # "3e-4" in a YAML file is a string in YAML 1.1
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported type {tp}")  # a bug in this file, not user input


# --------------------------------------------------------------------------------------------------
# validation: impossible values, named by key
# --------------------------------------------------------------------------------------------------


def validate(cfg: Config, source: str = "<config>") -> None:
    def bad(key: str, msg: str) -> None:
        raise ConfigError(f"{source}: {key} {msg}")

    def positive(section: Any, name: str, sec: str) -> None:
        if getattr(section, name) <= 0:
            bad(f"{sec}.{name}", f"must be > 0, got {getattr(section, name)}")

    t, m, d, tr, p = cfg.tokenizer, cfg.model, cfg.data, cfg.training, cfg.parallel

    for section_name in ("model", "tokenizer", "data", "training", "parallel"):  # before anything else
        section = getattr(cfg, section_name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                bad(f"{section_name}.{f.name}", f"must be a finite number, got {value}")
    for key, value, limit in (("model.hidden_size", m.hidden_size, 1 << 17), ("model.num_layers", m.num_layers, 4096),
                              ("model.mlp_factor", m.mlp_factor, 64), ("model.ffn_hidden_size", m.ffn_hidden_size, 1 << 20),
                              ("data.seq_len", d.seq_len, 1 << 22), ("training.micro_batch_size", tr.micro_batch_size, 1 << 16)):
        if value > limit:
            bad(key, f"= {value} is beyond any model this trainer is meant for (at most {limit})")

    positive(t, "vocab_size", "tokenizer")
    positive(t, "vocab_population", "tokenizer")
    if t.vocab_population > t.vocab_size:
        bad("tokenizer.vocab_population", f"({t.vocab_population}) must be <= tokenizer.vocab_size ({t.vocab_size})")
    if not 0 <= t.vocab_population_partial_lowercase <= t.vocab_population:
        bad(
            "tokenizer.vocab_population_partial_lowercase",
            f"must be between 0 and tokenizer.vocab_population ({t.vocab_population}), "
            f"got {t.vocab_population_partial_lowercase}",
        )
    if not (t.end_of_text.startswith("<|") and t.end_of_text.endswith("|>")):
        bad("tokenizer.end_of_text", f"must be a special word of the form <|...|>, got {t.end_of_text!r}")
    positive(t, "cache_size", "tokenizer")
    positive(t, "classic_vocab_size", "tokenizer")

    for name in ("hidden_size", "num_layers", "num_attention_heads", "mlp_factor", "norm_eps", "rotary_embedding_base"):
        positive(m, name, "model")
    if m.hidden_size % m.num_attention_heads:
        bad("model.hidden_size", f"({m.hidden_size}) must be divisible by model.num_attention_heads ({m.num_attention_heads})")
    if (m.hidden_size // m.num_attention_heads) % 2:
        bad("model.hidden_size", "/ model.num_attention_heads must be even (rotary embeddings rotate pairs)")
    kv = m.num_kv_heads or m.num_attention_heads
    if kv < 0 or m.num_attention_heads % kv:
        bad("model.num_kv_heads", f"({m.num_kv_heads}) must divide model.num_attention_heads ({m.num_attention_heads})")
    if not 0.0 <= m.dropout < 1.0:
        bad("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.ffn_hidden_size < 0:
        bad("model.ffn_hidden_size", f"must be >= 0 (0 = int(model.mlp_factor * model.hidden_size)), got {m.ffn_hidden_size}")
    positive(m, "init_std", "model")
    positive(m, "loss_pos_weight", "model")
    positive(m, "loss_scale", "model")
    positive(m, "head_chunk_size", "model")

    positive(d, "seq_len", "data")
    positive(d, "aligned_max_bytes", "data")
    if d.num_workers < 0:
        bad("data.num_workers", f"must be >= 0, got {d.num_workers}")
    if d.finetuning and not d.prefix_paths:
        bad("data.finetuning", "needs data.prefix_paths (instruction data converted with tools/prepare_instruct.py)")
    if d.sample_index and not d.sample_index.endswith(".npy"):
        bad("data.sample_index", f"must name a .npy sample index (python -m megatron_tfree.multiround sample --out "
            f"NAME.npy), got {d.sample_index!r}")

    for name in ("train_iterations", "micro_batch_size", "gradient_accumulation_steps", "save_interval",
                 "log_interval", "eval_interval"):
        positive(tr, name, "training")
    if tr.global_batch_size < 0 or tr.global_batch_size % tr.micro_batch_size:
        bad("training.global_batch_size",
            f"({tr.global_batch_size}) must be 0 or a positive multiple of training.micro_batch_size ({tr.micro_batch_size})")
    if tr.eval_iterations < 0:
        bad("training.eval_iterations", f"must be >= 0, got {tr.eval_iterations}")
    if tr.lr <= 0:
        bad("training.lr", f"must be > 0, got {tr.lr}")
    if not 0 <= tr.min_lr <= tr.lr:
        bad("training.min_lr", f"must be between 0 and training.lr ({tr.lr}), got {tr.min_lr}")
    if tr.warmup_steps < 0:
        bad("training.warmup_steps", f"must be >= 0, got {tr.warmup_steps}")
    if tr.lr_decay_iters < 0:
        bad("training.lr_decay_iters", f"must be >= 0, got {tr.lr_decay_iters}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(tr, name) < 1.0:
            bad(f"training.{name}", f"must be in [0, 1), got {getattr(tr, name)}")
    for name in ("weight_decay", "gradient_clipping", "adam_eps"):
        v = getattr(tr, name)
        if v < 0 or not math.isfinite(v):
            bad(f"training.{name}", f"must be a finite number >= 0, got {v}")
    if tr.max_skipped_steps < 0:
        bad("training.max_skipped_steps", f"must be >= 0, got {tr.max_skipped_steps}")
    if tr.sample_temperature < 0:
        bad("training.sample_temperature", f"must be >= 0, got {tr.sample_temperature}")
    if tr.sample_top_k < 0:
        bad("training.sample_top_k", f"must be >= 0, got {tr.sample_top_k}")
    if tr.sample_words <= 0:
        bad("training.sample_words", f"must be > 0, got {tr.sample_words}")
    if not tr.save_dir:
        bad("training.save_dir", "must not be empty")
    for name in ("collective_timeout", "lock_stale_after"):
        positive(tr, name, "training")
    if tr.keep_checkpoints < 0 or tr.keep_every < 0:
        bad("training.keep_checkpoints" if tr.keep_checkpoints < 0 else "training.keep_every", "must be >= 0")
    if tr.init_from and tr.load_dir:
        bad("training.init_from", "and training.load_dir exclude each other: load_dir resumes a run (weights, "
            "optimizer, schedule, data position), init_from starts a new one from weights only")

    positive(p, "tensor", "parallel")
    positive(p, "pipe", "parallel")
    if p.zero_stage not in (0, 1, 2, 3):
        bad("parallel.zero_stage", f"must be 0, 1, 2 or 3, got {p.zero_stage}")
    if p.pipe > 1 and p.zero_stage > 1:
        bad("parallel.zero_stage", f"= {p.zero_stage} cannot be combined with parallel.pipe > 1 "
            "(DeepSpeed supports only ZeRO-0/1 with pipeline parallelism)")
    if m.num_attention_heads % p.tensor:
        bad("parallel.tensor", f"({p.tensor}) must divide model.num_attention_heads ({m.num_attention_heads})")
    if kv % p.tensor:
        bad("parallel.tensor", f"({p.tensor}) must divide the number of KV heads ({kv})")
    if p.sequence_parallel:
        bad("parallel.sequence_parallel", "is not supported yet (the collectives exist; the model does not use "
            "them); leave it false")
    if p.pipe > m.num_layers:
        bad("parallel.pipe", f"({p.pipe}) must be <= model.num_layers ({m.num_layers})")
