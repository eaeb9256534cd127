"""Plan a cluster layout before asking for GPUs: ``python -m megatron_tfree.plan --config CFG --nodes N``.

    python -m megatron_tfree.plan --config configs/7b_fineweb.yaml --nodes 32 --gpus-per-node 8
    python -m megatron_tfree.plan --config configs/7b_fineweb.yaml --nodes 4 parallel.tensor=2 \\
        parallel.pipe=2 --json plan.json
    python -m megatron_tfree.plan --sweep --params 1e9 --config configs/1b.yaml --nodes 8 --plot sweep.png

``--sweep`` lists the depth / width / vocabulary configurations of a parameter budget with their
parameters, FLOPs per word, memory per GPU (this module's formulas) and the measured CPU throughput
of scaled-down twins: :mod:`megatron_tfree.sweep`.

Nothing is instantiated and no GPU is needed: everything is computed from config formulas that mirror
the real model (``megatron_tfree/model``; a test checks the parameter formula against
``sum(p.numel())`` of a small real :class:`GPTModel` for both tokenizer kinds).

**Layout checks** (a :class:`~megatron_tfree.config.ConfigError` naming the key): world =
nodes * gpus divisible by ``parallel.tensor * parallel.pipe``; attention and KV heads, the SwiGLU
inner size and the vocabulary divisible by ``parallel.tensor``; ``parallel.pipe <= model.num_layers``;
``training.global_batch_size`` divisible by ``micro_batch_size * dp`` (-> gradient accumulation).
Rank order is TP fastest, then DP, then PP; dp = world / (tensor * pipe).

**Parameters per rank**: embedding ``[v/tp, h]`` on the first pipeline stage, final norm + head
``[v/tp, h]`` on the last; blocks split over stages as evenly as possible (the first ``L mod pp``
stages take one more), each block's linears sharded over TP, its two RMSNorm weights replicated.

**Memory per GPU** (bytes; ``P`` = parameters of the rank, ``N_d`` = dp), the ZeRO paper's model
(Rajbhandari et al. 2020) with Adam: mixed precision (bf16/fp16) keeps 2P weights, 2P gradients and
12P optimizer state (fp32 master copy 4 + Adam moments 4 + 4); fp32 keeps 4P + 4P + 8P (the weights
are the master copy). ZeRO-1 partitions the optimizer state over DP, ZeRO-2 also the gradients,
ZeRO-3 also the weights (each divided by ``N_d``). Not counted: communication buckets, transient
fp32 gradient copies of DeepSpeed's optimizer wrappers, the CUDA context and allocator
fragmentation (budget several GiB).

**Activations per micro-batch** (see :func:`layer_activation_bytes`): Megatron's per-layer
estimate (Korthikanti et al. 2022, ``sbh(34 + 5as/h)`` for GPT) re-derived for this implementation:
counted are the tensors autograd saves for backward, by storage, in the training precision ``p``
bytes, except where the code computes in fp32 (RMSNorm, rotary). Pipeline stage ``s`` of ``pp``
holds ``min(pp - s, gas)`` micro-batches in flight (DeepSpeed's 1F1B schedule).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from megatron_tfree.config import Config, ConfigError, load_config
from megatron_tfree.model.transformer import mlp_inner_size

GIB = 1024**3
TRIGRAMS_PER_WORD = 6  # assumed for the T-Free embedding input size (ids per word = m * this)


# --------------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    nodes: int
    gpus_per_node: int
    world: int
    tensor: int
    pipe: int
    data: int  # data-parallel size
    micro_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int  # sequences per optimizer step
    layers_per_stage: list[int]


def vocab_size(cfg: Config) -> int:
    """Rows of the embedding / columns of the head (``classic_vocab_size`` is an upper bound: a BPE
    trained on a small corpus may end up smaller)."""
    t = cfg.tokenizer
    return t.vocab_size if t.kind == "tfree" else t.classic_vocab_size


def stage_layers(num_layers: int, pipe: int) -> list[int]:
    """Transformer blocks per pipeline stage: even, the first ``num_layers % pipe`` stages one more."""
    base, extra = divmod(num_layers, pipe)
    return [base + (1 if s < extra else 0) for s in range(pipe)]


def check_layout(cfg: Config, nodes: int, gpus_per_node: int) -> Layout:
    """Validate the layout of ``cfg`` on ``nodes * gpus_per_node`` GPUs; errors name the key."""
    if nodes <= 0:
        raise ConfigError(f"--nodes must be > 0, got {nodes}")
    if gpus_per_node <= 0:
        raise ConfigError(f"--gpus-per-node must be > 0, got {gpus_per_node}")
    m, p, tr = cfg.model, cfg.parallel, cfg.training
    world = nodes * gpus_per_node
    tp, pp = p.tensor, p.pipe
    if world % (tp * pp):
        raise ConfigError(f"parallel.tensor * parallel.pipe ({tp} * {pp} = {tp * pp}) must divide the world "
                          f"size --nodes * --gpus-per-node ({nodes} * {gpus_per_node} = {world})")
    kv = m.num_kv_heads or m.num_attention_heads
    if m.num_attention_heads % tp:
        raise ConfigError(f"parallel.tensor ({tp}) must divide model.num_attention_heads ({m.num_attention_heads})")
    if kv % tp:
        raise ConfigError(f"parallel.tensor ({tp}) must divide model.num_kv_heads ({kv})")
    ffn = mlp_inner_size(m)
    if ffn % tp:
        raise ConfigError(f"parallel.tensor ({tp}) must divide the SwiGLU inner size (model.ffn_hidden_size, or "
                          f"int(model.mlp_factor * model.hidden_size)) = {ffn}")
    v = vocab_size(cfg)
    vkey = "tokenizer.vocab_size" if cfg.tokenizer.kind == "tfree" else "tokenizer.classic_vocab_size"
    if v % tp:
        raise ConfigError(f"parallel.tensor ({tp}) must divide {vkey} ({v})")
    if pp > m.num_layers:
        raise ConfigError(f"parallel.pipe ({pp}) must be <= model.num_layers ({m.num_layers})")
    dp = world // (tp * pp)
    if tr.global_batch_size:
        per_step = tr.micro_batch_size * dp
        if tr.global_batch_size % per_step:
            raise ConfigError(
                f"training.global_batch_size ({tr.global_batch_size}) must be divisible by "
                f"training.micro_batch_size ({tr.micro_batch_size}) * data-parallel size ({dp})")
        gas = tr.global_batch_size // per_step
    else:
        gas = tr.gradient_accumulation_steps
    return Layout(nodes, gpus_per_node, world, tp, pp, dp, tr.micro_batch_size, gas,
                  tr.micro_batch_size * gas * dp, stage_layers(m.num_layers, pp))


# --------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------


def block_params(cfg: Config, tensor: int = 1) -> int:
    """Parameters of one :class:`TransformerBlock` on one TP rank (two replicated RMSNorm weights,
    fused QKV and attention out, fused SwiGLU gate|up and down; with ``model.bias`` their biases: the
    QKV and gate|up ones split, the attention-out and down ones replicated)."""
    m = cfg.model
    h = m.hidden_size
    d = h // m.num_attention_heads
    q, kvd, ffn = m.num_attention_heads * d, (m.num_kv_heads or m.num_attention_heads) * d, mlp_inner_size(m)
    linears = h * (q + 2 * kvd) + q * h + h * 2 * ffn + ffn * h
    if m.bias:
        return 2 * h + 2 * h + (linears + q + 2 * kvd + 2 * ffn) // tensor
    return 2 * h + linears // tensor


def param_counts(cfg: Config) -> dict[str, int]:
    """Parameters of the whole model by part: embedding, blocks, output (final norm + head), total."""
    h, v, L = cfg.model.hidden_size, vocab_size(cfg), cfg.model.num_layers
    parts = {"embedding": v * h, "blocks": L * block_params(cfg), "output": h + h * v}
    parts["total"] = sum(parts.values())
    return parts


def stage_params(cfg: Config, layout: Layout) -> list[int]:
    """Parameters held by one rank of each pipeline stage (TP-sharded)."""
    h, v, tp = cfg.model.hidden_size, vocab_size(cfg), layout.tensor
    out = []
    for s, n in enumerate(layout.layers_per_stage):
        p = n * block_params(cfg, tp)
        if s == 0:
            p += v // tp * h
        if s == layout.pipe - 1:
            p += h + v // tp * h
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------


def precision_bytes(cfg: Config) -> int:
    return 4 if cfg.training.precision == "fp32" else 2


def model_state_bytes(params: int, precision: str, zero_stage: int, dp: int) -> dict[str, float]:
    """Weights, gradients and optimizer state (bytes) of a rank holding ``params`` parameters."""
    w, g, o = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    return {
        "weights": w * params / (dp if zero_stage >= 3 else 1),
        "grads": g * params / (dp if zero_stage >= 2 else 1),
        "optimizer": o * params / (dp if zero_stage >= 1 else 1),
    }


def layer_activation_bytes(cfg: Config, tokens: int, tensor: int = 1, flash: bool = True,
                           seq_len: Optional[int] = None) -> int:
    """Bytes one :class:`TransformerBlock` saves for backward for ``tokens = micro_batch * seq_len``.

    Counted by storage, from what autograd saves in this implementation (a test checks the formula
    against the saved tensors of a real block). With ``T`` tokens, ``p`` precision bytes, ``a`` heads,
    ``q = a * d``, ``k = kv_heads * d``, ``f`` the SwiGLU inner size, ``t`` = tensor parallel (the
    ``T*h`` terms are divided by ``t`` only with sequence parallelism)::

        16*T*h + 8*T                 2 RMSNorms, each: fp32 input copy, fp32 rsqrt, fp32 x * rsqrt
      + 2*p*T*h                      inputs of the QKV and gate|up projections
      + 8*T*d                        rotary cos/sin (fp32, for Q and K)
      + p*T*(q + 2k)/t               the QKV output (V is a view of it and keeps it alive)
      + p*T*k/t + 2*p*T*q/t          rotated K, rotated Q, attention output (= the dense input)
      + 4*T*a/t                      attention log-sum-exp (fp32)
      + 4*p*T*f/t                    gate|up output, silu(gate), silu(gate)*up (= the down input)
      [+ 8*h if p < 4]               fp32 copies of the two norm weights

    ``flash=False`` (torch SDPA) adds the additive block-causal mask ``p*T*S`` and, with grouped KV,
    saves K and V repeated to all heads (``2*p*T*q/t``) instead of rotated K and the QKV output.
    Megatron's GPT estimate is ``T*h*(34 + 5*a*S/h)`` (bf16, dropout masks, softmax stored); here there
    is no dropout (0), no stored softmax (flash / fused kernels), but fp32 norm intermediates and a
    wider SwiGLU: about 54 T*h bytes for the 7B shapes in bf16 (flash).
    """
    m = cfg.model
    p, h, t, T = precision_bytes(cfg), m.hidden_size, tensor, tokens
    a = m.num_attention_heads
    d = h // a
    q, k, f = a * d, (m.num_kv_heads or a) * d, mlp_inner_size(m)
    norm_t = t if cfg.parallel.sequence_parallel else 1
    total = ((16 + 2 * p) * T * h + 8 * T) / norm_t + 8 * T * d
    total += (2 * p * T * q + 4 * T * a + 4 * p * T * f) / t
    if flash or k == q:
        total += (p * T * (q + 2 * k) + p * T * k) / t
    else:
        total += 2 * p * T * q / t
    if not flash:
        total += p * T * (seq_len or cfg.data.seq_len)
    if p < 4:
        total += 8 * h
    return int(total)


def head_activation_bytes(cfg: Config, tokens: int, tensor: int = 1) -> int:
    """Final norm (fp32, 8 T*h), head input (p T*h) and the loss, which is not chunked: its peak over
    ``[T, v/t]`` (backward) holds per logit the fp32 logits (T-Free BCE; classic: fp32 log-softmax),
    the fp32 multi-hot targets (T-Free only), the fp32 gradient and its cast to ``p`` bytes."""
    p, h = precision_bytes(cfg), cfg.model.hidden_size
    per_logit = p + 4 + 4 + (4 if cfg.tokenizer.kind == "tfree" else 0)
    norm_t = tensor if cfg.parallel.sequence_parallel else 1
    return int(tokens * h * (8 + p) / norm_t + tokens * vocab_size(cfg) // tensor * per_logit)


def embedding_activation_bytes(cfg: Config, tokens: int) -> int:
    """The sparse T-Free input saved by the embedding-bag (int64 ids + offsets); classic: one id per
    token. The dense ``[T, h]`` output is counted by the first block (its norm's fp32 copy)."""
    ids = cfg.tokenizer.vocab_population * TRIGRAMS_PER_WORD if cfg.tokenizer.kind == "tfree" else 1
    return tokens * (ids + 1) * 8


def activation_bytes(cfg: Config, layout: Layout, stage: int, checkpointing: bool, flash: bool) -> dict[str, float]:
    """Activation bytes on one rank of pipeline ``stage``: per micro-batch, in flight, peak."""
    T = layout.micro_batch_size * cfg.data.seq_len
    n = layout.layers_per_stage[stage]
    layer = layer_activation_bytes(cfg, T, layout.tensor, flash)
    if checkpointing:  # each block keeps its input; one block is recomputed at a time
        norm_t = layout.tensor if cfg.parallel.sequence_parallel else 1
        blocks, recompute = n * T * cfg.model.hidden_size * precision_bytes(cfg) / norm_t, layer
    else:
        blocks, recompute = n * layer, 0
    extra = embedding_activation_bytes(cfg, T) if stage == 0 else 0
    head = head_activation_bytes(cfg, T, layout.tensor) if stage == layout.pipe - 1 else 0
    in_flight = min(layout.pipe - stage, layout.gradient_accumulation_steps)
    per_micro = blocks + extra
    return {"per_micro_batch": per_micro + head, "in_flight": in_flight,
            "total": per_micro * in_flight + recompute + head}


# --------------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------------


def make_plan(cfg: Config, nodes: int, gpus_per_node: int, gpu_memory_gib: float = 80.0,
              flash: Optional[bool] = None) -> dict[str, Any]:
    """The whole plan as a JSON-able dict (see the module docstring for the formulas)."""
    layout = check_layout(cfg, nodes, gpus_per_node)
    if flash is None:
        flash = cfg.model.attention != "sdpa"
    params = param_counts(cfg)
    per_stage = stage_params(cfg, layout)
    stages = []
    for s, p in enumerate(per_stage):
        zero = {z: model_state_bytes(p, cfg.training.precision, z, layout.data) for z in range(4)}
        act = {ck: activation_bytes(cfg, layout, s, ck, flash) for ck in (False, True)}
        stages.append({"stage": s, "layers": layout.layers_per_stage[s], "params": p, "zero": zero,
                       "activations": {"no_checkpointing": act[False], "checkpointing": act[True]}})
    ck, z = cfg.model.activation_checkpointing, cfg.parallel.zero_stage
    key = "checkpointing" if ck else "no_checkpointing"
    totals = [sum(st["zero"][z].values()) + st["activations"][key]["total"] for st in stages]
    worst = max(range(len(stages)), key=lambda i: totals[i])
    return {
        "layout": asdict(layout),
        "params": params,
        "params_per_rank": {"max": max(per_stage), "per_stage": per_stage},
        "precision": cfg.training.precision,
        "zero_stage": z,
        "activation_checkpointing": ck,
        "flash_attention": flash,
        "stages": stages,
        "total_bytes": totals[worst],
        "worst_stage": worst,
        "gpu_memory_gib": gpu_memory_gib,
        "fits": totals[worst] <= gpu_memory_gib * GIB,
        "global_batch": {"sequences": layout.global_batch_size,
                         "words_per_step": layout.global_batch_size * cfg.data.seq_len,
                         "unit": "words" if cfg.tokenizer.kind == "tfree" else "tokens"},
        "warnings": (["parallel.tensor > --gpus-per-node: tensor parallel groups span nodes (slow)"]
                     if layout.tensor > gpus_per_node else []),
    }


def _g(b: float) -> str:
    return f"{b / GIB:8.2f}"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a text table (memory of the worst pipeline stage, all ZeRO stages)."""
    L, pr = plan["layout"], plan["params"]
    st = plan["stages"][plan["worst_stage"]]
    unit = plan["global_batch"]["unit"]
    lines = [
        f"layout: {L['nodes']} nodes x {L['gpus_per_node']} GPUs = {L['world']} ranks = "
        f"tensor {L['tensor']} x pipe {L['pipe']} x data {L['data']}",
        f"layers per pipeline stage: {L['layers_per_stage']}",
        f"batch: micro {L['micro_batch_size']} x grad accumulation {L['gradient_accumulation_steps']} x "
        f"data {L['data']} = {plan['global_batch']['sequences']} sequences = "
        f"{plan['global_batch']['words_per_step']:,} {unit} per step",
        f"parameters: total {pr['total']:,} (embedding {pr['embedding']:,}, blocks {pr['blocks']:,}, "
        f"output {pr['output']:,}); per rank max {plan['params_per_rank']['max']:,} "
        f"(per stage {plan['params_per_rank']['per_stage']})",
        f"memory per GPU, GiB (stage {st['stage']} of the pipeline, {plan['precision']}, "
        f"{'flash' if plan['flash_attention'] else 'sdpa'} attention):",
        "  ZeRO  partitioned over DP       weights    grads  optimizer   act(ckpt)  act(no ckpt)  total "
        + ("(ckpt)" if plan["activation_checkpointing"] else "(no ckpt)"),
    ]
    part = {0: "nothing", 1: "optimizer", 2: "optimizer+grads", 3: "optimizer+grads+weights"}
    a_ck, a_no = st["activations"]["checkpointing"]["total"], st["activations"]["no_checkpointing"]["total"]
    act = a_ck if plan["activation_checkpointing"] else a_no
    for z in range(4):
        m = st["zero"][z]
        mark = " <" if z == plan["zero_stage"] else "  "
        lines.append(f"{mark}{z:3d}  {part[z]:<24s}{_g(m['weights'])} {_g(m['grads'])}  {_g(m['optimizer'])}"
                     f"    {_g(a_ck)}      {_g(a_no)}     {_g(sum(m.values()) + act)}")
    ck = "with" if plan["activation_checkpointing"] else "without"
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"configured (ZeRO-{plan['zero_stage']}, {ck} activation checkpointing): "
                 f"{plan['total_bytes'] / GIB:.2f} GiB per GPU, {verdict} in {plan['gpu_memory_gib']:g} GiB "
                 "(plus CUDA context, buffers, fragmentation)")
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-tfree-plan",
        description="Check a parallel layout and estimate parameters and memory per GPU (no GPU needed); "
                    "--sweep: list the model shapes of a parameter budget.",
        epilog="Example: python -m megatron_tfree.plan --config configs/7b_fineweb.yaml --nodes 32 "
               "--gpus-per-node 8 parallel.tensor=2",
    )
    p.add_argument("--config", default=None,
                   help="YAML config file (required; with --sweep the base config, default: built-in defaults)")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU for the fits/does-not-fit line")
    p.add_argument("--attention", choices=["flash", "sdpa"], default=None,
                   help="attention kernel assumed (default: flash unless model.attention=sdpa)")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the plan (or sweep) as JSON; - prints it to stdout instead of the table")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    from megatron_tfree.sweep import add_arguments

    add_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from megatron_tfree import sweep

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.sweep:
        given = [name for name in sweep.SWEEP_ONLY if getattr(args, name) is not None]
        if given:
            parser.error(f"--{given[0].replace('_', '-')} needs --sweep")
        if args.config is None:
            parser.error("--config is required (unless --sweep)")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.sweep:
            result = sweep.run_sweep(cfg, sweep.options_from_args(args, cfg))
            try:
                print(sweep.write_outputs(result, args.json, args.plot))
            except OSError as e:
                print(f"megatron-tfree-plan: cannot write the sweep: {e}", file=sys.stderr)
                return 2
            return 0
        flash = None if args.attention is None else args.attention == "flash"
        plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_memory, flash)
    except ConfigError as e:
        print(f"megatron-tfree-plan: {e}", file=sys.stderr)
        return 2
    if args.json == "-":
        print(json.dumps(plan, indent=1))
        return 0
    print(format_plan(plan))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
