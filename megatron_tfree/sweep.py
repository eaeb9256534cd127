"""Depth / width sweep at a parameter budget: ``python -m megatron_tfree.plan --sweep --params 1e9``.

    python -m megatron_tfree.plan --sweep --params 1e9 --config configs/1b.yaml --nodes 8
    python -m megatron_tfree.plan --sweep --params 1e9 --config configs/1b.yaml --kind both \\
        --vocab tfree:8192,classic:32000 --mlp-ratios 2.66796875,4 --plot sweep.png --json sweep.json
    python -m megatron_tfree.plan --sweep --params 2e6 --no-measure            # built-in defaults

**Candidates.** Every combination of tokenizer kind (``--kind``), vocabulary (``--vocab``: T-Free
``v`` or BPE size), SwiGLU ratio (``--mlp-ratios``: inner size ``int(ratio * hidden)``, as the
model), width (``--widths``, multiples of ``--head-dim``; heads = width / head dim) and depth.
Without ``--depths`` each (kind, vocab, ratio, width) contributes its one depth closest to the
budget (from 1 to :data:`MAX_DEPTH`); with ``--depths`` every listed depth. Kept are those whose
total parameters are within ``--tolerance`` (relative) of ``--params`` and whose aspect ratio
hidden / layers is within ``--aspect`` (default 16-1024: leaves out one-layer giants and towers a few
units wide; ``--aspect any`` keeps all). Everything else (precision,
micro batch, ``data.seq_len``, activation checkpointing, ZeRO stage, tensor / pipe, grouped KV:
the base config's heads per KV head) comes from ``--config`` (default: the built-in defaults) and
``section.key=value`` overrides, as for the planner.

**One set of rules.** Parameters are :func:`megatron_tfree.plan.param_counts` of the candidate's
config (a test checks them against the real model built on the meta device); memory per GPU is
:func:`megatron_tfree.plan.make_plan` of the candidate on ``--nodes`` x ``--gpus-per-node`` (worst
pipeline stage, configured ZeRO stage and checkpointing; a layout the candidate cannot use, e.g.
``parallel.tensor`` not dividing its heads, is reported instead of a number).

**FLOPs per word** (training: forward + backward), per position (a T-Free word or a BPE token)
``6 * P_blocks + 6 * h * v + 12 * L * h * S`` (the PaLM / Chinchilla convention: 2 FLOPs per
multiply-add, backward twice the forward; ``P_blocks`` the blocks' parameters, norm weights and
biases counted as if they were matmul weights, < 0.1%; ``h * v`` the untied head; ``12 L h S``
attention scores and values over the full ``S = data.seq_len``, causal masking not discounted;
embedding lookups not counted: T-Free's bag sum of ~60 rows is ~60 h adds). Times positions per
word: ``--tfree-units-per-word`` (default 1.0) and ``--bpe-tokens-per-word`` (default 1.3, the
usual rule of thumb for English BPE). These are assumptions, not measurements: a T-Free word is
smaller than a whitespace word (punctuation, every digit and some spacing markers are words of
their own), so for a like-for-like comparison count both on your corpus and pass them.

**Twins** (``--measure``, the default): each listed candidate is built as the real
:class:`~megatron_tfree.model.GPTModel` at ``1/s`` of its hidden size (head count kept, head dim
divided, at least 8), depth (rounded, at least 1), vocabulary and sequence length, so the FLOPs
split between blocks, attention and head stays about the original's (the SwiGLU ratio, grouped KV
and kind kept); ``s = --twin-scale`` (default: the smallest s, 1, 2, .., 16, then steps of ~25%, at
which every listed twin trains a step in at most :data:`TWIN_STEP_FLOPS`; one ``s`` for the whole
table so twins compare).
On the CPU, in fp32, with random ids (T-Free: ``m * 6`` per word as the planner assumes), each twin
(``--twin-threads``, default 1: on a shared 2-core machine two threads made small matmuls 100x
slower) runs ``--twin-warmup`` untimed forward + backward passes of ``--twin-batch`` sequences, then
``--twin-steps`` timed rounds of one step of every twin (interleaved, so a change of load on the
machine hits all twins alike); ``words_per_s`` is the twin's positions per second at its median
step time divided by the positions per word. A twin ranks shapes on this machine; it does not
predict GPU throughput (and a shallow model's twin rounds to one layer).

**Output.** A Markdown table (rows sorted by ``--sort``, default FLOPs per word; the first
``--top`` rows listed and measured, default 10, 0 = all); ``--plot PATH.png`` draws FLOPs per word
and twin words/s against depth and the parameter split of every listed row. ``--json PATH``
(``-`` = stdout instead of the table) writes: ``budget``, ``tolerance``, ``aspect`` ([min, max],
null = no bound), ``kinds``, ``units_per_word`` ({kind: positions per word}), ``sort``, ``layout``
({nodes, gpus_per_node, tensor, pipe, zero_stage, precision, micro_batch_size, seq_len,
activation_checkpointing, gpu_memory_gib}), ``within_tolerance`` (count before ``--top``),
``twin`` (null or {scale, batch, steps, warmup, threads}) and ``candidates``, the listed rows, each
{``kind``, ``vocab``, ``layers``, ``hidden``, ``heads``, ``kv_heads``, ``head_dim``, ``mlp_ratio``,
``ffn``, ``aspect`` (hidden / layers), ``params`` (the planner's {embedding, blocks, output,
total}), ``embedding_head_params`` (embedding + head), ``other_params`` (blocks + final norm),
``budget_error`` (total / budget - 1), ``flops_per_position``, ``flops_per_word``, ``memory``
({bytes, gib, fits, error}), ``twin`` (null or {layers, hidden, heads, kv_heads, vocab, seq_len,
batch, params, seconds_per_step, step_seconds, words_per_s, flops_per_word, gflops_per_s})}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from typing import Any, Optional, Sequence

import torch

from .config import Config, ConfigError
from .model.transformer import mlp_inner_size
from .plan import GIB, TRIGRAMS_PER_WORD, make_plan, param_counts, vocab_size

KINDS = ("tfree", "classic")
MAX_DEPTH = 256  # deepest candidate without --depths
MAX_WIDTH = 1 << 15  # widest candidate without --widths
DEFAULT_ASPECT = (16.0, 1024.0)  # hidden / layers kept by default (leaves out one-layer giants, 4-wide towers)
TWIN_STEP_FLOPS = 3e9  # the automatic twin scale keeps every twin's training step at most this many FLOPs
TWIN_MIN_HEAD_DIM = 8
TWIN_MIN_SEQ_LEN = 16
TWIN_MIN_VOCAB = 64
SORT_KEYS = ("flops", "params", "depth", "width", "memory")
DEFAULT_UNITS_PER_WORD = {"tfree": 1.0, "classic": 1.3}  # assumptions, see the module docstring


class SweepError(ConfigError):
    """A sweep option is impossible, or no configuration comes within the tolerance of the budget."""


# --------------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SweepOptions:
    params: float
    tolerance: float = 0.15
    kinds: tuple[str, ...] = ()  # () = the config's kind
    vocab: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # kind -> sizes; missing = the config's
    depths: Optional[list[int]] = None  # None = the depth closest to the budget per width
    widths: Optional[list[int]] = None  # None = head_dim * {1, 2, 3, 4, 6, 8, 12, ...} up to MAX_WIDTH
    mlp_ratios: Optional[list[float]] = None  # None = the config's ratio and 4
    aspect: tuple[float, float] = DEFAULT_ASPECT  # hidden / layers range kept
    head_dim: int = 0  # 0 = the config's
    units_per_word: dict[str, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_UNITS_PER_WORD))
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    flash: Optional[bool] = None
    sort: str = "flops"
    top: int = 10  # rows listed (and measured); 0 = all
    measure: bool = True
    twin_scale: int = 0  # 0 = automatic
    twin_batch: int = 2
    twin_steps: int = 5
    twin_warmup: int = 1
    twin_threads: int = 1


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"8,12,16-20"`` -> ``[8, 12, 16, 17, 18, 19, 20]`` (sorted, unique, all > 0)."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(float(x)) for x in part.split("-"))
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(float(part)))
    except ValueError:
        raise SweepError(f"{flag} expects integers and ranges like 8,12,16-20, got {text!r}") from None
    if not out or min(out) <= 0:
        raise SweepError(f"{flag} needs positive integers, got {text!r}")
    return sorted(out)


def parse_float_list(text: str, flag: str) -> list[float]:
    try:
        out = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SweepError(f"{flag} expects numbers separated by commas, got {text!r}") from None
    if not out or min(out) <= 0 or not all(math.isfinite(x) for x in out):
        raise SweepError(f"{flag} needs positive numbers, got {text!r}")
    return out


def parse_range(text: str, flag: str) -> tuple[float, float]:
    """``"16-1024"`` -> ``(16.0, 1024.0)``; ``"any"`` = ``(0, inf)``; a missing bound is open (``"32-"``)."""
    if text.strip().lower() in ("any", "all", "none"):
        return 0.0, math.inf
    lo, sep, hi = text.partition("-")
    try:
        out = (float(lo) if lo.strip() else 0.0, float(hi) if hi.strip() else math.inf)
    except ValueError:
        out = (math.nan, math.nan)
    if not sep or not out[0] <= out[1] or out[0] < 0:
        raise SweepError(f"{flag} expects MIN-MAX (e.g. 16-1024, 32-, or any), got {text!r}")
    return out


def parse_vocab(text: str) -> dict[str, list[int]]:
    """``"8192,32000"`` (both kinds) or ``"tfree:8192,16384,classic:32000"`` (a ``kind:`` prefix applies
    to the sizes after it until the next prefix; ``bpe`` = ``classic``)."""
    out: dict[str, set[int]] = {}
    current: tuple[str, ...] = KINDS
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if ":" in part:
            kind, _, part = part.partition(":")
            kind = {"bpe": "classic"}.get(kind.strip().lower(), kind.strip().lower())
            if kind not in KINDS:
                raise SweepError(f"--vocab: unknown kind {kind!r} (tfree, classic or bpe)")
            current = (kind,)
        try:
            size = int(float(part))
        except ValueError:
            raise SweepError(f"--vocab expects sizes like 8192,tfree:16384,classic:32000, got {text!r}") from None
        if size <= 0:
            raise SweepError(f"--vocab sizes must be > 0, got {size}")
        for kind in current:
            out.setdefault(kind, set()).add(size)
    return {k: sorted(v) for k, v in out.items()}


def default_widths(head_dim: int) -> list[int]:
    """``head_dim`` times 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5 times them)."""
    heads, k = set(), 1
    while k * head_dim <= MAX_WIDTH:
        heads.update({k, 3 * k // 2} if k > 1 else {1})
        k *= 2
    return sorted(h * head_dim for h in heads if h * head_dim <= MAX_WIDTH)


def options_from_args(args: argparse.Namespace, cfg: Config) -> SweepOptions:
    """The sweep options of the planner's command line (see :func:`add_arguments`)."""
    if args.params is None:
        raise SweepError("--sweep needs --params (the parameter budget, e.g. 1e9)")
    kinds = {"tfree": ("tfree",), "classic": ("classic",), "bpe": ("classic",), "both": KINDS, None: ()}[args.kind]
    units = dict(DEFAULT_UNITS_PER_WORD)
    if args.tfree_units_per_word is not None:
        units["tfree"] = args.tfree_units_per_word
    if args.bpe_tokens_per_word is not None:
        units["classic"] = args.bpe_tokens_per_word
    o = SweepOptions(
        params=args.params, kinds=kinds, units_per_word=units,
        vocab=parse_vocab(args.vocab) if args.vocab else {},
        depths=parse_int_list(args.depths, "--depths") if args.depths else None,
        widths=parse_int_list(args.widths, "--widths") if args.widths else None,
        mlp_ratios=parse_float_list(args.mlp_ratios, "--mlp-ratios") if args.mlp_ratios else None,
        aspect=parse_range(args.aspect, "--aspect") if args.aspect else DEFAULT_ASPECT,
        head_dim=args.head_dim or 0, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory, flash=None if args.attention is None else args.attention == "flash",
        measure=True if args.measure is None else args.measure,
    )
    for name in ("tolerance", "sort", "top", "twin_scale", "twin_batch", "twin_steps", "twin_warmup", "twin_threads"):
        if getattr(args, name) is not None:
            setattr(o, name, getattr(args, name))
    return o


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options (all default to None: the planner refuses them without ``--sweep``)."""
    g = p.add_argument_group("depth / width sweep (--sweep; see megatron_tfree/sweep.py)")
    g.add_argument("--sweep", action="store_true",
                   help="list the configurations of a parameter budget instead of planning --config's model")
    g.add_argument("--params", type=float, default=None, help="parameter budget (total, e.g. 1e9)")
    g.add_argument("--tolerance", type=float, default=None, help="relative tolerance around --params (default 0.15)")
    g.add_argument("--kind", choices=["tfree", "classic", "bpe", "both"], default=None,
                   help="tokenizer kind(s) (default: the config's)")
    g.add_argument("--vocab", default=None, metavar="LIST",
                   help="vocabulary sizes, e.g. 8192,16384 or tfree:8192,classic:32000 (default: the config's "
                        "tokenizer.vocab_size / classic_vocab_size)")
    g.add_argument("--depths", default=None, metavar="LIST",
                   help="layer counts, e.g. 8,12,16-24 (default: per width the depth closest to the budget)")
    g.add_argument("--widths", default=None, metavar="LIST",
                   help="hidden sizes, multiples of --head-dim (default: head dim x 1,2,3,4,6,8,12,16,...)")
    g.add_argument("--mlp-ratios", default=None, metavar="LIST",
                   help="SwiGLU inner size / hidden size (default: the config's model.mlp_factor and 4)")
    g.add_argument("--head-dim", type=int, default=None, help="attention head size (default: the config's)")
    g.add_argument("--aspect", default=None, metavar="MIN-MAX",
                   help=f"keep hidden/layers in this range (default {DEFAULT_ASPECT[0]:g}-{DEFAULT_ASPECT[1]:g}; any = all)")
    g.add_argument("--tfree-units-per-word", type=float, default=None,
                   help="T-Free positions per word for FLOPs and words/s (default 1.0)")
    g.add_argument("--bpe-tokens-per-word", type=float, default=None,
                   help="BPE tokens per word for FLOPs and words/s (default 1.3)")
    g.add_argument("--sort", choices=SORT_KEYS, default=None,
                   help="table order: FLOPs per word (default), distance to the budget, depth, width, memory")
    g.add_argument("--top", type=int, default=None, help="rows listed and measured (default 10; 0 = all)")
    g.add_argument("--measure", action=argparse.BooleanOptionalAction, default=None,
                   help="time a scaled-down twin of every listed row on the CPU (default: on)")
    g.add_argument("--twin-scale", type=int, default=None,
                   help="twins are 1/S of hidden, layers, vocab and seq_len (default: automatic, one S for all)")
    g.add_argument("--twin-batch", type=int, default=None, help="twin micro batch (default 2)")
    g.add_argument("--twin-steps", type=int, default=None, help="timed twin steps (default 5; median)")
    g.add_argument("--twin-warmup", type=int, default=None, help="untimed twin steps first (default 1)")
    g.add_argument("--twin-threads", type=int, default=None,
                   help="torch CPU threads while timing twins (default 1: steady on a shared machine)")
    g.add_argument("--plot", default=None, metavar="PATH.png", help="also draw the sweep into a PNG")


SWEEP_ONLY = ("params", "tolerance", "kind", "vocab", "depths", "widths", "mlp_ratios", "head_dim", "aspect",
              "tfree_units_per_word", "bpe_tokens_per_word", "sort", "top", "measure", "twin_scale", "twin_batch",
              "twin_steps", "twin_warmup", "twin_threads", "plot")


def check_options(o: SweepOptions, cfg: Config) -> SweepOptions:
    """A copy of ``o`` with the defaults from ``cfg`` filled in; impossible values raise a
    :class:`SweepError` naming the flag."""
    o = dataclasses.replace(o, vocab={k: list(v) for k, v in o.vocab.items()},
                            units_per_word=dict(o.units_per_word))
    if not (math.isfinite(o.params) and o.params >= 1):
        raise SweepError(f"--params must be a positive number of parameters, got {o.params:g}")
    if not 0 < o.tolerance < 1:
        raise SweepError(f"--tolerance must be in (0, 1), got {o.tolerance:g}")
    for kind, u in o.units_per_word.items():
        if not (math.isfinite(u) and u > 0):
            flag = "--tfree-units-per-word" if kind == "tfree" else "--bpe-tokens-per-word"
            raise SweepError(f"{flag} must be > 0, got {u:g}")
    for flag, value, low in (("--top", o.top, 0), ("--twin-scale", o.twin_scale, 0), ("--twin-batch", o.twin_batch, 1),
                             ("--twin-steps", o.twin_steps, 1), ("--twin-warmup", o.twin_warmup, 0),
                             ("--twin-threads", o.twin_threads, 1)):
        if value < low:
            raise SweepError(f"{flag} must be >= {low}, got {value}")
    m, t = cfg.model, cfg.tokenizer
    o.kinds = o.kinds or (t.kind,)
    for kind in o.kinds:
        o.vocab.setdefault(kind, [t.vocab_size if kind == "tfree" else t.classic_vocab_size])
    if "tfree" in o.kinds and min(o.vocab["tfree"]) < t.vocab_population:
        raise SweepError(f"--vocab: a T-Free vocabulary ({min(o.vocab['tfree'])}) must be >= "
                         f"tokenizer.vocab_population ({t.vocab_population})")
    o.vocab = {k: v for k, v in o.vocab.items() if k in o.kinds}
    o.head_dim = o.head_dim or m.hidden_size // m.num_attention_heads
    if o.head_dim <= 0 or o.head_dim % 2:
        raise SweepError(f"--head-dim must be even and > 0 (rotary embeddings rotate pairs), got {o.head_dim}")
    if o.widths is None:
        o.widths = default_widths(o.head_dim)
    bad = [w for w in o.widths if w % o.head_dim]
    if bad:
        raise SweepError(f"--widths must be multiples of the head dim {o.head_dim} (--head-dim), got {bad[0]}")
    if o.mlp_ratios is None:
        own = mlp_inner_size(m) / m.hidden_size if m.ffn_hidden_size else m.mlp_factor
        o.mlp_ratios = sorted({own, 4.0})
    return o


# --------------------------------------------------------------------------------------------------
# candidates: the planner's own rules
# --------------------------------------------------------------------------------------------------


def kv_group(cfg: Config) -> int:
    """Query heads per KV head of ``cfg`` (1 without grouped KV)."""
    m = cfg.model
    return m.num_attention_heads // (m.num_kv_heads or m.num_attention_heads)


def shape_config(base: Config, kind: str, vocab: int, layers: int, hidden: int, heads: int, mlp_ratio: float,
                 kv_heads: int = 0) -> Config:
    """``base`` with the model shape and tokenizer kind / vocabulary of a candidate (nothing else changes)."""
    model = dataclasses.replace(base.model, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                                num_kv_heads=0 if kv_heads in (0, heads) else kv_heads, mlp_factor=mlp_ratio,
                                ffn_hidden_size=0)
    vocab_key = "vocab_size" if kind == "tfree" else "classic_vocab_size"
    tokenizer = dataclasses.replace(base.tokenizer, kind=kind, **{vocab_key: vocab})
    return dataclasses.replace(base, model=model, tokenizer=tokenizer)


def flops_per_position(cfg: Config) -> int:
    """Training FLOPs (forward + backward) of one position: ``6 P_blocks + 6 h v + 12 L h S``."""
    m = cfg.model
    return (6 * param_counts(cfg)["blocks"] + 6 * m.hidden_size * vocab_size(cfg)
            + 12 * m.num_layers * m.hidden_size * cfg.data.seq_len)


@dataclasses.dataclass
class Candidate:
    cfg: Config
    units_per_word: float

    @property
    def kind(self) -> str:
        return self.cfg.tokenizer.kind

    @property
    def params(self) -> dict[str, int]:
        return param_counts(self.cfg)

    @property
    def aspect(self) -> float:
        return self.cfg.model.hidden_size / self.cfg.model.num_layers

    def row(self, budget: float) -> dict[str, Any]:
        """The JSON-able description (without memory and twin)."""
        m, p = self.cfg.model, self.params
        fpp = flops_per_position(self.cfg)
        return {
            "kind": self.kind, "vocab": vocab_size(self.cfg), "layers": m.num_layers, "hidden": m.hidden_size,
            "heads": m.num_attention_heads, "kv_heads": m.num_kv_heads or m.num_attention_heads,
            "head_dim": m.hidden_size // m.num_attention_heads, "mlp_ratio": m.mlp_factor,
            "ffn": mlp_inner_size(m), "aspect": m.hidden_size / m.num_layers, "params": p,
            "embedding_head_params": p["embedding"] + p["output"] - m.hidden_size,  # the final norm is not the head
            "other_params": p["blocks"] + m.hidden_size, "budget_error": p["total"] / budget - 1,
            "flops_per_position": fpp, "flops_per_word": fpp * self.units_per_word,
        }


def enumerate_candidates(base: Config, o: SweepOptions) -> tuple[list[Candidate], Optional[Candidate]]:
    """``(within tolerance, closest overall)``; see the module docstring for the grid."""
    within: list[Candidate] = []
    closest: Optional[Candidate] = None
    best_err = math.inf
    g = kv_group(base)
    for kind in o.kinds:
        for vocab in o.vocab[kind]:
            for ratio in o.mlp_ratios or []:
                for hidden in o.widths or []:
                    heads = hidden // o.head_dim
                    if heads % g:
                        continue  # the config's grouped KV does not divide this head count
                    make = lambda L: shape_config(base, kind, vocab, L, hidden, heads, ratio, heads // g)  # noqa: E731
                    if o.depths is not None:
                        depths = o.depths
                    else:  # the planner's count is affine in the depth: the closest depth is next to this one
                        one, two = param_counts(make(1))["total"], param_counts(make(2))["total"]
                        guess = 1 + (o.params - one) / (two - one)
                        depths = sorted({min(max(d, 1), MAX_DEPTH) for d in (math.floor(guess), math.ceil(guess))})
                    scored = []
                    for L in depths:
                        cand = Candidate(make(L), o.units_per_word[kind])
                        err = abs(cand.params["total"] / o.params - 1)
                        scored.append((err, cand))
                        if err < best_err:
                            best_err, closest = err, cand
                    if o.depths is None:
                        scored = [min(scored, key=lambda x: x[0])]
                    within += [c for err, c in scored if err <= o.tolerance and in_range(c.aspect, o.aspect)]
    return within, closest


def in_range(x: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= x <= bounds[1]


def _describe(c: Candidate) -> str:
    m = c.cfg.model
    return (f"{c.kind} vocab {vocab_size(c.cfg):,}, layers {m.num_layers}, hidden {m.hidden_size}, "
            f"MLP ratio {m.mlp_factor:g}: {c.params['total']:,} parameters")


# --------------------------------------------------------------------------------------------------
# twins: measured on this CPU
# --------------------------------------------------------------------------------------------------


def twin_config(cfg: Config, scale: int) -> Config:
    """``cfg`` at 1/``scale``: hidden (heads kept while the head dim stays >= 8), layers, vocabulary and
    sequence length; SwiGLU ratio, grouped KV and kind kept; fp32 (the twin runs on the CPU)."""
    m, t = cfg.model, cfg.tokenizer
    heads, g = m.num_attention_heads, kv_group(cfg)
    d = max(TWIN_MIN_HEAD_DIM, 2 * round(m.hidden_size / heads / scale / 2))
    heads2 = max(1, round(m.hidden_size / scale / d))
    if heads2 >= g:
        heads2 -= heads2 % g
        kv2 = heads2 // g
    else:
        kv2 = 1
    layers = max(1, round(m.num_layers / scale))
    vocab = max(TWIN_MIN_VOCAB, t.vocab_population + 1 if t.kind == "tfree" else 0, round(vocab_size(cfg) / scale))
    ratio = mlp_inner_size(m) / m.hidden_size
    twin = shape_config(cfg, t.kind, vocab, layers, heads2 * d, heads2, ratio, kv2)
    data = dataclasses.replace(cfg.data, seq_len=max(TWIN_MIN_SEQ_LEN, cfg.data.seq_len // scale))
    training = dataclasses.replace(cfg.training, precision="fp32")
    return dataclasses.replace(twin, data=data, training=training)


def twin_step_flops(twin: Config, batch: int) -> int:
    """Training FLOPs of one twin step (``batch`` sequences of the twin's ``data.seq_len``)."""
    return flops_per_position(twin) * batch * twin.data.seq_len


def auto_twin_scale(cands: Sequence[Candidate], batch: int, target: float = TWIN_STEP_FLOPS) -> int:
    """The smallest scale (1, 2, ..., 16, then steps of about 25%) at which every twin of ``cands`` trains a
    step of ``batch`` sequences in at most ``target`` FLOPs (about 0.2 s on one CPU core)."""
    s = 1
    while s < 4096 and max(twin_step_flops(twin_config(c.cfg, s), batch) for c in cands) > target:
        s = s + 1 if s < 16 else s * 5 // 4
    return s


def random_batch(cfg: Config, batch: int, seed: int = 0):
    """A training batch of random ids: T-Free ``m * TRIGRAMS_PER_WORD`` input and target ids per word (as
    the planner assumes), classic one; positions 0..S-1, one document per row, all weights 1."""
    from .data.batch import Batch

    S, v = cfg.data.seq_len, vocab_size(cfg)
    per = cfg.tokenizer.vocab_population * TRIGRAMS_PER_WORD if cfg.tokenizer.kind == "tfree" else 1
    n = batch * S
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(n + 1, dtype=torch.long) * per
    return Batch(
        input_offsets=offsets, input_ids=torch.randint(0, v, (n * per,), generator=gen),
        target_offsets=offsets.clone(), target_ids=torch.randint(0, v, (n * per,), generator=gen),
        position_ids=torch.arange(S).repeat(batch, 1), document_ids=torch.zeros(batch, S, dtype=torch.long),
        loss_weights=torch.ones(batch, S),
    )


def measure_twins(twins: Sequence[tuple[Config, float]], batch: int = 2, steps: int = 3, warmup: int = 1,
                  threads: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """Build the real model of every ``(twin config, positions per word)`` (one process, CPU, fp32) and time
    forward + backward of ``batch`` random sequences: ``warmup`` untimed steps each, then ``steps`` timed
    rounds, one step of every twin per round (so a change of load on the machine hits all twins alike);
    words/s at each twin's median step time. ``threads``: torch's CPU threads meanwhile (restored after)."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = _time_twins(twins, batch, steps, warmup, seed)
    finally:
        torch.set_num_threads(saved_threads)
    out = []
    for (twin, upw), (params, ts) in zip(twins, times):
        m, per_step = twin.model, statistics.median(ts)
        words = batch * twin.data.seq_len / upw
        fpw = flops_per_position(twin) * upw
        out.append({"layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_attention_heads,
                    "kv_heads": m.num_kv_heads or m.num_attention_heads, "vocab": vocab_size(twin),
                    "seq_len": twin.data.seq_len, "batch": batch, "params": params,
                    "seconds_per_step": per_step, "step_seconds": ts, "words_per_s": words / per_step,
                    "flops_per_word": fpw, "gflops_per_s": fpw * words / per_step / 1e9})
    return out


def _time_twins(twins: Sequence[tuple[Config, float]], batch: int, steps: int, warmup: int,
                seed: int) -> list[tuple[int, list[float]]]:
    """``(parameters, timed step seconds)`` of every twin (see :func:`measure_twins`)."""
    from .model import GPTModel
    from .parallel import state

    with state.single_process():
        models = []
        for twin, _ in twins:
            model = GPTModel(twin.model, twin.tokenizer.kind, vocab_size(twin), seed=seed)
            models.append((model.train(), random_batch(twin, batch, seed)))

        def step(i: int) -> float:
            model, data = models[i]
            t0 = time.perf_counter()
            model.loss(data).backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        for i in range(len(models)):
            for _ in range(warmup + (1 if i == 0 else 0)):  # the first also pays the process's one-time costs
                step(i)
        times: list[list[float]] = [[] for _ in models]
        for _ in range(steps):
            for i in range(len(models)):
                times[i].append(step(i))
    return [(sum(p.numel() for p in model.parameters()), ts) for (model, _), ts in zip(models, times)]


# --------------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------------


def _memory(cfg: Config, o: SweepOptions) -> dict[str, Any]:
    try:
        plan = make_plan(cfg, o.nodes, o.gpus_per_node, o.gpu_memory_gib, o.flash)
    except ConfigError as e:
        return {"bytes": None, "gib": None, "fits": False, "error": str(e)}
    return {"bytes": plan["total_bytes"], "gib": plan["total_bytes"] / GIB, "fits": plan["fits"], "error": None}


def _sort_key(sort: str):
    return {
        "flops": lambda r: (r["flops_per_word"], r["layers"]),
        "params": lambda r: (abs(r["budget_error"]), r["flops_per_word"]),
        "depth": lambda r: (r["layers"], r["hidden"], r["flops_per_word"]),
        "width": lambda r: (r["hidden"], r["layers"], r["flops_per_word"]),
        "memory": lambda r: (r["memory"]["bytes"] is None, r["memory"]["bytes"] or 0, r["flops_per_word"]),
    }[sort]


def run_sweep(base: Config, o: SweepOptions) -> dict[str, Any]:
    """The whole sweep as a JSON-able dict (see the module docstring); raises :class:`SweepError` when no
    configuration is within the tolerance, naming the budget and the closest one found."""
    o = check_options(o, base)
    cands, closest = enumerate_candidates(base, o)
    if not cands:
        aspect = f"{o.aspect[0]:g}-{o.aspect[1]:g}"
        if closest is None:
            near = "no candidate at all (check --widths / --depths / --head-dim)"
        else:
            ratio = closest.params["total"] / o.params
            near = f"the closest: {_describe(closest)} ({f'{ratio:,.1f}x the budget' if ratio > 2 else f'{ratio - 1:+.1%}'}"
            near += (f", hidden/layers {closest.aspect:.3g} outside --aspect {aspect})"
                     if not in_range(closest.aspect, o.aspect) else ")")
        raise SweepError(f"no configuration within {o.tolerance:.0%} of the budget of {o.params:,.0f} parameters "
                         f"with hidden/layers in {aspect}; {near}. Widen --tolerance or --aspect, or change "
                         "--depths / --widths / --vocab / --mlp-ratios")
    rows = []
    for c in cands:
        row = c.row(o.params)
        row["memory"] = _memory(c.cfg, o)
        rows.append((row, c))
    rows.sort(key=lambda rc: _sort_key(o.sort)(rc[0]))
    listed = rows[: o.top] if o.top else rows
    twin_info = None
    for row, _ in listed:
        row["twin"] = None
    if o.measure:
        scale = o.twin_scale or auto_twin_scale([c for _, c in listed], o.twin_batch)
        twin_info = {"scale": scale, "batch": o.twin_batch, "steps": o.twin_steps, "warmup": o.twin_warmup,
                     "threads": o.twin_threads}
        twins = [(twin_config(c.cfg, scale), c.units_per_word) for _, c in listed]
        measured_twins = measure_twins(twins, o.twin_batch, o.twin_steps, o.twin_warmup, o.twin_threads)
        for (row, _), measured in zip(listed, measured_twins):
            row["twin"] = measured
    m, tr, p = base.model, base.training, base.parallel
    return {
        "budget": o.params, "tolerance": o.tolerance, "aspect": [a if math.isfinite(a) else None for a in o.aspect],
        "kinds": list(o.kinds),
        "units_per_word": {k: o.units_per_word[k] for k in o.kinds}, "sort": o.sort,
        "layout": {"nodes": o.nodes, "gpus_per_node": o.gpus_per_node, "tensor": p.tensor, "pipe": p.pipe,
                   "zero_stage": p.zero_stage, "precision": tr.precision, "micro_batch_size": tr.micro_batch_size,
                   "seq_len": base.data.seq_len, "activation_checkpointing": m.activation_checkpointing,
                   "gpu_memory_gib": o.gpu_memory_gib},
        "within_tolerance": len(rows), "twin": twin_info, "candidates": [r for r, _ in listed],
    }


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def human(n: float, billion: str = "B") -> str:
    """1.04B, 33.6M, 512k, 900 (``billion="G"`` for FLOPs: 6.49G)."""
    for div, suffix in ((1e12, "T"), (1e9, billion), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.3g}"


def format_sweep(result: dict[str, Any]) -> str:
    """The sweep as a Markdown table with a short header and footnotes."""
    L, rows, twin = result["layout"], result["candidates"], result["twin"]
    lo, hi = result["aspect"]
    aspect = f"{lo:g}-{hi:g}" if hi is not None else (f">= {lo:g}" if lo else "any")
    upw = ", ".join(f"{'T-Free' if k == 'tfree' else 'BPE'} {u:g}" for k, u in result["units_per_word"].items())
    lines = [
        f"budget {human(result['budget'])} parameters +-{result['tolerance']:.0%}, hidden/layers {aspect}: "
        f"{result['within_tolerance']} configurations, "
        f"{len(rows)} listed (sorted by {result['sort']})",
        f"memory per GPU: {L['nodes']} x {L['gpus_per_node']} GPUs, tensor {L['tensor']}, pipe {L['pipe']}, "
        f"ZeRO-{L['zero_stage']}, {L['precision']}, micro batch {L['micro_batch_size']}, seq_len {L['seq_len']}, "
        f"checkpointing {'on' if L['activation_checkpointing'] else 'off'}, {L['gpu_memory_gib']:g} GiB per GPU",
        f"FLOPs/word: training (fwd+bwd) 6 P_blocks + 6 h v + 12 L h S per position, x positions per word ({upw})",
    ]
    if twin:
        lines.append(f"twins: 1/{twin['scale']} of hidden, layers, vocab, seq_len; real GPTModel, CPU fp32, "
                     f"torch threads {twin['threads']}, micro batch {twin['batch']}, median of {twin['steps']} fwd+bwd "
                     f"steps after {twin['warmup']} warm-up")
    head = ["#", "kind", "vocab", "layers", "hidden", "heads", "MLP ratio (inner)", "hidden/layers", "params",
            "emb+head", "blocks", "FLOPs/word", "GiB/GPU"]
    if twin:
        head += ["twin L x h, v", "twin words/s", "twin GFLOP/s"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    notes: list[str] = []
    for i, r in enumerate(rows, 1):
        mem = r["memory"]
        if mem["error"]:
            if mem["error"] not in notes:
                notes.append(mem["error"])
            gib = f"n/a [{notes.index(mem['error']) + 1}]"
        else:
            gib = f"{mem['gib']:.1f} {'fits' if mem['fits'] else 'NO'}"
        heads = f"{r['heads']}x{r['head_dim']}" + (f" kv{r['kv_heads']}" if r["kv_heads"] != r["heads"] else "")
        total = r["params"]["total"]
        cells = [str(i), "T-Free" if r["kind"] == "tfree" else "BPE", f"{r['vocab']:,}", str(r["layers"]),
                 str(r["hidden"]), heads, f"{r['mlp_ratio']:.4g} ({r['ffn']})", f"{r['aspect']:.0f}",
                 f"{human(total)} ({r['budget_error']:+.1%})",
                 f"{human(r['embedding_head_params'])} ({r['embedding_head_params'] / total:.1%})",
                 human(r["other_params"]), human(r["flops_per_word"], "G"), gib]
        if twin:
            t = r["twin"]
            cells += [f"{t['layers']} x {t['hidden']}, {t['vocab']:,}", f"{t['words_per_s']:,.0f}",
                      f"{t['gflops_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    more = result["within_tolerance"] - len(rows)
    if more:
        lines.append(f"\n{more} more within the tolerance (--top 0 lists all)")
    lines += [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines)


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """FLOPs per word against depth, the parameter split of each listed row and (when measured) twin
    words/s against depth, into a PNG (Agg, no display)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    rows = result["candidates"]
    measured = result["twin"] is not None
    fig = Figure(figsize=(16 if measured else 11, 4.8), constrained_layout=True)
    axes = fig.subplots(1, 3 if measured else 2)
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        label = f"{'T-Free' if r['kind'] == 'tfree' else 'BPE'} v={r['vocab']:,} MLP {r['mlp_ratio']:.3g}"
        series.setdefault(label, []).append(r)

    def by_depth(ax, value, ylabel):
        for label, rs in series.items():
            rs = sorted(rs, key=lambda r: r["layers"])
            ax.plot([r["layers"] for r in rs], [value(r) for r in rs], "o-", label=label)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("layers (log2)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)

    by_depth(axes[0], lambda r: r["flops_per_word"] / 1e9, "GFLOP per word (training)")
    axes[0].set_title(f"budget {human(result['budget'])} parameters")
    x = range(len(rows))
    emb = [r["embedding_head_params"] / 1e6 for r in rows]
    axes[1].bar(x, [r["other_params"] / 1e6 for r in rows], label="blocks + final norm")
    axes[1].bar(x, emb, bottom=[r["other_params"] / 1e6 for r in rows], label="embedding + head")
    axes[1].set_xticks(list(x), [f"{'T' if r['kind'] == 'tfree' else 'B'} L{r['layers']} h{r['hidden']}" for r in rows],
                       rotation=70, fontsize=7)
    axes[1].set_ylabel("parameters (M)")
    axes[1].set_title("parameter split (listed rows, table order)")
    axes[1].legend(fontsize=7)
    if measured:
        by_depth(axes[2], lambda r: r["twin"]["words_per_s"], "twin words/s (CPU, measured)")
        axes[2].set_title(f"twins at 1/{result['twin']['scale']}")
    fig.savefig(path, dpi=110)


def write_outputs(result: dict[str, Any], json_path: Optional[str], plot_path: Optional[str]) -> str:
    """The text to print (the table, or the JSON when ``json_path`` is ``-``); writes the files."""
    text = json.dumps(result, indent=1) if json_path == "-" else format_sweep(result)
    if json_path and json_path != "-":
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    if plot_path:
        plot_sweep(result, plot_path)
    return text
